#!/usr/bin/env bash
# Issue 13's two-GPU runs as one script for a 30-minute `nvidia-h200-x2` session: stages that each write their
# JSON as they go (multigpu.py writes after every run), with the trainer's defaults (compiled on CUDA).
#
#   OUT=runs/perf bash benchmarks/h200_perf.sh [STAGE ...]        # from the repository root
#
# Stages (without arguments: one2k two2k largest, ~20 min by their limits):
#   one2k, one1k  the 1-GPU runs at 64 x 2048 (or 32 x 1024) tokens a step: DIFF on GPU 0 and the baseline on
#                 GPU 1 at once (the timed steps of one overlap the other's compile at most; check step_seconds)
#   two2k, two1k  both GPUs, each model in turn: DDP and FSDP2 (train.fsdp_reshard auto, and never with all ten
#                 blocks as one unit) against that model's 1-GPU run (--reuse-one-gpu)
#   largest       paper-6.8b (6.52B parameters with this vocabulary) under FSDP2, its final checkpoint (78 GB)
#                 timed, then under DDP (16 bytes a parameter: 104 GB a GPU before activations)
# Each command has its own time limit, so a slow one cannot eat the session; a stopped command keeps what it
# had written. Results: $OUT/multigpu-<shape>-<model>.json and $OUT/multigpu-largest.json.
set -uo pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's package first
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
shape() {  # shape 1k|2k MODEL: multigpu.py's arguments for that shape and model (each model its own work folder)
  local k=$1 m=$2
  if [ "$k" = 2k ]; then echo --steps 30 --skip 10 --batch-size 64 --seq-len 2048; else echo --steps 50 --skip 15; fi
  echo --models "$m" --work-dir "$OUT/mg-$k-$m" --out "$OUT/multigpu-$k-$m.json"
}
MG=("$PY" benchmarks/multigpu.py --part scaling --compile --timeout 240)
one() {
  (CUDA_VISIBLE_DEVICES=0 run 240 "one$1-diff" "${MG[@]}" $(shape "$1" diff) --two-gpu none) &
  (CUDA_VISIBLE_DEVICES=1 run 240 "one$1-baseline" "${MG[@]}" $(shape "$1" baseline) --two-gpu none) &
  wait
}
two() {
  for m in diff baseline; do
    run 330 "two$1-$m" "${MG[@]}" $(shape "$1" "$m") --reuse-one-gpu --two-gpu ddp,fsdp --fsdp auto,never/10
  done
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(one2k two2k largest)
for s in "${stages[@]}"; do
  case $s in
    one1k|one2k) one "${s#one}" ;;
    two1k|two2k) two "${s#two}" ;;
    largest) run 540 largest "$PY" benchmarks/multigpu.py --part largest --layouts paper-6.8b --timeout 420 \
      --work-dir "$OUT/mg-large" --out "$OUT/multigpu-largest.json" ;;
    *) echo "unknown stage $s (one1k, one2k, two1k, two2k, largest)" >&2; exit 2 ;;
  esac
done
log "all done"
