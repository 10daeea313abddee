#!/usr/bin/env bash
# Sourced by the other scripts: create $VENV (default .venv), keep a torch that is already importable
# (else install the CPU build torch==2.13.0; an unpinned torch would pull a CUDA build), then install
# this package editable with the extras given as arguments. Leaves $PY set to the venv's python.
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  # A python3 that already imports torch lends it to the venv (--system-site-packages): a plain venv
  # cannot see it and would download and write a second torch (most of the ~1.9 GB a fresh clone's
  # compare.sh wrote before, and a minute or two of its time).
  if python3 -c "import torch" 2>/dev/null; then
    python3 -m venv --system-site-packages "$VENV"
  else
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null  # once, when the venv is made
fi
PY="$VENV/bin/python"
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[$1]"
