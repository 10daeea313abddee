#!/usr/bin/env bash
# Set up a virtual environment (keeping a torch that is already importable) and run the embedded
# default comparison: DIFF vs baseline, preset tiny, built-in corpus, 3 seeds (~10 minutes on 2 CPU cores).
# Extra arguments go to `diff-transformer compare` (e.g. --seeds 1 --out runs/quick).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh "plots"
exec "$VENV/bin/diff-transformer" compare "$@"
