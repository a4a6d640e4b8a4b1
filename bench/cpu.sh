#!/usr/bin/env bash
# The 2-core CPU runs of this project's CI machine kind: the real model (SmolLM2-135M, GGUF) over msgpack
# and shm against the in-process floor, then the `small` preset's decode with each call set.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/cpu-2core}
.venv/bin/shmrt bench --suite e2e --model smollm2-135m --prompts 128 --new-tokens 16 --transports msgpack,shm \
  --wire-dtypes float32 --kv-caches daemon --out "$out-smollm2"
for calls in fewest fused v2.4; do
  .venv/bin/shmrt bench --suite e2e --model small --prompts 128 --new-tokens 32 --transports shm \
    --wire-dtypes float32 --kv-caches daemon --calls "$calls" --out "$out-small-$calls"
done
