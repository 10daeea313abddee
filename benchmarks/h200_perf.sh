#!/usr/bin/env bash
# Issue 13's GPU runs still missing from benchmarks/NOTES.md, as stages that each write their JSON as they go,
# for one 30-minute session on `nvidia-h200-x2` (the train config's compile default: compiled on CUDA).
#
#   OUT=runs/perf bash benchmarks/h200_perf.sh [STAGE ...]        # from the repository root
#
# Stages (all of them, in this order, without arguments; ~25 min of the two GPUs by their limits):
#   parallel  the GPUs apart: GPU 0 runs the 1-GPU runs of both models at `base`, 32 x 1024 and 64 x 2048
#             tokens a step (multigpu.py --two-gpu none); GPU 1 rebuilds the `auto` table (its inference rows
#             were timed with autograd recording in session 5)
#   two1k     both GPUs: DDP and FSDP2 (blocks a unit 1, 5 and 10: the host-bound check) at 32 x 1024 against
#             the 1-GPU runs of `parallel` (--reuse-one-gpu)
#   two2k     the same at 64 x 2048 tokens a step: four times the GPU work a step for the same host work
#   largest   paper-6.8b under FSDP2 (8.1B parameters with this vocabulary; its final checkpoint, ~97 GB, is
#             timed), then under DDP (expected out of memory: 16 bytes a parameter are 121 GiB)
# Each command has its own time limit (the first argument of run), so a slow one cannot eat the session; a
# stopped command keeps what it had written. Results go to $OUT/*.json; copy the ones to keep into
# benchmarks/results/.
set -uo pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's package first
OUT=${OUT:-runs/perf}
PY=${PYTHON:-python3}  # the interpreter that has torch (plain python3 on the project's GPU machines)
mkdir -p "$OUT/mg-1k" "$OUT/mg-2k"
[ -e "$OUT/mg-2k/cache" ] || ln -s ../mg-1k/cache "$OUT/mg-2k/cache"  # one token cache for both shapes
LOG=$OUT/perf.log
log() { echo "[$(date +%T)] $*" >> "$LOG"; }
run() {  # run LIMIT NAME CMD...: one command, its output in $OUT/NAME.log
  local limit=$1 name=$2; shift 2
  log "$name start"
  timeout -s TERM "$limit" "$@" > "$OUT/$name.log" 2>&1
  log "$name rc=$?"
}
MG=("$PY" benchmarks/multigpu.py --part scaling --compile --timeout 240)
K1=(--steps 50 --skip 15 --batch-size 32 --seq-len 1024 --work-dir "$OUT/mg-1k" --out "$OUT/multigpu-1k.json")
K2=(--steps 30 --skip 10 --batch-size 64 --seq-len 2048 --work-dir "$OUT/mg-2k" --out "$OUT/multigpu-2k.json")

gpu0() {
  export CUDA_VISIBLE_DEVICES=0
  run 200 one1k "${MG[@]}" "${K1[@]}" --two-gpu none
  run 120 one2k "${MG[@]}" "${K2[@]}" --two-gpu none
}

gpu1() {
  export CUDA_VISIBLE_DEVICES=1
  run 240 auto-build "$PY" benchmarks/attention.py --auto-table --write-table src/diff_transformer/attention/auto_table.json \
    --out "$OUT/auto-table-build.json"
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(parallel two1k two2k largest)
for s in "${stages[@]}"; do
  case $s in
    parallel) (gpu0) & (gpu1) & wait ;;
    gpu0|gpu1) ($s) ;;
    two1k) run 420 two1k "${MG[@]}" "${K1[@]}" --reuse-one-gpu --two-gpu ddp,fsdp --fsdp auto,auto/5,never/10 ;;
    two2k) run 240 two2k "${MG[@]}" "${K2[@]}" --reuse-one-gpu --two-gpu ddp,fsdp --fsdp auto/5 ;;
    largest) run 420 largest "$PY" benchmarks/multigpu.py --part largest --layouts paper-6.8b --timeout 400 \
      --work-dir "$OUT/mg-3" --out "$OUT/multigpu-largest.json" ;;
    *) echo "unknown stage $s (parallel, gpu0, gpu1, two1k, two2k, largest)" >&2; exit 2 ;;
  esac
done
log "all done"
