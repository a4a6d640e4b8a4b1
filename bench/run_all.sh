#!/usr/bin/env bash
# The whole suite as a user runs it: `shmrt bench` starts `shmrt daemon` as its own process and
# drives the enclave client against it for each transport; results land in bench/results/<machine>/.
#   bash bench/run_all.sh --quick                 # under a minute on 2 CPU cores
#   bash bench/run_all.sh --model llama3.2-1b --device cuda --prompts 1024
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/shmrt ] || bash scripts/setup.sh
exec .venv/bin/shmrt bench --suite all "$@"
