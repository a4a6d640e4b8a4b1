#!/usr/bin/env bash
# session 17: does where the client and the daemon run (SMT siblings or not) explain the H200 hosts' run-to-run spread?
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
python3 native/build_native.py >/dev/null || exit 1
lscpu | grep -E "Model name|Thread|Core|Socket|NUMA node|^CPU\(s\)" | tee $OUT/topology.txt
for c in $(seq 0 15); do echo "cpu$c siblings $(cat /sys/devices/system/cpu/cpu$c/topology/thread_siblings_list) core $(cat /sys/devices/system/cpu/cpu$c/topology/core_id)"; done | tee -a $OUT/topology.txt
avail=$(df --output=avail -k /dev/shm | tail -1); [ "$avail" -lt 4000000 ] && mount -o remount,size=16G /dev/shm
C=2
SIB=$(cat /sys/devices/system/cpu/cpu$C/topology/thread_siblings_list | tr ',-' '\n\n' | grep -v "^$C$" | head -1)
[ -z "$SIB" ] && SIB=3
REST=$(python3 -c "print(','.join(str(i) for i in range(16) if i not in ($C, $SIB)))")
echo "client cpu $C, its sibling $SIB, the rest $REST" | tee -a $OUT/topology.txt
run() {   # name daemon-cpus client-cpus
  local ep=ipc:///tmp/pin-$1.sock ready=/tmp/pin-ready-$1
  rm -f $ready
  if [ "$2" = any ]; then python3 -m shmrt daemon --model llama3.2-1b --device cuda --endpoint $ep --ready-file $ready --quiet &
  else taskset -c $2 python3 -m shmrt daemon --model llama3.2-1b --device cuda --endpoint $ep --ready-file $ready --quiet & fi
  local d=$!
  for i in $(seq 1 600); do [ -e $ready ] && break; sleep 0.1; done
  local pre=""; [ "$3" = any ] || pre="taskset -c $3"
  echo "== $1 (daemon $2, client $3)" | tee -a $OUT/pin.txt
  $pre python3 -m shmrt client --endpoint $ep --model llama3.2-1b --prefill 1024 --max-new-tokens 64 --log /tmp/pin-$1.log 2>&1 | grep -E "decode|a token" | tee -a $OUT/pin.txt
  kill $d; wait $d 2>/dev/null
}
for r in 1 2; do
  run free$r any any
  run client1cpu$r any $C
  run daemon1cpu$r 5 any
  run both1cpu$r 5 $C
done
