#!/usr/bin/env bash
# Regenerates the Python stubs from kv_handoff.proto. The stubs are committed and never edited by hand.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
"$python" -m grpc_tools.protoc -I "$root" --python_out="$root" --grpc_python_out="$root" --pyi_out="$root" \
  "kv_transfer/protos/kv_handoff.proto"
