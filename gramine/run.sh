#!/usr/bin/env bash
# Start the daemon on the host, then the client natively, under gramine-direct or gramine-sgx
# (GRAMINE=none|direct|sgx), over the tcp doorbell (an enclave cannot reach a host Unix socket).
#   GRAMINE=sgx PORT=5555 bash gramine/run.sh --model llama3.2-1b --device cuda -- --prefill 128
# Both sides get the same --model/--layers/--seed: the client reads its own copy of the model (for SGX a
# trusted file under the manifest's `models` directory) and checks the daemon's digest against it.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-5555}
ENDPOINT="tcp://127.0.0.1:$PORT"
daemon_args=(); client_args=()
model_args=()
while [ $# -gt 0 ]; do
  [ "$1" = "--" ] && { shift; client_args=("$@"); break; }
  case "$1" in --model|--layers|--seed) model_args+=("$1" "$2"); daemon_args+=("$1" "$2"); shift 2 ;;
               *) daemon_args+=("$1"); shift ;; esac
done
client_args=("${model_args[@]}" "${client_args[@]}")
.venv/bin/shmrt daemon --endpoint "$ENDPOINT" --ready-file /tmp/shmrt-daemon-ready.$$ "${daemon_args[@]}" &
daemon=$!
trap 'kill $daemon 2>/dev/null; wait $daemon 2>/dev/null; rm -f /tmp/shmrt-daemon-ready.$$' EXIT
while [ ! -e /tmp/shmrt-daemon-ready.$$ ]; do kill -0 $daemon || exit 1; sleep 0.1; done
case "${GRAMINE:-none}" in
  none)   .venv/bin/shmrt client --enclave --endpoint "$ENDPOINT" "${client_args[@]}" ;;
  direct) make -C gramine >/dev/null && gramine-direct gramine/shmrt-client -m shmrt client --endpoint "$ENDPOINT" --log /outputs/zmq_performance.log "${client_args[@]}" ;;
  sgx)    make -C gramine SGX=1 >/dev/null && gramine-sgx gramine/shmrt-client -m shmrt client --endpoint "$ENDPOINT" --log /outputs/zmq_performance.log "${client_args[@]}" ;;
  *) echo "GRAMINE must be none, direct or sgx" >&2; exit 2 ;;
esac
