#!/usr/bin/env bash
# Set up a virtual environment (keeping a torch that is already importable) and run the embedded
# default comparison: DIFF vs baseline, preset tiny, built-in corpus, 3 seeds (~10 minutes on 2 CPU cores).
# Extra arguments go to `diff-transformer compare` (e.g. --seeds 1 --out runs/quick).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >/dev/null
# torch==2.13.0 is a CPU build on the project's machines; an unpinned torch would pull a CUDA build.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[plots]"
exec "$VENV/bin/diff-transformer" compare "$@"
