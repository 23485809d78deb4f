#!/usr/bin/env bash
# Start the inference service, the memory daemon and the OpenAI gateway on one host.
# Used by `make run`. Ctrl-C (or SIGTERM) stops all three; the service drains first.
set -euo pipefail

BIN="${BIN:-.venv/bin}"
PORT="${AUTOGLM_PORT:-50051}"
GATEWAY_PORT="${AUTOGLM_GATEWAY_PORT:-8000}"
CONTROL_SOCKET="${AUTOGLM_CONTROL_SOCKET:-/tmp/autoglm-control.sock}"
# The daemon's host probe watches the service's RSS against this budget (CPU hosts).
HOST_BUDGET_BYTES="${AUTOGLM_MEMD_HOST_BUDGET_BYTES:-4294967296}"
MEMD_PROBE="${AUTOGLM_MEMD_DAEMON_PROBE:-host}"

pids=()
stop() {
    trap - INT TERM EXIT
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait || true
}
trap stop INT TERM EXIT

"$BIN/autoglm-server" --port "$PORT" --control-socket "$CONTROL_SOCKET" \
    --metrics-port "${AUTOGLM_METRICS_PORT:-9464}" "$@" &
server=$!
pids+=("$server")

echo "autoglm: waiting for the service (first start converts the embedded model, ~30 s)" >&2
until [ -S "$CONTROL_SOCKET" ]; do
    kill -0 "$server" 2>/dev/null || { echo "autoglm: the service exited" >&2; exit 1; }
    sleep 0.2
done

memd_args=(--probe "$MEMD_PROBE" --control "unix://$CONTROL_SOCKET")
if [ "$MEMD_PROBE" = host ]; then
    memd_args+=(--pid "$server" --host-budget-bytes "$HOST_BUDGET_BYTES")
fi
"$BIN/autoglm-memd" "${memd_args[@]}" &
pids+=("$!")

"$BIN/autoglm-gateway" --port "$GATEWAY_PORT" --grpc-target "127.0.0.1:$PORT" &
pids+=("$!")

wait "$server"
