#!/usr/bin/env bash
# Set up a virtual environment (keeping a torch that is already importable) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh "test,triton,hf,data,plots,corpus,eval"
# The Triton kernels are tested on the CPU through Triton's interpreter.
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
exec "$PY" -m pytest -q "$@"
