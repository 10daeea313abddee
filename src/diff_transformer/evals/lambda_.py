"""``lambda``: DIFF V1's λ per layer over training, its final values, and the layers where λ ≤ 0.

Reads the run's ``metrics.jsonl`` (every evaluation record carries ``lambdas``, one per layer) and
the loaded model's λ (the final values). Needs no data. Models without a learned scalar λ (the
baseline, DIFF V2 whose λ is per token) report ``"lambda": "no λ"``.
"""

from __future__ import annotations

from pathlib import Path

from .base import EvalContext, register
from .common import integer_ticks, pyplot, save_figure


def run(ctx: EvalContext) -> dict:
    final = ctx.model.lambdas()
    if final is None:
        return {"summary": {}, "attention": ctx.model.config.attention, "lambda": "no λ"}
    steps, history = [], []
    if ctx.run_dir is not None and (ctx.run_dir / "metrics.jsonl").is_file():
        from ..train.rundir import read_metrics

        for rec in read_metrics(ctx.run_dir):
            if rec.get("kind") == "eval" and rec.get("lambdas"):
                steps.append(rec["step"])
                history.append(rec["lambdas"])
    n_layers = len(final)
    went_nonpositive = sorted({i for row in history for i, v in enumerate(row) if v is not None and v <= 0}
                              | {i for i, v in enumerate(final) if v <= 0})
    return {
        "summary": {"lambda_mean": sum(final) / n_layers, "lambda_min": min(final), "lambda_max": max(final),
                    "layers_nonpositive": float(len(went_nonpositive))},
        "attention": ctx.model.config.attention,
        "final": final,
        "steps": steps,
        "per_layer": [[row[i] for row in history] for i in range(n_layers)],
        "any_nonpositive": bool(went_nonpositive),
        "nonpositive_layers": went_nonpositive,
        "source": "metrics.jsonl eval records" if steps else "the model only (no metrics.jsonl)",
    }


def plot(results: list[tuple[str, dict]], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    with_lambda = [(label, r) for label, r in results if "final" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, r in with_lambda:
        x = list(range(len(r["final"])))
        axes[1].plot(x, r["final"], marker="o", label=label)
        for i, series in enumerate(r["per_layer"]):
            if series:
                axes[0].plot(r["steps"], series, lw=1, label=f"{label} L{i}" if len(with_lambda) <= 2 else None)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("λ")
    axes[0].set_title("λ per layer over training", fontsize=10)
    axes[1].set_xlabel("layer")
    axes[1].set_title("final λ", fontsize=10)
    for ax in axes:
        ax.axhline(0, color="grey", lw=0.8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    if not with_lambda:
        axes[0].text(0.5, 0.5, "no λ (not a DIFF V1 model)", ha="center", transform=axes[0].transAxes)
    axes[1].xaxis.set_major_locator(integer_ticks())
    save_figure(fig, path)


register("lambda", run, plot, description="DIFF λ per layer over training and at the end (λ ≤ 0 flagged)",
         needs_data=False, options=())
