"""``long-nll``: mean negative log-likelihood by position, over the whole context (the paper's Figure 5).

Each held-out document at least ``context + 1`` tokens long gives one row: the NLL of token
``t + 1`` given tokens ``0..t`` for every position ``t < context``. Positions are grouped into
``buckets`` equal buckets and averaged over documents. When no document is long enough, consecutive
documents are concatenated (EOS between them) into rows of ``context + 1`` tokens, and the JSON says
``"concatenated": true``. Options: ``context`` (default the model's max_seq_len), ``docs`` (rows,
default 16), ``buckets`` (default 16), ``batch_size`` (default 4).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from .base import EvalContext, register
from .common import autocast, encoded_documents, positive, progress, pyplot, require_data, save_figure


def bucket_means(nll: np.ndarray, n_buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """(edges (n_buckets + 1,), means (n_buckets,)) of ``nll`` (rows, T) averaged over rows and each bucket.

    Bucket ``b`` covers positions ``edges[b] <= t < edges[b + 1]``, edges as equal as integers allow.
    """
    t = nll.shape[1]
    n_buckets = min(n_buckets, t)
    edges = np.linspace(0, t, n_buckets + 1).round().astype(int)
    means = np.array([nll[:, edges[b]:edges[b + 1]].mean() for b in range(n_buckets)])
    return edges, means


def long_rows(ctx: EvalContext, context: int, n_rows: int) -> tuple[np.ndarray, bool]:
    """(rows (R, context + 1) int64, concatenated?): long documents, or consecutive ones joined."""
    docs = encoded_documents(ctx)
    long = [d[: context + 1] for d in docs if len(d) >= context + 1][:n_rows]
    if long:
        return np.array(long, dtype=np.int64), False
    stream = np.concatenate([np.append(np.asarray(d, dtype=np.int64), ctx.tokenizer.eos_id) for d in docs])
    n = min(n_rows, len(stream) // (context + 1))
    if n == 0:
        raise UserError(f"the held-out text has {len(stream)} tokens, fewer than context + 1 = {context + 1}: "
                        "use --opt context=N with a smaller N or more held-out data")
    return stream[: n * (context + 1)].reshape(n, context + 1), True


@torch.no_grad()
def position_nll(model, rows: np.ndarray, batch_size: int, device: torch.device, ctx: EvalContext | None = None) -> np.ndarray:
    """(R, T) fp64 NLL of rows[:, 1:] given the prefix, T = rows.shape[1] - 1."""
    out = []
    batches = range(0, len(rows), batch_size)
    it = progress(batches, ctx, "long-nll", len(batches)) if ctx is not None else batches
    for start in it:
        chunk = torch.from_numpy(rows[start:start + batch_size]).to(device)  # (b, T + 1)
        with autocast(ctx) if ctx is not None else torch.autocast(device.type, enabled=False):
            logits = model(chunk[:, :-1])  # (b, T, V)
        nll = F.cross_entropy(logits.float().transpose(1, 2), chunk[:, 1:], reduction="none")  # (b, T)
        out.append(nll.double().cpu().numpy())
    return np.concatenate(out)


def run(ctx: EvalContext) -> dict:
    require_data(ctx, "long-nll")
    max_len = ctx.model.config.max_seq_len
    context = positive("context", ctx.option("context", max_len), 2)
    if context > max_len:
        raise UserError(f"--opt context={context} exceeds the model's max_seq_len {max_len}")
    n_rows = positive("docs", ctx.option("docs", 16))
    n_buckets = positive("buckets", ctx.option("buckets", 16))
    batch_size = positive("batch_size", ctx.option("batch_size", 4))
    rows, concatenated = long_rows(ctx, context, n_rows)
    nll = position_nll(ctx.model, rows, batch_size, ctx.device, ctx)
    edges, means = bucket_means(nll, n_buckets)
    return {
        "summary": {"nll_mean": float(nll.mean()), "nll_first_bucket": float(means[0]),
                    "nll_last_bucket": float(means[-1])},
        "context": context, "rows": int(len(rows)), "concatenated": concatenated,
        "note": ("no held-out document reaches the context: rows are consecutive documents joined with EOS"
                 if concatenated else "one row per held-out document at least context + 1 tokens long"),
        "bucket_start": edges[:-1].tolist(), "bucket_end": edges[1:].tolist(), "nll": means.tolist(),
    }


def plot(results: list[tuple[str, dict]], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, r in results:
        mid = [(a + b) / 2 for a, b in zip(r["bucket_start"], r["bucket_end"])]
        ax.plot(mid, r["nll"], marker="o", ms=3, label=label)
    ax.set_xlabel("position in the sequence")
    ax.set_ylabel("NLL (nats/token)")
    ax.set_title("NLL by position")
    ax.legend(fontsize=8)
    save_figure(fig, path)


register("long-nll", run, plot, description="mean NLL by position bucket over the whole context (Figure 5)",
         options=("context", "docs", "buckets", "batch_size"))
