"""The main job: train a DIFF model and its matched baseline, fairly, over several seeds.

Both models of a seed share everything but the attention (``matched_pair``): the tokenizer and
token shards, the data order (batches are a pure function of the seed and the step), the initial
weights of every shared parameter (per-parameter seeded init), the optimizer, the schedule and the
token budget. Each training run is an ordinary run directory, so an interrupted compare resumes
run by run when the same command is repeated.

Output folder::

    compare.json                    the compare's config (a second, different compare is refused here)
    seed_<s>/diff/, seed_<s>/baseline/   run directories
    summary.json                    per-run and aggregated results (strict JSON: null, never NaN)
    loss_curves.png, lambda.png     validation/training loss curves, λ per layer over training
    loss_gap.png                    first − second validation loss against training tokens (mean ± std over seeds)

``--variants A,B`` compares two named variants (``diff_transformer.variants``) instead of the matched pair.
"""

from __future__ import annotations

import dataclasses
import json
import os
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
from .results import SPEED_NOTE, read_run
from .stats import catch_up, dumps, mean_std, paired_difference
from .trainer import run_training

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
    rundir.check_record_folder(out, COMPARE_FILE, record, ("run", "seeds", "variants"), "compare")


def describe_model(model: ModelConfig) -> str:
    """The attention, per-head-norm and init setting of ``model``, in words, from its config."""
    init, gain = model.init, model.head_norm_init
    if model.attention == "diff":
        lam = "λ_init depth schedule" if model.lambda_init is None else f"constant λ_init {model.lambda_init:g}"
        if model.head_norm:
            scale = "" if model.head_norm_lambda_scale else ", without the (1 − λ_init) factor"
            norm = f"the paper's per-head norm at gain {gain if isinstance(gain, str) else format(gain, 'g')}{scale}"
        else:
            norm = "no per-head norm"
        return f"DIFF V1 with {norm}, {lam}, {init} init"
    label = {"diff_v2": "DIFF V2", "baseline": "softmax baseline"}.get(model.attention, f"{model.attention} attention")
    return f"{label}{' with a per-head norm' if model.head_norm else ''}, {init} init"


def default_jobs(run: RunConfig) -> int:
    """The concurrent runs that suit ``run``'s device: two on a CPU with two cores or more, else one
    (a suggestion: the CLI's default stays 1, which keeps the numbers of earlier compares).

    Measured on 2 CPU cores (tiny, 6 steps and an eval): one run with 2 intra-op threads used 2.2x the
    CPU time of one with 1 thread, for about the same wall time (the ops are too small to split well),
    so two 1-thread runs side by side train about twice as fast as one 2-thread run.
    """
    device = run.train.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return 2 if device == "cpu" and (os.cpu_count() or 1) >= 2 else 1


def _train_in_worker(job: RunConfig, run_dir: Path, data_cache, threads: int) -> tuple[str, str]:
    """One run in a worker process with ``threads`` intra-op threads: (run_dir, status), or raises a
    UserError carrying the run's message and exit code (workers' own exception types need not pickle)."""
    import torch

    torch.set_num_threads(threads)
    try:
        res = run_training(job, run_dir, data_cache=data_cache, progress=False)
    except Exception as e:  # noqa: BLE001 - re-raised in the parent with the message intact
        raise UserError(f"{run_dir}: {type(e).__name__}: {e}") from None
    return str(res.run_dir), res.status


def compare(run: RunConfig, out, *, seeds: Sequence[int] = DEFAULT_SEEDS, variants: Sequence[str] | None = None,
            data_cache=None, progress: bool = True, log: Callable[[str], None] | None = None,
            echo: Callable[[str], None] = print, n_parallel: int = 1) -> dict:
    """Train two models for every seed into ``out``; print the table, write plots and summary.

    ``variants=None`` trains the matched pair (``diff`` and ``baseline``, from ``run.model``); two names
    from ``diff_transformer.variants`` train those instead (each applied to ``run``), compared first
    minus second. ``n_parallel``: runs trained at once, in worker processes that split the CPU cores
    (:func:`default_jobs` suggests a number); 1 trains them one after another in this process. The losses depend
    on the intra-op thread count in their last bits (fp32 reductions split differently), so a compare
    is repeatable for one ``n_parallel`` and core count."""
    from ..data import prepare_dataset
    from .trainer import default_cache_dir

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out)
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {seeds}: give one or more distinct integers")
    if variants:
        from ..variants import apply_variant

        variants = [v.strip() for v in variants]
        if len(variants) != 2 or variants[0] == variants[1]:
            raise UserError(f"--variants {','.join(variants)}: give two different variant names, e.g. diff,baseline")
        models = [(v, v, apply_variant(run, v).model) for v in variants]
    else:
        if run.model.attention == "baseline":
            raise UserError("compare needs a differential model: set model.attention=diff (or diff_v2); "
                            "the baseline is derived from it")
        diff_model, base_model = matched_models(run.model)
        models = [("diff", "DIFF", diff_model), ("baseline", "baseline", base_model)]
    record = {"run": run.to_dict(), "seeds": seeds}
    if variants:
        record["variants"] = variants
    _check_out(out, record)
    # Validate every derived run config up front, so bad input stops before anything is written.
    jobs = []
    for seed in seeds:
        train = dataclasses.replace(run.train, seed=seed)
        for name, _, model in models:
            jobs.append((seed, name, run.replace(model=model, train=train)))
    dataset = prepare_dataset(run.data, Path(data_cache) if data_cache else default_cache_dir())
    out.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_bytes(out / COMPARE_FILE, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())

    start = time.perf_counter()
    results: dict[tuple[int, str], dict] = {}
    n_jobs = max(1, min(n_parallel, len(jobs)))
    if n_jobs == 1:
        trained = 0
        for k, (seed, name, job) in enumerate(jobs, 1):
            elapsed = time.perf_counter() - start
            eta = (f"ETA {_fmt_seconds(elapsed / trained * (len(jobs) - k + 1))}" if trained
                   else "ETA after the first run")
            log(f"[compare] run {k} of {len(jobs)}: seed {seed}, {name} ({job.model.attention}) into "
                f"{out / f'seed_{seed}' / name} ({eta})")
            res = run_training(job, out / f"seed_{seed}" / name, data_cache=data_cache, progress=progress, log=log)
            trained += res.status != "already_complete"
            results[(seed, name)] = read_run(res.run_dir)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        threads = max(1, (os.cpu_count() or 1) // n_jobs)
        log(f"[compare] {len(jobs)} runs, {n_jobs} at a time ({threads} thread(s) each; --jobs 1 runs them one by one)")
        with ProcessPoolExecutor(n_jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {(seed, name): pool.submit(_train_in_worker, job, out / f"seed_{seed}" / name, data_cache,
                                                 threads) for seed, name, job in jobs}
            for k, ((seed, name), fut) in enumerate(futures.items(), 1):
                run_dir, status = fut.result()
                results[(seed, name)] = read_run(Path(run_dir))
                log(f"[compare] run {k} of {len(jobs)} {status}: seed {seed}, {name} "
                    f"({_fmt_seconds(time.perf_counter() - start)} so far)")
    summary = _aggregate(run, seeds, models, results, time.perf_counter() - start, len(dataset.train))
    ckpt.atomic_write_bytes(out / "summary.json", dumps(summary).encode())
    plots = _plot(out, seeds, models, results, summary, log)
    summary["plots"] = plots
    echo(format_table(summary))
    echo(f"wrote {out / 'summary.json'}" + "".join(f", {p}" for p in plots))
    return summary


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def gap_curve(first: dict[int, dict], second: dict[int, dict]) -> dict:
    """``first − second`` validation loss at every eval step both runs of a seed logged, paired by seed:
    training tokens, the mean and std over seeds, and where the mean gap drops to <= 0 for good."""
    per_seed = {}
    for seed in first:
        a = dict((s, v) for s, v in first[seed]["eval_curve"])
        b = dict((s, v) for s, v in second[seed]["eval_curve"])
        per_seed[seed] = {s: a[s] - b[s] for s in a if s in b}
    steps = sorted(set.intersection(*(set(d) for d in per_seed.values()))) if per_seed else []
    tokens_per_step = next(iter(first.values()))["tokens_per_step"] if first else 0
    means, stds = [], []
    for s in steps:
        m, sd = mean_std([per_seed[seed][s] for seed in per_seed])
        means.append(m)
        stds.append(sd)
    tokens = [s * tokens_per_step for s in steps]
    return {"steps": steps, "tokens": tokens, "mean": means, "std": stds,
            "per_seed": {str(seed): [per_seed[seed][s] for s in steps] for seed in per_seed},
            "catch_up_tokens": catch_up(tokens, means)}


def _aggregate(run: RunConfig, seeds: list[int], models: list, results: dict, seconds: float,
               unique_train_tokens: int) -> dict:
    out_models = {}
    for name, label, cfg in models:
        rows = [results[(s, name)] for s in seeds]
        loss, ppl = mean_std([r["final_val_loss"] for r in rows]), mean_std([r["final_val_ppl"] for r in rows])
        tps = mean_std([r["tokens_per_s"] for r in rows])
        init_rms = [r["o_proj_in_rms"][0][1] for r in rows if r["o_proj_in_rms"]]
        init_rms = [statistics.fmean([v for v in layers if v is not None]) for layers in init_rms
                    if any(v is not None for v in layers)]
        out_models[name] = {"label": label, "setting": describe_model(cfg), "params": rows[0]["params"],
                            "val_loss_mean": loss[0], "val_loss_std": loss[1], "val_ppl_mean": ppl[0],
                            "val_ppl_std": ppl[1], "tokens_per_s_mean": tps[0],
                            "peak_memory_mb_max": max((r["peak_memory_mb"] or 0) for r in rows),
                            "o_proj_in_rms_first_log": statistics.fmean(init_rms) if init_rms else None}
    (a, la, _), (b, lb, _) = models
    gap = paired_difference([results[(s, a)]["final_val_loss"] for s in seeds],
                            [results[(s, b)]["final_val_loss"] for s in seeds])
    curve = gap_curve({s: results[(s, a)] for s in seeds}, {s: results[(s, b)] for s in seeds})
    tokens = run.train.total_steps * run.train.tokens_per_step
    summary = {"preset": run.preset, "seeds": seeds, "tokens_per_run": tokens, "order": [a, b],
               "unique_train_tokens": unique_train_tokens, "epochs": tokens / unique_train_tokens,
               "models": out_models, "gap": {**gap, "first": a, "second": b}, "gap_curve": curve,
               "speed_note": SPEED_NOTE, "wall_seconds": seconds,
               "runs": {f"seed_{s}/{n}": r for (s, n), r in results.items()}, "config": run.to_dict()}
    if (a, b) == ("diff", "baseline"):
        summary["val_loss_gap_diff_minus_baseline"] = summary["gap"]
    return summary


def format_table(summary: dict) -> str:
    n = len(summary["seeds"])
    a, b = summary["order"]
    models = summary["models"]

    def num(x, fmt):
        return format(x, fmt) if x is not None else "—"

    w = max(len("model"), *(len(models[name]["label"]) for name in (a, b)))
    lines = [f"comparison, preset {summary['preset']}, {n} seed(s) {summary['seeds']}, "
             f"{summary['tokens_per_run']:,} training tokens per run = {summary['epochs']:.2f} epochs of "
             f"{summary['unique_train_tokens']:,} unique training tokens",
             f"{'model':<{w}} {'params':>12} {'val loss':>17} {'perplexity':>19} {'tokens/s':>10} {'peak MiB':>9}"]
    for name in (a, b):
        m = models[name]
        lines.append(f"{m['label']:<{w}} {m['params']:>12,} {num(m['val_loss_mean'], '>8.4f')} ± "
                     f"{num(m['val_loss_std'], '<6.4f')} {num(m['val_ppl_mean'], '>9.2f')} ± "
                     f"{num(m['val_ppl_std'], '<7.2f')} {num(m['tokens_per_s_mean'], '>10,.0f')} "
                     f"{m['peak_memory_mb_max']:>9,.0f}")
    g = summary["gap"]
    la, lb = models[a]["label"], models[b]["label"]
    lines.append(f"val loss {la} − {lb}, paired by seed: {num(g['mean'], '+.4f')} ± {num(g['std'], '.4f')} "
                 f"(mean ± std), 95% CI [{num(g['ci_low'], '+.4f')}, {num(g['ci_high'], '+.4f')}] "
                 f"(Student t, n={g['n']}), paired t-test p={num(g['p_value'], '.3g')}; negative favours {la}")
    c, tokens = summary["gap_curve"]["catch_up_tokens"], summary["gap_curve"]["tokens"]
    if c is None:
        where = "never within this budget"
    elif c == tokens[0]:
        where = "never behind (the mean gap is <= 0 at every eval point)"
    else:
        where = f"from {c:,} training tokens on (the mean gap stays <= 0 at every later eval point)"
    lines.append(f"{la} catches up with {lb}: {where}")
    lines.append(f"compared: {models[a]['setting']} vs {models[b]['setting']}")
    ra, rb = models[a]["o_proj_in_rms_first_log"], models[b]["o_proj_in_rms_first_log"]
    if ra is not None and rb is not None:
        lines.append(f"RMS of the attention output into o_proj at the first logged step (mean over layers and seeds): "
                     f"{la} {ra:.3f}, {lb} {rb:.3f}")
    if "per-head norm at gain 1," in models[a]["setting"]:
        lines.append("note: at small scale the per-head norm's initial gain of 1 decides most of DIFF's gap, "
                     "and at 30M parameters it closes with 3-4x the tokens (docs/ablations.md); try "
                     "`--variants diff-norm-matched,baseline` or "
                     "`sweep --variants baseline,diff,diff-no-norm,diff-norm-matched`")
    lines.append(summary["speed_note"])
    lines.append(f"wall time {summary['wall_seconds']:.0f} s")
    return "\n".join(lines)


def _plot(out: Path, seeds: list[int], models: list, results: dict, summary: dict, log) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("warning: matplotlib is not installed, so no plots were written (pip install matplotlib)")
        return []
    palette = ["tab:red", "tab:blue"]
    colors = {name: palette[i] for i, (name, _, _) in enumerate(models)}
    labels = {name: label for name, label, _ in models}
    styles = ["-", "--", ":", "-."]
    style = {seed: styles[i % len(styles)] for i, seed in enumerate(seeds)}
    title = f"{labels[models[0][0]]} vs {labels[models[1][0]]}, {len(seeds)} seed(s)"
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for (seed, name), r in sorted(results.items()):
        label = f"{labels[name]} seed {seed}"
        if r["train_curve"]:
            s, v = zip(*r["train_curve"])
            ax_train.plot(s, v, color=colors[name], ls=style[seed], alpha=0.6, lw=1, label=label)
        if r["eval_curve"]:
            s, v = zip(*r["eval_curve"])
            ax_val.plot(s, v, color=colors[name], ls=style[seed], alpha=0.8, marker="o", ms=3, lw=1, label=label)
    for ax, name in ((ax_train, "training loss"), (ax_val, "validation loss")):
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    ax_val.legend(fontsize=7)
    fig.suptitle(f"Loss curves: {title} (colour = model, line style = seed)")
    fig.tight_layout()
    paths = [out / "loss_curves.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    curve = summary["gap_curve"]
    if curve["tokens"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        mean = [m if m is not None else float("nan") for m in curve["mean"]]
        std = [s if s is not None else 0.0 for s in curve["std"]]
        ax.fill_between(curve["tokens"], [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color="tab:purple", alpha=0.2, label="± std over seeds")
        ax.plot(curve["tokens"], mean, color="tab:purple", marker="o", ms=3, label="mean over seeds")
        ax.axhline(0.0, color="black", lw=0.8)
        if curve["catch_up_tokens"] is not None:
            ax.axvline(curve["catch_up_tokens"], color="tab:green", ls="--", lw=1, label="catches up")
        a, b = summary["order"]
        ax.set_xlabel("training tokens")
        ax.set_ylabel(f"val loss {labels[a]} − {labels[b]} (nats)")
        ax.set_title(f"Validation loss gap, paired by seed ({len(seeds)} seed(s))")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "loss_gap.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    lam_runs = [(seed, name, results[(seed, name)]["lambdas"]) for name, _, _ in models for seed in seeds
                if results[(seed, name)]["lambdas"]]
    if lam_runs:
        fig, ax = plt.subplots(figsize=(6, 4))
        n_layers = len(lam_runs[0][2][0][1])
        cmap = plt.get_cmap("viridis")
        for seed, name, traj in lam_runs:
            steps = [s for s, _ in traj]
            for layer in range(n_layers):
                first = (seed, name) == lam_runs[0][:2]
                ax.plot(steps, [lams[layer] for _, lams in traj], color=cmap(layer / max(1, n_layers - 1)),
                        ls=style[seed], lw=1, alpha=0.8, label=f"layer {layer}" if first else None)
        for seed in seeds:
            ax.plot([], [], color="gray", ls=style[seed], label=f"seed {seed}")
        ax.set_xlabel("step")
        ax.set_ylabel("λ")
        ax.set_title(f"λ per layer during training ({', '.join(sorted({labels[n] for _, n, _ in lam_runs}))}; "
                     "colour = layer, line style = seed)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "lambda.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return [str(p) for p in paths]
