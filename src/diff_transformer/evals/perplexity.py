"""``perplexity``: validation loss and perplexity on the run's fixed validation windows.

The windows are those of ``diff-transformer eval`` and of training's evaluations (the run's
``seq_len``, ``batch_size`` and ``eval_batches``; ``--opt seq_len=N batches=N batch_size=N``).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..train.evaluate import validation_loss
from .base import EvalContext, register
from .common import positive, pyplot, require_data, run_config, save_figure


def window_settings(ctx: EvalContext) -> tuple[int, int, int]:
    """(batch_size, seq_len, batches) of the validation windows: the run's, or options, or defaults."""
    run = run_config(ctx)
    batch_size, seq_len, batches = (run.train.batch_size, run.train.seq_len, run.train.eval_batches) if run else (
        8, min(ctx.model.config.max_seq_len, 512), 20)
    batch_size = positive("batch_size", ctx.option("batch_size", batch_size))
    seq_len = positive("seq_len", ctx.option("seq_len", seq_len))
    batches = positive("batches", ctx.option("batches", batches))
    if seq_len > ctx.model.config.max_seq_len:
        from ..errors import UserError

        raise UserError(f"--opt seq_len={seq_len} exceeds the model's max_seq_len {ctx.model.config.max_seq_len}")
    return batch_size, seq_len, batches


def val_loss(ctx: EvalContext) -> tuple[float, int]:
    """(mean validation cross-entropy in nats/token, tokens scored); honours an active attention probe."""
    require_data(ctx, "perplexity")
    batch_size, seq_len, batches = window_settings(ctx)
    return validation_loss(ctx.model, ctx.val_tokens, batch_size, seq_len, batches, ctx.device, ctx.amp)


def run(ctx: EvalContext) -> dict:
    batch_size, seq_len, batches = window_settings(ctx)
    loss, tokens = val_loss(ctx)
    ppl = math.exp(min(loss, 700.0))
    return {"summary": {"val_loss": loss, "val_ppl": ppl}, "val_loss": loss, "val_ppl": ppl, "tokens": tokens,
            "batch_size": batch_size, "seq_len": seq_len, "batches": batches}


def plot(results: list[tuple[str, dict]], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(results) + 2), 3.5))
    labels = [label for label, _ in results]
    ax.bar(range(len(results)), [r["val_loss"] for _, r in results], color="tab:blue")
    ax.set_xticks(range(len(results)), labels, rotation=20, ha="right")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss")
    save_figure(fig, path)


register("perplexity", run, plot, description="validation loss and perplexity on the run's validation windows",
         options=("batch_size", "seq_len", "batches"))
