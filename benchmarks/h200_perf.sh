#!/usr/bin/env bash
# The GPU runs still missing from benchmarks/NOTES.md (issue 11's speed targets, issue 13's multi-GPU ones),
# as stages that each write their JSON as they go, for one 30-minute session on `nvidia-h200-x2`.
#
#   OUT=runs/perf bash benchmarks/h200_perf.sh [STAGE ...]        # from the repository root
#
# Stages (all of them, in this order, without arguments; at most ~23 min of the two GPUs by the limits):
#   gpu1     on GPU 1 alone: the `auto` table again (build, then check; session 5 timed its inference rows with
#            autograd recording), then attention.py --model-only
#   gpu0     on GPU 0 alone, meanwhile: the trainer's compiled speed for both models at `base` 1K, one GPU
#            (multigpu.py --part scaling --compile --two-gpu none: the 1-GPU runs only)
#   both     after gpu0 and gpu1: FSDP2 compiled against one GPU for both models (the compile default), with
#            reshard settings and 1, 5 and 10 blocks a unit (the host-bound check); multigpu.py writes after
#            every run, so a stopped command keeps its runs; then paper-6.8b under FSDP2, and DDP (expected
#            out of memory: 8.1B parameters, 121 GiB before activations)
# Each command has its own time limit (the first argument of run), so a slow one cannot eat the session; a stopped
# command keeps what it had written. Results go to $OUT/*.json; copy the ones to keep into benchmarks/results/.
set -uo pipefail
# This checkout's package first: the auto check must read the table the build stage just wrote.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-runs/perf}
PY=${PYTHON:-python3}  # the interpreter that has torch (plain python3 on the project's GPU machines)
mkdir -p "$OUT"
LOG=$OUT/perf.log
log() { echo "[$(date +%T)] $*" >> "$LOG"; }
run() {  # run LIMIT NAME CMD...: one command, its output in $OUT/NAME.log
  local limit=$1 name=$2; shift 2
  log "$name start"
  timeout -s TERM "$limit" "$@" > "$OUT/$name.log" 2>&1
  log "$name rc=$?"
}

gpu1() {
  export CUDA_VISIBLE_DEVICES=1
  run 240 auto-build "$PY" benchmarks/attention.py --auto-table --write-table src/diff_transformer/attention/auto_table.json \
    --out "$OUT/auto-table-build.json"
  run 180 auto-check "$PY" benchmarks/attention.py --auto-table --out "$OUT/auto-table-check.json"
  run 180 attention-model "$PY" benchmarks/attention.py --model-only --out "$OUT/attention-model.json"
}

gpu0() {
  export CUDA_VISIBLE_DEVICES=0
  run 300 compile-1gpu "$PY" benchmarks/multigpu.py --part scaling --compile --two-gpu none --steps 50 --skip 15 \
    --work-dir "$OUT/mg-1" --out "$OUT/multigpu-compile-1gpu.json"
}

both() {
  unset CUDA_VISIBLE_DEVICES
  run 420 multigpu-compile "$PY" benchmarks/multigpu.py --part scaling --compile --two-gpu ddp,fsdp \
    --fsdp auto,never,auto/5,never/10 --steps 50 --skip 15 --work-dir "$OUT/mg-2" --out "$OUT/multigpu-compile.json"
  run 360 multigpu-largest "$PY" benchmarks/multigpu.py --part largest --layouts paper-6.8b \
    --work-dir "$OUT/mg-3" --out "$OUT/multigpu-largest.json"
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(parallel both)
for s in "${stages[@]}"; do
  case $s in
    parallel) (gpu0) & (gpu1) & wait ;;
    gpu0|gpu1|both) ($s) ;;
    *) echo "unknown stage $s (gpu0, gpu1, both, parallel)" >&2; exit 2 ;;
  esac
done
log "all done"
