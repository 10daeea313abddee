#!/usr/bin/env bash
# The H200 runs behind docs/ablations.md and docs/results.md, in priority order, as resumable sweeps.
#
#   R=runs/h200 bash benchmarks/h200_pipeline.sh        # from the repository root, on one GPU
#
# Lanes run at once on the one GPU (several small trainings share it; `sweep --jobs`), the tiny CPU
# grid on the host's cores beside them. Rerunning continues every sweep where it stopped. Settings:
# - "34M shape": preset small (8 layers, width 512, 8 heads of 64; 34.1M parameters with vocab 8192) at
#   seq 512, batch 32 x 512 tokens, 10M tokens (610 steps), lr 1.5e-3 (the paper's), 100 warmup steps,
#   cosine to 0.1, on the built-in `library` corpus (6.76M tokens: 10M tokens is 1.5 epochs);
# - retrieval pair: preset small at seq 1024, 20M tokens, data.mix=needle:0.1, then every evaluation task.
set -uo pipefail
R=${R:-runs/h200}
CACHE=$R/cache
DT=(python -m diff_transformer.cli)
GPU_JOBS=${GPU_JOBS:-5}
export OMP_NUM_THREADS=1  # every training process single-threaded on the host: 2 GPU lanes + 4 CPU runs share 16 cores
# Evaluation of the retrieval pair: every task of `--task all`, plus icl and zero-shot when their data is
# given (ICL_DATA: a TREC folder as in the icl task's docs; ZS_DATA: the zero-shot validation sets).
EVAL_TASKS=all; EVAL_OPTS=()
[ -n "${ICL_DATA:-}" ] && { EVAL_TASKS+=,icl; EVAL_OPTS+=(dataset=$ICL_DATA format=trec); }
[ -n "${ZS_DATA:-}" ] && { EVAL_TASKS+=,zero-shot; EVAL_OPTS+=(data_dir=$ZS_DATA limit=${ZS_LIMIT:-500}); }
mkdir -p "$R"
S34=(seq_len=512 batch_size=32 tokens=10000000 lr=1.5e-3 warmup_steps=100 eval_every=50 eval_batches=10
     ckpt_every=0 log_every=10 data.source=library)
NORM_GRID=baseline,baseline-norm,baseline-norm-matched,diff-no-norm,diff,diff-norm-matched
OTHERS=diff-v2,baseline-wide,diff-norm-no-scale,diff-lambda-0.8,diff-lambda-0.5,diff-lambda-fixed,diff-lambda-zero,diff-16h,baseline-16h,softmax-plus-one,temperature,sigmoid,gated,baseline-alibi,diff-alibi,baseline-nope,diff-nope

sweep() { "${DT[@]}" sweep --no-progress --data-cache "$CACHE" "$@"; }
log() { echo "[$(date +%T)] $*" >> "$R/pipeline.log"; }

# Data first, once (BPE + shards of `library`), so the lanes do not wait on the cache lock together.
log "prepare"; sweep --preset small --set "${S34[@]}" tokens=16384 --variants baseline --seeds 0 --out "$R/warmup" >> "$R/pipeline.log" 2>&1

lane_tiny_cpu() {  # the small-scale grid at `tiny` on the CPU (compare's default budget), both inits
  for init in hf official; do
    log "tiny-$init start"
    CUDA_VISIBLE_DEVICES= sweep --preset tiny --set train.device=cpu model.init=$init --variants $NORM_GRID \
      --seeds 1 2 3 --jobs 4 --out "$R/tiny-grid-$init" >> "$R/pipeline.log" 2>&1
    log "tiny-$init done"
  done
}

lane_a() {  # hf init grid, then the retrieval pair and its evaluations, then the other variants (seed 1)
  log "grid34-hf start"
  sweep --preset small --set "${S34[@]}" --variants $NORM_GRID --seeds 1 2 3 --jobs $GPU_JOBS --gpus 0 \
    --out "$R/grid34-hf" >> "$R/pipeline.log" 2>&1
  log "retrieval start"
  sweep --preset small --set seq_len=1024 batch_size=32 tokens=20000000 lr=1.5e-3 warmup_steps=100 eval_every=50 \
    eval_batches=10 ckpt_every=0 data.source=library data.mix=needle:0.1 --variants baseline,diff,diff-norm-matched \
    --seeds 1 2 3 --jobs $GPU_JOBS --gpus 0 --out "$R/retrieval" >> "$R/pipeline.log" 2>&1
  log "evals start"
  for run in "$R"/retrieval/*/seed_*; do
    "${DT[@]}" eval "$run" --task $EVAL_TASKS ${EVAL_OPTS[@]/#/--opt } --device cuda --no-progress --data-cache "$CACHE" >> "$R/evals.log" 2>&1 &
    while [ "$(jobs -rp | wc -l)" -ge 3 ]; do sleep 2; done
  done
  wait
  log "evals done"
  sweep --preset small --set "${S34[@]}" --variants baseline,$OTHERS --seeds 1 --jobs $GPU_JOBS --gpus 0 \
    --out "$R/variants34-s1" >> "$R/pipeline.log" 2>&1
  log "variants34-s1 done"
}

lane_b() {  # official init grid, then a per-arm learning-rate sweep, then token budgets
  log "grid34-official start"
  sweep --preset small --set "${S34[@]}" model.init=official --variants $NORM_GRID --seeds 1 2 3 --jobs $GPU_JOBS \
    --gpus 0 --out "$R/grid34-official" >> "$R/pipeline.log" 2>&1
  log "lr34 start"
  sweep --preset small --set "${S34[@]}" --variants baseline,diff,diff-norm-matched --lrs 7.5e-4 3e-3 --seeds 1 \
    --jobs $GPU_JOBS --gpus 0 --out "$R/lr34" >> "$R/pipeline.log" 2>&1
  log "budget34-30M start"
  sweep --preset small --set "${S34[@]}" tokens=30000000 --variants baseline,diff,diff-norm-matched --seeds 1 \
    --jobs 3 --gpus 0 --out "$R/budget34-30M" >> "$R/pipeline.log" 2>&1
  log "budget34-100M start"
  sweep --preset small --set "${S34[@]}" tokens=100000000 --variants baseline,diff,diff-norm-matched --seeds 1 \
    --jobs 3 --gpus 0 --out "$R/budget34-100M" >> "$R/pipeline.log" 2>&1
  log "lane b done"
}

lane_tiny_cpu & lane_a & lane_b & wait
log "all done"
