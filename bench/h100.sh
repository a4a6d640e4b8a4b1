#!/usr/bin/env bash
# One call on a lent GPU machine: install carried wheels, build the C helper, run the parity tests
# with the daemon on CUDA, then the micro and e2e suites (llama3.2-1b, prefill 1024, decode 32).
# Everything lands in $OUT (results packed into one tarball: the device returns at most 8 files).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
python3 native/build_native.py || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c 'import torch,sys; print(sys.version, torch.__version__, torch.cuda.get_device_name(0))' | tee -a $OUT/gpu.txt
df -h /dev/shm | tee -a $OUT/gpu.txt
# The 1B rings need ~0.6 GiB of /dev/shm; grow it if the VM mounted a small one.
avail=$(df --output=avail -k /dev/shm | tail -1)
[ "$avail" -lt 4000000 ] && mount -o remount,size=16G /dev/shm && df -h /dev/shm | tee -a $OUT/gpu.txt
nproc | tee -a $OUT/gpu.txt
[ -n "${SKIP_TESTS:-}" ] || timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_split.py -k "fp32 or greedy or once" 2>&1 | tail -25 | tee $OUT/tests.txt
mkdir -p /tmp/res
# (1) the headline comparison in one run: msgpack vs shm, float32 wire, K/V on the daemon;
# (2) the rest of the shm matrix (bfloat16 wire, client-side K/V). msgpack takes ~40 s per 1B
# prefill at 1024 tokens, so its full matrix does not fit one 10-minute device call.
timeout 330 python3 -m shmrt bench --suite e2e --model llama3.2-1b --device cuda --prompts 1024 --new-tokens 32 \
  --transports msgpack,shm --wire-dtypes float32 --kv-caches daemon --out /tmp/res/h100-headline 2>&1 | tr '\r' '\n' | tail -8 | tee $OUT/bench1.txt
timeout 200 python3 -m shmrt bench --suite e2e --model llama3.2-1b --device cuda --prompts 1024 --new-tokens 32 \
  --transports shm --wire-dtypes float32,bfloat16 --kv-caches daemon,client --out /tmp/res/h100-shm 2>&1 | tr '\r' '\n' | tail -8 | tee $OUT/bench2.txt
tar czf $OUT/results.tgz -C /tmp/res . 2>/dev/null
