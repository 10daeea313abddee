#!/usr/bin/env bash
# The GPU runs still missing from benchmarks/NOTES.md (issue 11's speed targets, issue 13's multi-GPU ones),
# as stages that each write their JSON as they go, for one 30-minute session on `nvidia-h200-x2`.
#
#   OUT=runs/perf bash benchmarks/h200_perf.sh [STAGE ...]        # from the repository root
#
# Stages (all of them, in this order, without arguments; at most 22.5 min of the two GPUs by the limits):
#   gpu1     on GPU 1 alone, one after another: the `auto` table (build, then check), attention.py --model-only
#   gpu0     on GPU 0 alone, meanwhile: train_throughput.py compiled at the shapes not yet run compiled, eager
#            and compiled at base-4k (the memory ratio after the RMSNorm change), then decode.py with HF rows
#   both     after gpu0 and gpu1: multigpu.py --part largest (paper-1.4b, paper-2.8b), then --part scaling
#            with --profile 10 (the FSDP2 host-bound check)
# Each command has its own time limit (LIMIT_* below), so a slow one cannot eat the session; a stopped
# command keeps what it had written. Results go to $OUT/*.json; copy the ones to keep into benchmarks/results/.
set -uo pipefail
# This checkout's package first: the auto check must read the table the build stage just wrote.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-runs/perf}
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
  run 240 auto-build python benchmarks/attention.py --auto-table --write-table src/diff_transformer/attention/auto_table.json \
    --out "$OUT/auto-table-build.json"
  run 180 auto-check python benchmarks/attention.py --auto-table --out "$OUT/auto-table-check.json"
  run 180 attention-model python benchmarks/attention.py --model-only --out "$OUT/attention-model.json"
}

gpu0() {
  export CUDA_VISIBLE_DEVICES=0
  run 360 throughput-compiled python benchmarks/train_throughput.py --warmup 3 --steps 10 --modes compiled \
    --shapes 542m-4k base-4k small-1k --out "$OUT/train-throughput-compiled.json"
  run 90 throughput-base4k-eager python benchmarks/train_throughput.py --warmup 3 --steps 10 --modes eager \
    --shapes base-4k --out "$OUT/train-throughput-base4k-eager.json"
  run 240 decode python benchmarks/decode.py --batches 1 32 --prompt 512 --new 64 --repeats 2 --out "$OUT/decode.json"
}

both() {
  unset CUDA_VISIBLE_DEVICES
  run 360 multigpu-largest python benchmarks/multigpu.py --part largest --layouts paper-1.4b,paper-2.8b \
    --work-dir "$OUT/mg" --out "$OUT/multigpu-largest.json"
  run 300 multigpu-profile python benchmarks/multigpu.py --part scaling --steps 60 --skip 20 --profile 10 \
    --work-dir "$OUT/mg" --out "$OUT/multigpu-profile.json"
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
