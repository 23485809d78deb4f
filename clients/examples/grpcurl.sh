#!/usr/bin/env bash
# A grpcurl walkthrough of autoglm-serve's public API, using server reflection.
#
#   clients/examples/grpcurl.sh [IMAGE_FILE]
#
# Target: $AUTOGLM_TARGET, else 127.0.0.1:$AUTOGLM_PORT (default 50051). Without IMAGE_FILE a
# small PNG is built on the fly (python3 standard library only). Needs grpcurl and base64.
set -euo pipefail

TARGET="${AUTOGLM_TARGET:-127.0.0.1:${AUTOGLM_PORT:-50051}}"
SERVICE=autoglm.inference.v1.InferenceService
IMAGE_FILE="${1:-}"

step() { printf '\n== %s\n' "$*" >&2; }

# A 32x32 PNG with a red-to-blue gradient, written to stdout.
make_png() {
  python3 - <<'PY'
import struct, sys, zlib

def chunk(kind, data):
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

size = 32
rows = b"".join(
    b"\x00" + bytes(c for x in range(size) for c in (255 - 8 * x, 0, 8 * x))
    for _ in range(size)
)
header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
sys.stdout.buffer.write(
    b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
    + chunk(b"IEND", b"")
)
PY
}

step "services exposed by reflection"
grpcurl -plaintext "$TARGET" list

step "the inference service and its request message"
grpcurl -plaintext "$TARGET" describe "$SERVICE"
grpcurl -plaintext "$TARGET" describe autoglm.inference.v1.GenerateRequest

step "health (overall, then the inference service)"
grpcurl -plaintext -d '{"service": ""}' "$TARGET" grpc.health.v1.Health/Check
grpcurl -plaintext -d "{\"service\": \"$SERVICE\"}" "$TARGET" grpc.health.v1.Health/Check

step "model info"
grpcurl -plaintext -d '{}' "$TARGET" "$SERVICE/GetModelInfo"

if [[ -n "$IMAGE_FILE" ]]; then
  IMAGE_B64="$(base64 < "$IMAGE_FILE" | tr -d '\n')"
  MIME_TYPE=""  # empty: the server sniffs the format
else
  IMAGE_B64="$(make_png | base64 | tr -d '\n')"
  MIME_TYPE="image/png"
fi

# bytes fields are base64 in protobuf JSON; the body goes through stdin (-d @) so that
# large images do not hit the shell's argument length limit.
REQUEST_JSON=$(cat <<JSON
{
  "messages": [
    {"role": "ROLE_SYSTEM", "parts": [{"text": "You describe images in one sentence."}]},
    {"role": "ROLE_USER", "parts": [
      {"text": "What is in this picture?"},
      {"image": {"data": "$IMAGE_B64", "mimeType": "$MIME_TYPE"}}
    ]}
  ],
  "sampling": {"maxNewTokens": 32, "temperature": 0},
  "sessionId": "grpcurl-demo"
}
JSON
)

step "count the prompt's tokens"
grpcurl -plaintext -d @ "$TARGET" "$SERVICE/CountTokens" <<JSON
{"messages": [{"role": "ROLE_USER", "parts": [{"text": "What is in this picture?"},
  {"image": {"data": "$IMAGE_B64", "mimeType": "$MIME_TYPE"}}]}]}
JSON

step "generate (server streaming: one JSON object per message, the last has 'final')"
grpcurl -plaintext -max-msg-sz 67108864 -H 'x-request-id: grpcurl-demo-1' \
  -d @ "$TARGET" "$SERVICE/Generate" <<<"$REQUEST_JSON"

step "end the session"
grpcurl -plaintext -d '{"sessionId": "grpcurl-demo"}' "$TARGET" "$SERVICE/EndSession"

# The control API: a Unix socket (0600, the service's user), reflected like the public
# port, so grpcurl needs no .proto files there either. Set AUTOGLM_CONTROL_SOCKET to run it.
CONTROL_SOCKET="${AUTOGLM_CONTROL_SOCKET:-}"
if [[ -n "$CONTROL_SOCKET" ]]; then
  step "control socket: services exposed by reflection, then the memory account"
  grpcurl -plaintext -unix "$CONTROL_SOCKET" list
  grpcurl -plaintext -unix -d '{}' "$CONTROL_SOCKET" \
    autoglm.control.v1.ControlService/GetMemoryStatus
else
  cat >&2 <<'NOTE'

The control API listens on a Unix socket and serves reflection too (every RPC: the
grpcurl recipes in docs/operations.md); set AUTOGLM_CONTROL_SOCKET to include it here:
  grpcurl -plaintext -unix /tmp/autoglm-control.sock list
  grpcurl -plaintext -unix -d '{}' /tmp/autoglm-control.sock \
    autoglm.control.v1.ControlService/GetMemoryStatus
NOTE
fi
