#!/usr/bin/env bash
# Regenerates the committed gRPC stubs from protos/rmserve/v1/*.proto.
# tests/test_protos.py fails when the committed stubs differ from a fresh run.
# PYTHON picks the interpreter (default: python on PATH, e.g. the activated .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-protos}"
"${PYTHON:-python}" -m grpc_tools.protoc -I protos --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" protos/rmserve/v1/*.proto
