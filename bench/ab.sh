#!/usr/bin/env bash
# Interleaved A/B of two source trees on one machine: lent hosts are noisy (the floor alone moved 18-30
# ms/token between runs of one session), so compare variants alternating on the same warm machine.
#
#   git archive <rev> | (mkdir -p scratch/old && tar -x -C scratch/old)     # the baseline tree, untracked
#   OLD=scratch/old ROUNDS="1 2 3" bash bench/ab.sh       # on a GPU host: `run` it there, carrying
#                                                          # [".whl", "scratch/old"] (scratch/ is git-ignored)
#
# Each round runs `shmrt bench --suite e2e` once per variant (`old`: $OLD, `new`: this tree; VARIANTS picks,
# `new1t`/`newshortyield`/`nographs`/`nolane`/`noplans`/`nocalls`/`newfused` are this tree with --decode-threads 1 /
# the few-core backoff before session 7 / SHMRT_CUDA_GRAPHS=0 / SHMRT_PLANNED_LANE=0 / SHMRT_CPU_PLANS=0 /
# SHMRT_CALLS_IN_C=0 / --calls fused) and
# prints its per-token row and prefill rows; results land in $RES (default /tmp/ab) and, on a device, $OUT/ab.tgz.
# More than two trees: TREES="old=scratch/old mid=scratch/mid new=." (names, then directories under this one;
# VARIANTS defaults to the names in that order). At the end, the medians per variant of every per-token column
# (bench/ab_summary.py): read the columns a change cannot touch (the floor, the other side's work) as the
# host's noise, a session's lesson: the same code moved 25% between runs.
# MODEL, DEVICE, PROMPT, NEW, TRANSPORTS as in the bench (defaults: llama3.2-1b on cuda, 1024, 32, shm); PY:
# the interpreter (on this machine: PY=$PWD/.venv/bin/python DEVICE=cpu MODEL=small PROMPT=128).
set -uo pipefail
export PYTHONUNBUFFERED=1
ROOT=$PWD
OLD=${OLD:-scratch/old}
RES=${RES:-/tmp/ab}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}          # here: PY=$PWD/.venv/bin/python
if [ -d .whl ] && ! "$PY" -c "import zmq, posix_ipc, cffi" 2>/dev/null; then   # a lent GPU image
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
SITE=${PYTHONPATH:-}
declare -A TREE_DIR=()
for pair in ${TREES:-}; do TREE_DIR[${pair%%=*}]=$ROOT/${pair#*=}; done
[ -n "${TREES:-}" ] && VARIANTS=${VARIANTS:-$(for pair in $TREES; do printf '%s ' "${pair%%=*}"; done)}
if [ -n "${TREES:-}" ]; then DIRS=("${TREE_DIR[@]}"); else DIRS=("$ROOT" "$ROOT/$OLD"); fi
for dir in "${DIRS[@]}"; do
  [ -d "$dir" ] || { echo "no tree at $dir: see the header of this script"; exit 2; }
  (cd "$dir" && PYTHONPATH=$SITE "$PY" native/build_native.py >/dev/null) || exit 1
done
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nproc
mkdir -p "$RES"
START=$(date +%s)
for round in ${ROUNDS:-1 2 3}; do
  for variant in ${VARIANTS:-old new}; do
    dir=$ROOT; envs=(); extra=()
    case $variant in
      *) [ -n "${TREE_DIR[$variant]:-}" ] && dir=${TREE_DIR[$variant]};;&
      old) [ -n "${TREES:-}" ] || dir=$ROOT/$OLD;;
      new1t) extra=(--decode-threads 1);;
      newshortyield) envs=(SHMRT_BACKOFF=50,200,20,1000);;
      nographs) envs=(SHMRT_CUDA_GRAPHS=0);;   # this tree, decode BatchLinear eager on CUDA
      nolane) envs=(SHMRT_PLANNED_LANE=0);;     # this tree, planned calls served from Python (host/lane.py off)
      noplans) envs=(SHMRT_CPU_PLANS=0);;       # this tree, a CPU daemon's every call through the handler
      nocalls) envs=(SHMRT_CALLS_IN_C=0);;      # this tree, the client's calls from Python (no shmrt_call)
      newfused) extra=(--calls fused);;         # this tree, 5 calls a layer (Q*K^T a call of its own)
    esac
    (cd "$dir" && env "${envs[@]}" PYTHONPATH="$SITE${SITE:+:}$dir" timeout "${T:-300}" "$PY" -m shmrt bench --suite e2e \
       --model "${MODEL:-llama3.2-1b}" --device "$DEVICE" --prompts "${PROMPT:-1024}" --new-tokens "${NEW:-32}" \
       --transports "${TRANSPORTS:-shm}" --wire-dtypes float32 --kv-caches daemon "${extra[@]}" \
       --out "$RES/$variant-$round" > "$RES/$variant-$round.txt" 2>&1)
    echo "== $variant round $round ($(( $(date +%s) - START )) s)"
    grep -E "^\| [0-9]+ \| (shm|msgpack|shm-zmqbell) \| float32 \| daemon \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \|$" \
      "$RES/$variant-$round/results.md"
    grep -E "^\| [0-9]+ \| prefill .*\| (floor|shm) " "$RES/$variant-$round/results.md" | cut -c1-120
  done
done
[ -n "${KEEP_LOGS:-}" ] || find "$RES" -name "*.log*" -delete   # KEEP_LOGS=1: keep the per-call logs
"$PY" "$ROOT/bench/ab_summary.py" "$RES" ${VARIANTS:-old new}
[ -n "${OUT:-}" ] && tar czf "$OUT/ab.tgz" -C "$RES" .
true
