#!/usr/bin/env bash
# One call on a lent GPU machine: install carried wheels, build the C helper, run the parity tests
# with the daemon on CUDA (SKIP_TESTS=1 skips them), then one part of the e2e matrix (llama3.2-1b,
# prefill 1024, decode 32; RUN picks the part).
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
[ -n "${SKIP_TESTS:-}" ] || timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_split.py -k cuda 2>&1 | tail -25 | tee $OUT/tests.txt
mkdir -p /tmp/res
# msgpack takes ~40 s per float32 1B prefill at 1024 tokens (4 per configuration: a warm-up and 3), so
# the matrix takes one 10-minute device call per part: RUN=fp32-daemon (the headline), fp32-client, bf16.
run_bench() {  # name wire kv
  timeout 430 python3 -m shmrt bench --suite e2e --model llama3.2-1b --device cuda --prompts 1024 --new-tokens 32 \
    --transports msgpack,shm --wire-dtypes "$2" --kv-caches "$3" --out "/tmp/res/$1" 2>&1 | tr '\r' '\n' | tail -8 | tee "$OUT/bench-$1.txt"
}
case "${RUN:-fp32-daemon}" in
  fp32-daemon) run_bench h100-fp32-kvdaemon float32 daemon ;;
  fp32-client) run_bench h100-fp32-kvclient float32 client ;;
  bf16) run_bench h100-bf16 bfloat16 daemon,client ;;
  *) echo "RUN must be fp32-daemon, fp32-client or bf16" >&2; exit 2 ;;
esac
tar czf $OUT/results.tgz -C /tmp/res . 2>/dev/null
