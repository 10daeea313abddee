"""One finished (or stopped) run directory read back as a record: curves, speed, FLOPs, instrumentation.

``compare``, ``sweep`` and ``report`` all summarise runs from what the trainer wrote to
``metrics.jsonl`` and ``run.json``, so a resumed or skipped run gives the same numbers as a fresh one.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from . import rundir
from .config import RunConfig
from .stats import flops_per_token, interpolate, non_embedding_params

SPEED_NOTE = ("tokens/s = tokens per step / the run's median optimizer-step time (training steps only, "
              "device-synchronised; no eval or checkpoint time), mean over seeds")


def _params(model) -> int:
    import torch

    from ..model import DiffTransformerLM

    with torch.device("meta"):
        return DiffTransformerLM(model).num_parameters()


def read_run(run_dir, run: RunConfig | None = None) -> dict:
    """The record of ``run_dir``: config figures, curves and speed (None where the run did not log them)."""
    run_dir = Path(run_dir)
    run = run or rundir.read_run_config(run_dir)
    metrics = rundir.read_metrics(run_dir)
    evals = [m for m in metrics if m.get("kind") == "eval"]
    trains = [m for m in metrics if m.get("kind") == "train"]
    summaries = [m for m in metrics if m.get("kind") == "summary"]
    tps = run.train.tokens_per_step
    p_ne = non_embedding_params(run.model)
    fpt = flops_per_token(run.model, run.train.seq_len, p_ne)
    # Speed: the median step time the trainer wrote at the end, else the median over the logged steps.
    median = summaries[-1].get("median_step_seconds") if summaries else None
    if median is None:
        logged = [m["step_seconds"] for m in trains if m.get("step_seconds")]
        median = statistics.median(logged) if logged else None
    mean_tps = summaries[-1].get("tokens_per_s") if summaries else None
    # Cumulative training seconds at each logged step (older runs: this session's clock).
    clock = [(0, 0.0)] + [(m["step"], m.get("train_seconds_total", m.get("train_seconds"))) for m in trains
                          if m.get("train_seconds_total", m.get("train_seconds")) is not None]
    steps, secs = [c[0] for c in clock], [c[1] for c in clock]
    eval_curve = [[m["step"], m["val_loss"]] for m in evals]
    final = evals[-1]["val_loss"] if evals and evals[-1]["step"] == run.train.total_steps else None
    total_seconds = summaries[-1].get("train_seconds_total") if summaries else None
    if total_seconds is None and len(clock) > 1 and clock[-1][0] == run.train.total_steps:
        total_seconds = clock[-1][1]
    return {
        "run_dir": str(run_dir),
        "attention": run.model.attention,
        "head_norm": run.model.head_norm,
        "params": _params(run.model),
        "params_non_embedding": p_ne,
        "flops_per_token": fpt,
        "tokens_per_step": tps,
        "total_steps": run.train.total_steps,
        "tokens": run.train.total_steps * tps,
        "train_flops": fpt * run.train.total_steps * tps,
        "steps_done": max([m.get("step", 0) for m in metrics], default=0),
        "complete": bool(summaries) and summaries[-1].get("step") == run.train.total_steps,
        "final_val_loss": final,
        "final_val_ppl": math.exp(min(final, 700.0)) if final is not None else None,
        "median_step_seconds": median,
        "tokens_per_s": tps / median if median else mean_tps,
        "tokens_per_s_mean_clock": mean_tps,
        "peak_memory_mb": summaries[-1].get("peak_memory_mb") if summaries else None,
        "train_seconds": total_seconds,
        "eval_curve": eval_curve,
        "eval_flops": [s * tps * fpt for s, _ in eval_curve],
        "eval_seconds": [interpolate(steps, secs, s) if len(steps) > 1 else None for s, _ in eval_curve],
        "train_curve": [[m["step"], m["loss"]] for m in trains],
        "grad_norm": [[m["step"], m.get("grad_norm")] for m in trains],
        "o_proj_in_rms": [[m["step"], m["o_proj_in_rms"]] for m in trains if m.get("o_proj_in_rms") is not None],
        "head_norm_gain": [[m["step"], m["head_norm_gain"]] for m in trains if m.get("head_norm_gain") is not None],
        "lambdas": [[m["step"], m["lambdas"]] for m in evals if m.get("lambdas")],
        "evals": read_evals(run_dir),
    }


def read_evals(run_dir) -> dict:
    """``{task: {metric: number}}`` from the run's ``evals/<task>.json`` files (their ``summary`` dicts);
    files that are not such JSON are left out."""
    out: dict[str, dict] = {}
    folder = Path(run_dir) / "evals"
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.json")):
        try:
            summary = json.loads(path.read_text()).get("summary")
        except (ValueError, OSError, AttributeError):
            continue
        if isinstance(summary, dict):
            out[path.stem] = {str(k): (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
                                       and math.isfinite(v) else None) for k, v in summary.items()}
    return out


def loss_at(record: dict, axis: str, x: float) -> float | None:
    """The run's validation loss interpolated at ``x`` training FLOPs (axis "flops") or seconds ("seconds");
    None when the run's curve does not reach ``x``."""
    xs = record["eval_flops" if axis == "flops" else "eval_seconds"]
    pts = [(a, c[1]) for a, c in zip(xs, record["eval_curve"]) if a is not None]
    if not pts:
        return None
    return interpolate([p[0] for p in pts], [p[1] for p in pts], x)
