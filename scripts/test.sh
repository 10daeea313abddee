#!/usr/bin/env bash
# Set up a virtual environment (keeping a torch that is already importable) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >/dev/null
# torch==2.13.0 is a CPU build on the project's machines; an unpinned torch would pull a CUDA build.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[test,triton,hf,data,plots]"
# The Triton kernels are tested on the CPU through Triton's interpreter.
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
exec "$PY" -m pytest -q "$@"
