"""The main job: train a DIFF model and its matched baseline, fairly, over several seeds.

Both models of a seed share everything but the attention (``matched_pair``): the tokenizer and
token shards, the data order (batches are a pure function of the seed and the step), the initial
weights of every shared parameter (per-parameter seeded init), the optimizer, the schedule and the
token budget. Each training run is an ordinary run directory, so an interrupted compare resumes
run by run when the same command is repeated.

Output folder::

    compare.json                    the compare's config (a second, different compare is refused here)
    seed_<s>/diff/, seed_<s>/baseline/   run directories
    summary.json                    per-run and aggregated results
    loss_curves.png, lambda.png     validation/training loss curves, λ per layer over training
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..config import ModelConfig, matched_pair, preset
from ..errors import UserError
from . import checkpoint as ckpt
from . import rundir
from .config import RunConfig, TrainConfig
from .trainer import TrainResult, run_training

COMPARE_FILE = "compare.json"
DEFAULT_SEEDS = (1, 2, 3)

# The embedded default: the `tiny` preset on the built-in corpus, sized so that the whole compare
# (BPE training and tokenisation, then 2 models x 3 seeds) finishes on a 2-core CPU in <= 10 minutes.
DEFAULT_TRAIN = dict(batch_size=16, seq_len=128, steps=150, lr=3e-3, warmup_steps=15, min_lr_ratio=0.1,
                     eval_every=25, eval_batches=8, ckpt_every=50, log_every=5)
DEFAULT_DATA = dict(vocab_size=4096)


def default_run(preset_name: str = "tiny") -> RunConfig:
    """The compare's starting config: the preset with the CPU-sized training budget above."""
    from ..data import DataConfig

    return RunConfig(model=preset(preset_name), train=TrainConfig(**DEFAULT_TRAIN),
                     data=DataConfig(**DEFAULT_DATA), preset=preset_name)


def matched_models(model: ModelConfig) -> tuple[ModelConfig, ModelConfig]:
    """``matched_pair``, keeping an explicit per-head-norm ablation (``model.head_norm=false``) on the DIFF side."""
    diff, base = matched_pair(model)
    if model.attention != "baseline" and model.head_norm != diff.head_norm:
        diff = diff.replace(head_norm=model.head_norm)
    return diff, base


def _check_out(out: Path, record: dict) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: choose a folder name")
    if not out.exists() or not any(out.iterdir()):
        return
    path = out / COMPARE_FILE
    if not path.is_file():
        raise UserError(f"--out {out} is not empty and holds no {COMPARE_FILE}: choose a new or empty folder")
    try:
        existing = json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path} is not valid JSON: choose a new --out folder") from None
    if existing.get("run") != record["run"] or existing.get("seeds") != record["seeds"]:
        a = RunConfig.from_dict(existing.get("run", {}), str(path)) if existing.get("run") else None
        diffs = RunConfig.from_dict(record["run"]).differences(a) if a else ["run"]
        if existing.get("seeds") != record["seeds"]:
            diffs.append("seeds")
        raise UserError(f"--out {out} holds another compare (differs in {', '.join(diffs[:4])}): "
                        "choose a new --out folder, or repeat that compare's settings to resume it")


def compare(run: RunConfig, out, *, seeds: Sequence[int] = DEFAULT_SEEDS, data_cache=None, progress: bool = True,
            log: Callable[[str], None] | None = None, echo: Callable[[str], None] = print) -> dict:
    """Train DIFF and baseline for every seed into ``out``; print the table, write plots and summary."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out)
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {seeds}: give one or more distinct integers")
    if run.model.attention == "baseline":
        raise UserError("compare needs a differential model: set model.attention=diff (or diff_v2); "
                        "the baseline is derived from it")
    diff_model, base_model = matched_models(run.model)
    record = {"run": run.to_dict(), "seeds": seeds}
    _check_out(out, record)
    # Validate every derived run config up front, so bad input stops before anything is written.
    jobs = []
    for seed in seeds:
        train = dataclasses.replace(run.train, seed=seed)
        for name, model in (("diff", diff_model), ("baseline", base_model)):
            jobs.append((seed, name, run.replace(model=model, train=train)))
    out.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_bytes(out / COMPARE_FILE, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())

    start = time.perf_counter()
    results: dict[tuple[int, str], dict] = {}
    for seed, name, job in jobs:
        log(f"[compare] seed {seed}: training {name} ({job.model.attention}) into {out / f'seed_{seed}' / name}")
        res = run_training(job, out / f"seed_{seed}" / name, data_cache=data_cache, progress=progress, log=log)
        results[(seed, name)] = _summarise(res)
    summary = _aggregate(run, seeds, results, time.perf_counter() - start)
    ckpt.atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    plots = _plot(out, seeds, results, log)
    summary["plots"] = plots
    echo(format_table(summary))
    echo(f"wrote {out / 'summary.json'}" + "".join(f", {p}" for p in plots))
    return summary


def _summarise(res: TrainResult) -> dict:
    metrics = res.metrics or rundir.read_metrics(res.run_dir)
    if res.tokens_per_s is None:  # already complete earlier: take the figures the run recorded then
        done = [m for m in rundir.read_metrics(res.run_dir) if m.get("kind") == "summary"]
        if done:
            res.tokens_per_s, res.peak_memory_mb = done[-1].get("tokens_per_s"), done[-1].get("peak_memory_mb")
    evals = [m for m in metrics if m.get("kind") == "eval"]
    trains = [m for m in metrics if m.get("kind") == "train"]
    final = evals[-1]["val_loss"] if evals else math.nan
    return {
        "run_dir": str(res.run_dir),
        "params": res.num_parameters,
        "final_val_loss": final,
        "final_val_ppl": math.exp(min(final, 700.0)),
        "tokens_per_s": res.tokens_per_s,
        "peak_memory_mb": res.peak_memory_mb,
        "steps": res.step,
        "eval_curve": [[m["step"], m["val_loss"]] for m in evals],
        "train_curve": [[m["step"], m["loss"]] for m in trains],
        "lambdas": [[m["step"], m["lambdas"]] for m in evals if m.get("lambdas")],
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _aggregate(run: RunConfig, seeds: list[int], results: dict, seconds: float) -> dict:
    models = {}
    for name in ("diff", "baseline"):
        rows = [results[(s, name)] for s in seeds]
        loss, ppl = _mean_std([r["final_val_loss"] for r in rows]), _mean_std([r["final_val_ppl"] for r in rows])
        tps, mem = _mean_std([r["tokens_per_s"] for r in rows]), _mean_std([r["peak_memory_mb"] for r in rows])
        models[name] = {"params": rows[0]["params"], "val_loss_mean": loss[0], "val_loss_std": loss[1],
                        "val_ppl_mean": ppl[0], "val_ppl_std": ppl[1], "tokens_per_s_mean": tps[0],
                        "peak_memory_mb_max": max((r["peak_memory_mb"] or 0) for r in rows)}
    gaps = [results[(s, "diff")]["final_val_loss"] - results[(s, "baseline")]["final_val_loss"] for s in seeds]
    gap = _mean_std(gaps)
    return {"preset": run.preset, "seeds": seeds, "tokens_per_run": run.train.total_steps * run.train.tokens_per_step,
            "models": models, "val_loss_gap_diff_minus_baseline": {"mean": gap[0], "std": gap[1], "per_seed": gaps},
            "wall_seconds": seconds, "runs": {f"seed_{s}/{n}": r for (s, n), r in results.items()},
            "config": run.to_dict()}


def format_table(summary: dict) -> str:
    n = len(summary["seeds"])
    lines = [f"matched comparison, preset {summary['preset']}, {n} seed(s) {summary['seeds']}, "
             f"{summary['tokens_per_run']:,} training tokens per run",
             f"{'model':<9} {'params':>12} {'val loss':>17} {'perplexity':>19} {'tokens/s':>10} {'peak MiB':>9}"]
    for name, label in (("diff", "DIFF"), ("baseline", "baseline")):
        m = summary["models"][name]
        lines.append(f"{label:<9} {m['params']:>12,} {m['val_loss_mean']:>8.4f} ± {m['val_loss_std']:<6.4f} "
                     f"{m['val_ppl_mean']:>9.2f} ± {m['val_ppl_std']:<7.2f} {m['tokens_per_s_mean']:>10,.0f} "
                     f"{m['peak_memory_mb_max']:>9,.0f}")
    g = summary["val_loss_gap_diff_minus_baseline"]
    lines.append(f"val loss DIFF - baseline, paired by seed: {g['mean']:+.4f} ± {g['std']:.4f} "
                 f"(mean ± std over seeds; negative favours DIFF)")
    lines.append(f"wall time {summary['wall_seconds']:.0f} s")
    return "\n".join(lines)


def _plot(out: Path, seeds: list[int], results: dict, log) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("warning: matplotlib is not installed, so no plots were written (pip install matplotlib)")
        return []
    colors = {"diff": "tab:red", "baseline": "tab:blue"}
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for (seed, name), r in sorted(results.items()):
        label = f"{'DIFF' if name == 'diff' else 'baseline'} seed {seed}"
        if r["train_curve"]:
            s, v = zip(*r["train_curve"])
            ax_train.plot(s, v, color=colors[name], alpha=0.6, lw=1, label=label)
        if r["eval_curve"]:
            s, v = zip(*r["eval_curve"])
            ax_val.plot(s, v, color=colors[name], alpha=0.8, marker="o", ms=3, lw=1, label=label)
    for ax, title in ((ax_train, "training loss"), (ax_val, "validation loss")):
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_val.legend(fontsize=7)
    fig.tight_layout()
    paths = [out / "loss_curves.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    lam_runs = [(seed, results[(seed, "diff")]["lambdas"]) for seed in seeds if results[(seed, "diff")]["lambdas"]]
    if lam_runs:
        fig, ax = plt.subplots(figsize=(6, 4))
        n_layers = len(lam_runs[0][1][0][1])
        cmap = plt.get_cmap("viridis")
        for seed, traj in lam_runs:
            steps = [s for s, _ in traj]
            for layer in range(n_layers):
                ax.plot(steps, [lams[layer] for _, lams in traj], color=cmap(layer / max(1, n_layers - 1)), lw=1,
                        alpha=0.8, label=f"layer {layer}" if seed == lam_runs[0][0] else None)
        ax.set_xlabel("step")
        ax.set_ylabel("λ")
        ax.set_title("DIFF: λ per layer during training (all seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "lambda.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return [str(p) for p in paths]
