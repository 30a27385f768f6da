#!/usr/bin/env bash
# Creates .venv and installs rmserve with the server and dev extras.
# CPU torch goes first, from the exact pin: a bare `torch` requirement would
# otherwise pull the multi-GB CUDA build on machines without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then python -m pip install -q torch; else python -m pip install -q torch==2.13.0; fi
fi
python -m pip install -q -e ".[dev]"
# The fixed-order CPU attention kernel, compiled for this machine now rather than at the first
# model load (~10 s). Without a C++ compiler the engine serves sdpa instead; setup goes on.
python -m rmserve.kernels.cpu_attention || echo "CPU attention kernel not built (see above): sdpa will serve" >&2
