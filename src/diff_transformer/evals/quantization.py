"""``quantization``: validation loss and needle accuracy with the attention logits quantized (Figure 8).

Dynamic post-training quantization of the attention logits just before the softmax (both branches
of DIFF), through the attention probe: symmetric absmax, round to nearest, ``bits`` in 16, 8, 6, 4
(``--opt bits=16,8,6,4``). Granularity (``--opt granularity=row|head``):

- ``row`` (default): one scale per query row per head over its visible keys;
- ``head``: one scale per (batch row, head) over every visible entry of the N×M map.

``scale = absmax / (2^(bits-1) − 1)``, ``q = clamp(round(x / scale), ±(2^(bits-1) − 1)) · scale``;
masked entries stay -inf. ``full`` is the same reference path unquantized (fp32 logits).

At each width: validation loss (the perplexity task's windows; ``batch_size``, ``seq_len``,
``batches`` options) and the needle task's scores (its options; by default only the model's full
context, ``--opt needle=false`` to skip). Zero-shot accuracy at each width: ``--opt zero_shot=true``
calls ``evals/zero_shot.py``'s ``score_model(ctx) -> dict`` under each width (the hook another task
provides).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..attention.probe import AttentionProbe
from ..errors import UserError
from . import needle, perplexity
from .base import EvalContext, register
from .common import int_list, probing, pyplot, require_data, require_probe_support, save_figure

GRANULARITIES = ("row", "head")


def absmax_quantize(logits: Tensor, bits: int, mask: Tensor | None = None, granularity: str = "row") -> Tensor:
    """Fake-quantize (B, H, N, M) logits to signed ``bits``-bit integers times an absmax scale.

    ``mask`` (N, M) bool marks the visible entries (None: every finite entry); the others become -inf.
    """
    visible = torch.isfinite(logits) if mask is None else mask.expand_as(logits) & torch.isfinite(logits)
    x = logits.masked_fill(~visible, 0.0)
    dims = (-1,) if granularity == "row" else (-2, -1)
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=dims, keepdim=True) / qmax  # (B, H, N, 1) or (B, H, 1, 1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (x / safe).round().clamp(-qmax, qmax) * safe
    return q.masked_fill(~visible, float("-inf"))


def quantizer(bits: int, granularity: str):
    return lambda logits, mask: absmax_quantize(logits, bits, mask, granularity)


def zero_shot_scorer(ctx: EvalContext):
    """The zero-shot hook: with ``--opt zero_shot=true``, ``evals/zero_shot.py``'s ``score_model(ctx) -> dict``
    (called once per width, under the quantizing probe), else None."""
    if not ctx.option("zero_shot", False):
        return None
    try:
        mod = importlib.import_module(f"{__package__}.zero_shot")
    except ImportError:
        mod = None
    fn = getattr(mod, "score_model", None)
    if fn is None:
        raise UserError("--opt zero_shot=true needs the zero-shot task (evals/zero_shot.py with score_model(ctx))")
    return fn


def run(ctx: EvalContext) -> dict:
    require_probe_support(ctx, "quantization")
    require_data(ctx, "quantization")
    bits_list = int_list(ctx, "bits", [16, 8, 6, 4])
    if any(not 2 <= b <= 24 for b in bits_list):
        raise UserError(f"--opt bits={ctx.options.get('bits')}: widths must lie in [2, 24]")
    granularity = ctx.option("granularity", "row")
    if granularity not in GRANULARITIES:
        raise UserError(f"--opt granularity={granularity!r}: use one of {', '.join(GRANULARITIES)}")
    with_needle = ctx.option("needle", True)
    needle_cfg = needle.settings(ctx)
    if "contexts" not in ctx.options:
        needle_cfg["contexts"] = [ctx.model.config.max_seq_len]
    zero_shot = zero_shot_scorer(ctx)

    def measure(label: str, transform) -> dict:
        with probing(ctx.model, AttentionProbe(logits_transform=transform)):
            loss, _ = perplexity.val_loss(ctx)
            row = {"bits": label, "val_loss": loss}
            if with_needle:
                scores = needle.evaluate_needles(ctx, **needle_cfg, desc=f"needle @ {label} bits")
                row.update({f"needle_{k}": v for k, v in scores["summary"].items()})
            if zero_shot is not None:
                row["zero_shot"] = zero_shot(ctx)
        return row

    full = measure("full", None)
    rows = [measure(str(b), quantizer(b, granularity)) for b in bits_list]
    summary = {"val_loss_full": full["val_loss"]}
    for row in rows:
        summary[f"val_loss_{row['bits']}bit"] = row["val_loss"]
        if with_needle:
            summary[f"needle_rank_acc_{row['bits']}bit"] = row["needle_rank_acc"]
    return {
        "summary": summary,
        "granularity": granularity,
        "scheme": "symmetric absmax, round to nearest, dynamic; "
                  + ("one scale per query row per head over its visible keys" if granularity == "row"
                     else "one scale per batch row and head over all visible entries"),
        "bits": bits_list, "full": full, "by_bits": rows,
        "needle_settings": needle_cfg if with_needle else None,
    }


def plot(results: list[tuple[str, dict]], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    metrics = [m for m in ("val_loss", "needle_rank_acc", "needle_exact_acc")
               if any(r["full"].get(m) is not None for _, r in results)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for label, r in results:
            rows = [r["full"], *r["by_bits"]]
            ys = [np.nan if row.get(m) is None else row[m] for row in rows]
            ax.plot(range(len(rows)), ys, marker="o", label=label)
            ax.set_xticks(range(len(rows)), [str(row["bits"]) for row in rows])
        ax.set_xlabel("attention logit bits")
        ax.set_title(m.replace("_", " "), fontsize=10)
        ax.legend(fontsize=8)
    save_figure(fig, path)


register("quantization", run, plot,
         description="validation loss and needle accuracy with attention logits quantized to 16/8/6/4 bits (Figure 8)",
         options=("bits", "granularity", "needle", "zero_shot", "batch_size", "seq_len", "batches",
                  "contexts", "depths", "needles", "asked", "samples", "generate", "haystack"))
