#!/usr/bin/env bash
# run_autoglm_server.sh: start the inference service, the memory daemon and the OpenAI
# gateway on one host, wait until the service is SERVING, and stop all three on SIGTERM
# or Ctrl-C (the service drains its streams first; exit code 0). Used by `make run` and
# as the container's entrypoint. Arguments are passed to autoglm-server, for example
#   deploy/run_autoglm_server.sh --model-dir /models/autoglm-phone-9b --device cuda:0
#
# Environment (every port and path; the service itself also reads AUTOGLM_<FLAG>):
#   AUTOGLM_BIN                     directory of the console scripts (default: from PATH)
#   AUTOGLM_HOST                    public gRPC address to bind (default 0.0.0.0)
#   AUTOGLM_PORT                    public gRPC port (default 50051; 0 = any free port)
#   AUTOGLM_RUN_DIR                 runtime files (default $RUNTIME_DIRECTORY, else /tmp)
#   AUTOGLM_CONTROL_SOCKET          control API socket (default $AUTOGLM_RUN_DIR/autoglm-control.sock)
#   AUTOGLM_PORT_FILE               the service's port file: port, pid, serving
#                                   (default $AUTOGLM_RUN_DIR/autoglm-port.json)
#   AUTOGLM_METRICS_PORT            service Prometheus port (default 9464; 0 = off)
#   AUTOGLM_GRACE_PERIOD            seconds streams get on SIGTERM (default 10)
#   AUTOGLM_START_TIMEOUT           seconds to wait for SERVING (default 600)
#   AUTOGLM_GATEWAY                 1 = start the OpenAI gateway (default), 0 = don't
#   AUTOGLM_GATEWAY_HOST            gateway address (default 127.0.0.1)
#   AUTOGLM_GATEWAY_PORT            gateway port (default 8000)
#   AUTOGLM_MEMD                    1 = start the memory daemon (default), 0 = don't
#   AUTOGLM_MEMD_DAEMON_PROBE       nvml | host (default: nvml when `nvidia-smi -L` lists
#                                   a GPU, else host, which follows the service's pid)
#   AUTOGLM_MEMD_HOST_BUDGET_BYTES  host probe budget (default 4294967296)
#   AUTOGLM_MEMD_DAEMON_METRICS_PORT  daemon Prometheus port (default 0 = off)
#   AUTOGLM_MEMD_*                  any other daemon key (deploy/memd.example.toml)
#   AUTOGLM_GPU_MEMORY_GIB          memory of each GPU (of the host without one), GiB: the
#                                   service gets the weight precisions and KV budget that
#                                   `autoglm-plan` chooses for the model (--model-dir or
#                                   AUTOGLM_MODEL_DIR) on such cards, as AUTOGLM_DECODER_WEIGHTS,
#                                   AUTOGLM_VISION_WEIGHTS, AUTOGLM_KV_BUDGET_MB and
#                                   AUTOGLM_DEVICE (a GLM-4.1V checkpoint's layers split over
#                                   the planned cards), each unless already set (default:
#                                   unset, no plan)
#   AUTOGLM_PLAN_GPUS               cards the plan spreads the model over (default: the GPUs
#                                   `nvidia-smi -L` lists)
#   AUTOGLM_PLAN_AGENTS             phone agents that must fit at once (default 1)
#   AUTOGLM_PLAN_CONTEXT            tokens each holds (default 25480, or the model's context)
# When GPUs are present, PYTORCH_CUDA_ALLOC_CONF defaults to expandable_segments:True.
#
# Exit code: the service's (0 after a clean drain, 70 when its watchdog fired), else 1
# if the daemon or the gateway failed, or the service never became SERVING; autoglm-plan's
# (2) when the model does not fit AUTOGLM_GPU_MEMORY_GIB, before anything starts.
set -euo pipefail

tool() { if [ -n "${AUTOGLM_BIN:-}" ]; then echo "$AUTOGLM_BIN/$1"; else echo "$1"; fi; }
say() { echo "autoglm: $*" >&2; }

HOST="${AUTOGLM_HOST:-0.0.0.0}"
PORT="${AUTOGLM_PORT:-50051}"
RUN_DIR="${AUTOGLM_RUN_DIR:-${RUNTIME_DIRECTORY:-/tmp}}"
CONTROL_SOCKET="${AUTOGLM_CONTROL_SOCKET:-$RUN_DIR/autoglm-control.sock}"
PORT_FILE="${AUTOGLM_PORT_FILE:-$RUN_DIR/autoglm-port.json}"
METRICS_PORT="${AUTOGLM_METRICS_PORT:-9464}"
GRACE_PERIOD="${AUTOGLM_GRACE_PERIOD:-10}"
START_TIMEOUT="${AUTOGLM_START_TIMEOUT:-600}"
WITH_GATEWAY="${AUTOGLM_GATEWAY:-1}"
GATEWAY_HOST="${AUTOGLM_GATEWAY_HOST:-127.0.0.1}"
GATEWAY_PORT="${AUTOGLM_GATEWAY_PORT:-8000}"
WITH_MEMD="${AUTOGLM_MEMD:-1}"
HOST_BUDGET_BYTES="${AUTOGLM_MEMD_HOST_BUDGET_BYTES:-4294967296}"

gpu_count() {
    command -v nvidia-smi >/dev/null 2>&1 || { echo 0; return; }
    nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
}
GPUS="$(gpu_count)"
if [ "$GPUS" -gt 0 ]; then
    export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
fi
MEMD_PROBE="${AUTOGLM_MEMD_DAEMON_PROBE:-$([ "$GPUS" -gt 0 ] && echo nvml || echo host)}"

model_dir_in() {  # the --model-dir among the service's arguments, else AUTOGLM_MODEL_DIR
    local dir="${AUTOGLM_MODEL_DIR:-}" previous=""
    for arg in "$@"; do
        case "$arg" in --model-dir=*) dir="${arg#--model-dir=}" ;; esac
        if [ "$previous" = --model-dir ]; then dir="$arg"; fi
        previous="$arg"
    done
    echo "$dir"
}
fp8_cards() {  # every GPU runs float8 (compute capability 8.9 or later)
    nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null |
        awk '{ seen = 1; if ($1 + 0 < 8.9) old = 1 } END { exit !(seen && !old) }'
}
if [ -n "${AUTOGLM_GPU_MEMORY_GIB:-}" ]; then
    plan_args=(--gpus "${AUTOGLM_PLAN_GPUS:-$GPUS}" --gpu-memory-gib "$AUTOGLM_GPU_MEMORY_GIB"
               --agents "${AUTOGLM_PLAN_AGENTS:-1}" --env)
    if [ -n "${AUTOGLM_PLAN_CONTEXT:-}" ]; then plan_args+=(--context "$AUTOGLM_PLAN_CONTEXT"); fi
    if [ "$GPUS" -gt 0 ] && fp8_cards; then plan_args+=(--fp8); fi
    model_dir="$(model_dir_in "$@")"
    if [ -n "$model_dir" ]; then plan_args=("$model_dir" "${plan_args[@]}"); fi
    # autoglm-plan says on stderr why nothing fits
    plan="$("$(tool autoglm-plan)" "${plan_args[@]}")" || exit $?
    while IFS='=' read -r name value; do
        if [ -z "${!name:-}" ]; then
            export "$name=$value"
            say "plan for ${AUTOGLM_GPU_MEMORY_GIB} GiB: $name=$value"
        fi
    done <<< "$plan"
fi

mkdir -p "$(dirname "$CONTROL_SOCKET")" "$(dirname "$PORT_FILE")"
rm -f "$PORT_FILE"

server="" memd="" gateway=""
stopping=0
stop_all() {
    stopping=1
    trap '' INT TERM  # a second signal must not cut the drain short
    # the service first: it drains while the gateway can still deliver its streams
    if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then
        kill -TERM "$server" 2>/dev/null || true
        wait "$server" && server_rc=0 || server_rc=$?
    fi
    for pid in $memd $gateway; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap stop_all INT TERM

server_rc=""
"$(tool autoglm-server)" --host "$HOST" --port "$PORT" --control-socket "$CONTROL_SOCKET" \
    --port-file "$PORT_FILE" --metrics-port "$METRICS_PORT" \
    --grace-period "$GRACE_PERIOD" "$@" &
server=$!
say "service pid $server (first start of the embedded model converts it, ~30 s)"

port_file_says() { [ -s "$PORT_FILE" ] && grep -Eq "$1" "$PORT_FILE"; }
wait_for() {  # wait_for PATTERN: until the port file matches, the service exits, or time runs out
    local deadline=$((SECONDS + START_TIMEOUT))
    until port_file_says "$1"; do
        [ "$stopping" = 0 ] || return 1
        kill -0 "$server" 2>/dev/null || { say "the service exited before serving"; return 1; }
        [ "$SECONDS" -lt "$deadline" ] || { say "not serving after ${START_TIMEOUT}s"; return 1; }
        sleep 0.2
    done
}

start_helpers() {
    local grpc_port
    grpc_port="$(sed -E 's/.*"port": *([0-9]+).*/\1/' "$PORT_FILE")"
    if [ "$WITH_MEMD" = 1 ]; then
        local memd_args=(--probe "$MEMD_PROBE" --control "unix://$CONTROL_SOCKET")
        if [ "$MEMD_PROBE" = host ]; then
            memd_args+=(--pid "$server" --pid-file "$PORT_FILE"
                        --host-budget-bytes "$HOST_BUDGET_BYTES")
        fi
        "$(tool autoglm-memd)" "${memd_args[@]}" &
        memd=$!
    fi
    if [ "$WITH_GATEWAY" = 1 ]; then
        "$(tool autoglm-gateway)" --host "$GATEWAY_HOST" --port "$GATEWAY_PORT" \
            --grpc-target "127.0.0.1:$grpc_port" &
        gateway=$!
    fi
    say "gRPC port $grpc_port, control $CONTROL_SOCKET, daemon ${memd:+probe $MEMD_PROBE}," \
        "gateway ${gateway:+http://$GATEWAY_HOST:$GATEWAY_PORT}"
}

if wait_for '"port"' && { start_helpers; wait_for '"serving": *true'; }; then
    say "serving"
    # until a signal arrives (wait returns >128 and the trap runs) or a process exits
    while [ "$stopping" = 0 ]; do
        wait -n $server $memd $gateway && rc=0 || rc=$?
        [ "$stopping" = 0 ] || break
        if ! kill -0 "$server" 2>/dev/null; then
            wait "$server" && server_rc=0 || server_rc=$?
            say "the service exited ($server_rc)"
            server=""
        else
            say "the memory daemon or the gateway exited ($rc)"
            helper_failed=1
        fi
        stop_all
    done
elif [ "$stopping" = 0 ]; then
    start_failed=1
    stop_all
fi

# reap everything; a helper stopped by our SIGTERM exits 0 (or 143: killed by it)
for pid in $memd $gateway; do
    wait "$pid" && rc=0 || rc=$?
    if [ "$rc" != 0 ] && [ "$rc" != 143 ]; then helper_failed=1; fi
done
if [ -n "$server" ] && [ -z "$server_rc" ]; then wait "$server" && server_rc=0 || server_rc=$?; fi
say "stopped (service exit ${server_rc:-none})"
if [ "${server_rc:-0}" != 0 ]; then exit "$server_rc"; fi
if [ -n "${start_failed:-}" ] || [ -n "${helper_failed:-}" ]; then exit 1; fi
exit 0
