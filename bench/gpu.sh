#!/usr/bin/env bash
# One call on a lent GPU machine: install carried wheels, build the C helper, run the CUDA tests
# (SKIP_TESTS=1 skips them), the per-call probes (the daemon's calls in process; eager vs CUDA graph), the
# micro suite (both doorbells beside their floors), then the e2e bench for the llama3.2-1b shape (prefill
# 1024, decode 32, float32 wire, K/V on the daemon; the floor always runs; RUNS picks the call sets and
# transports). Everything lands in $OUT (the device returns at most 8 files).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
python3 native/build_native.py >/dev/null || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c 'import torch,sys; print(sys.version, torch.__version__, torch.cuda.get_device_name(0))' | tee -a $OUT/gpu.txt
avail=$(df --output=avail -k /dev/shm | tail -1)
[ "$avail" -lt 4000000 ] && mount -o remount,size=16G /dev/shm
nproc | tee -a $OUT/gpu.txt
[ -n "${SKIP_TESTS:-}" ] || timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_split.py tests/test_lifetimes.py \
  tests/test_compute.py -k "cuda or poison or sync" 2>&1 | tail -15 | tee $OUT/tests.txt
mkdir -p /tmp/res
if [ -z "${SKIP_PROBES:-}" ]; then
  { for host in registered pinned; do
      timeout 120 python3 bench/cuda_graph_probe.py --dtype float32 --wire float32 --host $host \
        --json /tmp/res/graph-probe-fp32-$host.json; done
    timeout 120 python3 bench/daemon_calls.py --model llama3.2-1b --device cuda --threads 4 --context 1024 --steps 32 \
      --json /tmp/res/daemon-calls-cuda.json; } 2>&1 | tail -40 | tee $OUT/probes.txt
fi
[ -n "${SKIP_MICRO:-}" ] || timeout 240 python3 -m shmrt bench --suite micro --sizes 4KiB,16KiB,64KiB,1MiB,10MiB \
  --out /tmp/res/micro 2>&1 | tr '\r' '\n' | tail -8 | tee $OUT/micro.txt
# RUNS: space-separated CALLS:TRANSPORTS pairs, e.g. "fewest:shm,shm-zmqbell,msgpack fused:shm v2.4:shm" (the floor always runs)
for run in ${RUNS:-fewest:shm,shm-zmqbell,msgpack fused:shm}; do
  calls=${run%%:*}; transports=${run#*:}
  timeout ${BENCH_TIMEOUT:-420} python3 -m shmrt bench --suite e2e --model llama3.2-1b --device cuda --prompts 1024 \
    --new-tokens 32 --transports "$transports" --wire-dtypes float32 --kv-caches daemon --calls "$calls" \
    --decode-threads ${DECODE_THREADS:-1} --out "/tmp/res/gpu-$calls${TAG:-}" 2>&1 | tr '\r' '\n' | tail -4 \
    | tee "$OUT/bench-$calls${TAG:-}.txt"
done
tar czf $OUT/results.tgz -C /tmp/res . 2>/dev/null
