"""``outliers``: the largest and the median magnitudes of attention logits and hidden states (Table 5).

Over validation windows (``--opt tokens=N`` tokens in all, default 4096, windows of the run's
seq_len or ``--opt seq_len=N``), per layer:

- attention logits: |s·q1k1ᵀ| and |s·q2k2ᵀ| pooled for DIFF, |s·qkᵀ| for the baseline, causally
  visible entries only, every head;
- hidden states: |h| of every coordinate of each layer's output (the residual stream after the block).

Reported: the 1st, 2nd, 3rd, 10th and 100th largest value and the median, and the max over layers.
The top-k are exact. The median is exact when a layer has at most ``--opt sample=N`` (default
2,000,000) entries, otherwise the median of a uniform random sample of that many (the JSON says which).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..attention.probe import AttentionProbe
from ..data import eval_batches
from ..errors import UserError
from .base import EvalContext, register
from .common import (autocast, integer_ticks, positive, probing, progress, pyplot, require_data, require_probe_support,
                     run_config, save_figure)

TOP_K = (1, 2, 3, 10, 100)


class MagnitudeStats:
    """Streaming top-k (exact) and median (exact up to ``sample`` values, else sampled) of |x|."""

    def __init__(self, sample: int = 2_000_000, seed: int = 0):
        self.sample = sample
        self.top = torch.empty(0)
        self.kept: list[torch.Tensor] = []
        self.kept_n = 0
        self.count = 0
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, values: torch.Tensor) -> None:
        """Add a 1-D tensor of values (their absolute values are taken)."""
        v = values.detach().float().abs().flatten()
        if v.numel() == 0:
            return
        self.count += v.numel()
        both = torch.cat([self.top, v.topk(min(max(TOP_K), v.numel())).values.cpu()])
        self.top = both.topk(min(max(TOP_K), both.numel())).values  # descending
        v = v.cpu()
        self.kept.append(v)
        self.kept_n += v.numel()
        if self.kept_n > 2 * self.sample:  # keep memory bounded: thin to a uniform sample
            allv = torch.cat(self.kept)
            self.kept = [allv[torch.randperm(allv.numel(), generator=self.gen)[: self.sample]]]
            self.kept_n = self.sample

    @property
    def exact_median(self) -> bool:
        return self.count <= self.sample

    def result(self) -> dict:
        out = {f"top{k}": (float(self.top[k - 1]) if self.top.numel() >= k else None) for k in TOP_K}
        if self.count == 0:
            out["median"] = None
            return out
        allv = torch.cat(self.kept)
        if allv.numel() > self.sample:
            allv = allv[torch.randperm(allv.numel(), generator=self.gen)[: self.sample]]
        out["median"] = float(np.median(allv.double().numpy()))
        return out


def run(ctx: EvalContext) -> dict:
    kind = require_probe_support(ctx, "outliers")
    require_data(ctx, "outliers")
    run_cfg = run_config(ctx)
    seq_len = positive("seq_len", ctx.option("seq_len", run_cfg.train.seq_len if run_cfg else
                                             min(ctx.model.config.max_seq_len, 512)))
    if seq_len > ctx.model.config.max_seq_len:
        raise UserError(f"--opt seq_len={seq_len} exceeds the model's max_seq_len {ctx.model.config.max_seq_len}")
    n_tokens = positive("tokens", ctx.option("tokens", 4096))
    sample = positive("sample", ctx.option("sample", 2_000_000))
    windows = max(1, n_tokens // seq_len)
    n_layers = len(ctx.model.layers)
    logit_stats = [MagnitudeStats(sample, ctx.seed + i) for i in range(n_layers)]
    hidden_stats = [MagnitudeStats(sample, ctx.seed + 1000 + i) for i in range(n_layers)]

    def on_call(call) -> None:
        visible = torch.isfinite(call.logits1)  # (B, H, N, M): the causal mask's -inf are left out
        logit_stats[call.layer].add(call.logits1[visible])
        if call.logits2 is not None:
            logit_stats[call.layer].add(call.logits2[visible])

    handles = [block.register_forward_hook(lambda m, a, out, i=i: hidden_stats[i].add(out))
               for i, block in enumerate(ctx.model.layers)]
    scored = 0
    try:
        batches = list(eval_batches(ctx.val_tokens, 1, seq_len, windows))
        with torch.no_grad(), probing(ctx.model, AttentionProbe(callback=on_call)), autocast(ctx):
            for x, _ in progress(batches, ctx, "outliers", len(batches)):
                ctx.model(x.to(ctx.device))
                scored += x.numel()
    finally:
        for h in handles:
            h.remove()
    logits = [s.result() for s in logit_stats]
    hidden = [s.result() for s in hidden_stats]

    def over_layers(rows: list[dict]) -> dict:
        return {k: max((r[k] for r in rows if r[k] is not None), default=None) for k in rows[0]}

    lmax, hmax = over_layers(logits), over_layers(hidden)
    return {
        "summary": {"logit_top1": lmax["top1"], "logit_median": float(np.mean([r["median"] for r in logits])),
                    "hidden_top1": hmax["top1"], "hidden_median": float(np.mean([r["median"] for r in hidden]))},
        "attention": kind, "tokens": scored, "seq_len": seq_len,
        "logits": "|s*q1k1^T| and |s*q2k2^T| pooled" if kind != "baseline" else "|s*qk^T|",
        "median_exact": all(s.exact_median for s in logit_stats + hidden_stats), "median_sample": sample,
        "attention_logits": {"per_layer": logits, "max_over_layers": lmax},
        "hidden_states": {"per_layer": hidden, "max_over_layers": hmax},
    }


def plot(results: list[tuple[str, dict]], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((axes[0], "attention_logits", "|attention logits|"), (axes[1], "hidden_states", "|hidden states|")):
        for label, r in results:
            rows = r[key]["per_layer"]
            x = np.arange(len(rows))
            line, = ax.plot(x, [row["top1"] for row in rows], marker="o", label=f"{label} top-1")
            ax.plot(x, [row["median"] for row in rows], ls="--", color=line.get_color(), label=f"{label} median")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    for ax in fig.axes:
        ax.xaxis.set_major_locator(integer_ticks())
    save_figure(fig, path)


register("outliers", run, plot, description="top-k and median magnitude of attention logits and hidden states (Table 5)",
         options=("tokens", "seq_len", "sample"))
