#!/usr/bin/env bash
# Sourced by the other scripts: create $VENV (default .venv), keep a torch that is already importable
# (else install the CPU build torch==2.13.0; an unpinned torch would pull a CUDA build), then install
# this package editable with the extras given as arguments. Leaves $PY set to the venv's python.
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >/dev/null
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[$1]"
