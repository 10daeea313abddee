"""``attention-noise``: how much attention the answer's queries put on the answer and on the rest (Table 3).

On needle examples (data/synthetic.py, evaluation pool; one asked needle by default), the prompt and
the answer are run teacher-forced through the model with the attention probe on. The query
positions are those that predict the answer's tokens: the last prompt position and every answer
token but the last. For each layer the attention map of these rows is split into

- ``answer``: the mass on the asked needle's number tokens in the context (the answer span);
- ``noise``: the mass on every other context token (haystack and the other needles);
- ``other``: the rest (the question and the answer tokens themselves),

averaged over heads, query positions and examples.

The map is DIFF's combined map ``A1 − λ·A2`` (V1: λ per layer; V2: λ per token and head) and the
baseline's softmax map. A row of the combined map sums to ``1 − λ`` (V1), near 0 or negative in
trained layers whose λ is near or above 1, and its entries may be negative (λ > 0). So the
headline numbers (``answer``, ``noise``, ``other``) are each part's signed mass divided by the row's
total absolute mass ``Σ_j |a_ij|``: they lie in [−1, 1], stay finite, and equal the plain fractions
of the row for a non-negative map (the baseline's; DIFF's when λ ≤ 0, where ``A1 + |λ|·A2 ≥ 0``).
A negative share means the row takes more of ``λ·A2`` than of ``A1`` from those keys.
``raw_answer``, ``raw_noise``, ``raw_other`` are the unnormalised masses (equal to the headline
numbers for the baseline); ``row_sum`` and ``row_abs_sum`` the mean row sum and absolute mass.
Options: ``context`` (default max_seq_len), ``needles`` (4, or fewer as in the needle task), ``asked``
(1), ``samples`` (8), ``haystack``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..attention.probe import AttentionProbe
from ..data.synthetic import make_needle_example
from ..errors import UserError
from .base import EvalContext, register
from .common import (autocast, haystack_ids, integer_ticks, positive, probing, progress, pyplot, require_data,
                     require_probe_support, save_figure)
from .needle import DEFAULT_DEPTHS, default_needles

def split_mass(a: Tensor, span: tuple[int, int], context_end: int) -> dict[str, Tensor]:
    """Rows ``a`` (..., M) of an attention map -> per row (...,): the signed masses on keys ``span``
    (``answer``), on the rest of ``[0, context_end)`` (``noise``) and on the keys after (``other``),
    each raw (``raw_*``) and divided by the row's total absolute mass Σ_j |a_ij| (in [−1, 1]); plus
    ``row_sum`` (Σ_j a_ij) and ``row_abs_sum`` (Σ_j |a_ij|)."""
    s0, s1 = span
    answer = a[..., s0:s1].sum(-1)
    raw = {"answer": answer, "noise": a[..., :context_end].sum(-1) - answer, "other": a[..., context_end:].sum(-1)}
    abs_sum = a.abs().sum(-1)
    scale = abs_sum.clamp_min(torch.finfo(a.dtype).tiny)  # an all-zero row (A1 = λ·A2) has zero shares
    return {**{p: v / scale for p, v in raw.items()}, **{f"raw_{p}": v for p, v in raw.items()},
            "row_sum": a.sum(-1), "row_abs_sum": abs_sum}


@torch.no_grad()
def attention_mass(model, ids: list[int], queries: list[int], span: tuple[int, int], context_end: int,
                   device: torch.device, amp: bool = False) -> dict[str, np.ndarray]:
    """Per layer, the attention mass of rows ``queries`` on ``span``, on the rest of ``[0, context_end)``
    and on the remaining visible keys (see :func:`split_mass`), mean over heads and queries: each an
    (n_layers,) array.
    """
    n_layers = len(model.layers)
    acc: dict[str, np.ndarray] = {}
    q_idx = torch.tensor(queries, device=device)

    def on_call(call) -> None:
        a = call.combined()[0, :, q_idx]  # (H, Q, M) fp32
        for k, v in split_mass(a, span, context_end).items():  # each (H, Q)
            acc.setdefault(k, np.zeros(n_layers))[call.layer] = float(v.mean())

    x = torch.tensor([ids], dtype=torch.long, device=device)
    with probing(model, AttentionProbe(callback=on_call)), torch.autocast(device.type, dtype=torch.bfloat16,
                                                                         enabled=amp):
        model(x)
    return acc


def run(ctx: EvalContext) -> dict:
    kind = require_probe_support(ctx, "attention-noise")
    require_data(ctx, "attention-noise")
    max_len = ctx.model.config.max_seq_len
    context = positive("context", ctx.option("context", max_len), 2)
    if context > max_len:
        raise UserError(f"--opt context={context} exceeds the model's max_seq_len {max_len}")
    needles = positive("needles", ctx.option("needles", default_needles(ctx, context)))
    asked = positive("asked", ctx.option("asked", 1))
    samples = positive("samples", ctx.option("samples", 8))
    if asked > needles:
        raise UserError(f"--opt asked={asked} exceeds needles={needles}")
    rng = np.random.default_rng(ctx.seed)
    per_example = []
    for i in progress(range(samples), ctx, "attention-noise", samples):
        hay, _ = haystack_ids(ctx, context, rng)
        depths = [DEFAULT_DEPTHS[i % len(DEFAULT_DEPTHS)]] * asked + rng.uniform(0, 1, needles - asked).tolist()
        try:
            ex = make_needle_example(rng, hay, ctx.tokenizer, context, depths, needles, asked, "eval")
        except ValueError as e:
            raise UserError(f"attention-noise: {e}") from None
        for j, prompt in enumerate(ex.prompts):
            answer = ex.answer_ids[j]
            ids = prompt + answer[:-1]
            queries = list(range(len(prompt) - 1, len(ids)))
            with autocast(ctx):
                per_example.append(attention_mass(ctx.model, ids, queries, ex.number_spans[ex.asked[j]],
                                                  len(ex.context), ctx.device, ctx.amp))
    layers = {k: np.mean([m[k] for m in per_example], axis=0) for k in per_example[0]}
    result = {
        "summary": {"answer_mass": float(layers["answer"].mean()), "noise_mass": float(layers["noise"].mean()),
                    "answer_mass_last_layer": float(layers["answer"][-1])},
        "attention": kind,
        "map": "softmax map A" if kind == "baseline" else "combined map A1 - lambda*A2",
        "normalisation": ("none needed: softmax rows sum to 1" if kind == "baseline" else
                          "each part's signed mass divided by the row's total absolute mass sum_j |a_ij| "
                          "(in [-1, 1]; the plain fraction where the map is non-negative, e.g. lambda <= 0); "
                          "raw_* are unnormalised, row_sum (1 - lambda for V1) and row_abs_sum per layer"),
        "queries": "the last prompt position and the answer tokens but the last (teacher-forced)",
        "context": context, "needles": needles, "asked": asked, "samples": samples, "examples": len(per_example),
        "per_layer": {k: v.tolist() for k, v in layers.items()},
    }
    return result


def plot(results: list[tuple[str, dict]], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, r in results:
        pl = r["per_layer"]
        x = np.arange(len(pl["answer"]))
        axes[0].plot(x, pl["answer"], marker="o", label=label)
        axes[1].plot(x, pl["noise"], marker="o", label=label)
    for ax, title in zip(axes, ("attention to the answer span", "attention noise (rest of the context)")):
        ax.set_xlabel("layer")
        ax.set_ylabel("signed share of the row's |mass|")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    for ax in fig.axes:
        ax.xaxis.set_major_locator(integer_ticks())
    save_figure(fig, path)


register("attention-noise", run, plot,
         description="attention mass on the answer span vs the rest of the context, per layer (Table 3)",
         options=("context", "needles", "asked", "samples", "haystack"))
