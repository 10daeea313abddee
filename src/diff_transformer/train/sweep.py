"""``sweep``: train named variants (``diff_transformer.variants``) over seeds and learning rates, and
compare every variant with a reference variant, paired by seed.

Every run shares the preset, data, data order (a pure function of the seed and the step), token budget
and schedule; only the variant's overrides (and the swept seed / lr) differ. Each run is an ordinary
run directory trained by a ``diff-transformer train`` subprocess, so a stopped sweep resumes when the
same command is repeated: finished runs are skipped, stopped ones continue from their checkpoints.

Output folder::

    sweep.json                          the sweep's config (a different sweep here is refused)
    <variant>/seed_<s>/                 run directories (<variant>/lr_<lr>/seed_<s>/ with --lrs)
    <run>/train.log                     the training process's stderr
    summary.json                        per-run records and the aggregated table (strict JSON: no NaN)

Statistics: final validation loss mean ± sample std over seeds; the paired difference to the reference
(same seed, same lr) with a Student-t 95% confidence interval on n - 1 degrees of freedom and the paired
t-test's two-sided p-value. Training FLOPs per token are :func:`stats.flops_per_token`; "loss at the
reference's FLOPs / time" interpolates each run's validation curve at the reference run's total training
FLOPs / training seconds (same seed), None for runs whose curve ends before that point.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import UserError
from ..variants import apply_variant, variant_names, variant_record
from . import checkpoint as ckpt
from . import rundir
from .config import RunConfig
from .results import SPEED_NOTE, loss_at, read_run
from .stats import dumps, mean_std, paired_difference

SWEEP_FILE = "sweep.json"
SUMMARY_FILE = "summary.json"
LOG_FILE = "train.log"


class SweepStopped(Exception):
    """SIGTERM or Ctrl-C: the running trainings were sent SIGTERM (each saved a checkpoint) and waited for."""

    exit_code = 75  # as a preempted `train`: rerun the same command to resume

    def __init__(self, running: int):
        super().__init__(f"sweep stopped; {running} running training(s) saved a checkpoint and stopped: "
                         "rerun the same command to resume")


@dataclasses.dataclass
class Job:
    variant: str
    lr: float | None  # None: the config's lr (no --lrs)
    seed: int
    run: RunConfig
    run_dir: Path

    @property
    def label(self) -> str:
        lr = f" lr {self.lr:g}" if self.lr is not None else ""
        return f"{self.variant}{lr} seed {self.seed}"

    @property
    def key(self) -> str:
        return str(self.run_dir.relative_to(self.run_dir.parents[1 if self.lr is None else 2]))


def lr_folder(lr: float) -> str:
    return f"lr_{lr:g}"


def plan(run: RunConfig, out: Path, variants: Sequence[str], seeds: Sequence[int],
         lrs: Sequence[float] | None) -> list[Job]:
    """Every run of the sweep, validated (bad variants or settings raise before anything is written)."""
    jobs = []
    for name in variants:
        base = apply_variant(run, name)
        for lr in (lrs or [None]):
            for seed in seeds:
                train = dataclasses.replace(base.train, seed=seed, **({"lr": lr} if lr is not None else {}))
                folder = out / name / (lr_folder(lr) if lr is not None else "") / f"seed_{seed}"
                jobs.append(Job(name, lr, seed, base.replace(train=train), Path(os.path.normpath(folder))))
    return jobs


def _check_out(out: Path, record: dict) -> None:
    rundir.check_record_folder(out, SWEEP_FILE, record, ("run", "variants", "seeds", "lrs", "overrides"), "sweep")


def is_finished(job: Job) -> bool:
    """The run reached its last step: its summary record, or its final evaluation and checkpoint, were written."""
    if not (job.run_dir / "metrics.jsonl").is_file():
        return False
    record = read_run(job.run_dir, job.run)
    final = ckpt.checkpoint_path(job.run_dir, job.run.train.total_steps) / ckpt.MARKER
    return record["complete"] or (record["final_val_loss"] is not None and final.is_file())


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_jobs(jobs: list[Job], *, n_parallel: int, gpus: Sequence[str] | None, data_cache: Path,
             log: Callable[[str], None]) -> list[tuple[Job, int, str]]:
    """Train ``jobs`` in ``n_parallel`` subprocesses (slot ``i`` sees GPU ``gpus[i % len(gpus)]``), logging
    "run k of N" with an ETA. Returns the failures as (job, exit code, last stderr line)."""
    total = len(jobs)
    pending = list(enumerate(jobs, 1))
    running: dict[int, tuple[int, Job, subprocess.Popen, float]] = {}  # slot -> (k, job, process, start)
    failures: list[tuple[Job, int, str]] = []
    start, trained, done = time.monotonic(), 0, 0
    threads = max(1, (os.cpu_count() or 1) // n_parallel)

    def eta() -> str:
        if not trained:
            return "ETA after the first run"
        left = total - done
        return f"ETA {_fmt_seconds((time.monotonic() - start) / trained * left)}" if left else "done"

    stop = []
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    try:
        while (pending or running) and not stop:
            for slot in range(n_parallel):
                if slot in running or not pending:
                    continue
                k, job = pending.pop(0)
                if is_finished(job):
                    done += 1
                    log(f"[sweep] run {k} of {total}: {job.label} already finished; skipped")
                    continue
                env = dict(os.environ)
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = str(gpus[slot % len(gpus)])
                if n_parallel > 1 and "OMP_NUM_THREADS" not in os.environ:
                    env["OMP_NUM_THREADS"] = str(threads)  # concurrent CPU runs split the cores
                job.run_dir.mkdir(parents=True, exist_ok=True)
                config = job.run_dir / "run.json"
                if not config.is_file():  # the trainer rewrites the same file; it marks the folder as this run's
                    ckpt.atomic_write_bytes(config, (job.run.to_json() + "\n").encode())
                cmd = [sys.executable, "-m", "diff_transformer.cli", "train", "--config", str(config),
                       "--out", str(job.run_dir), "--data-cache", str(data_cache), "--no-progress"]
                with open(job.run_dir / LOG_FILE, "ab") as err:
                    # A session of its own: Ctrl-C in a terminal reaches the sweep only, which stops each run
                    # with SIGTERM (finish the step, save a checkpoint) instead of killing it mid-step.
                    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env,
                                            start_new_session=True)
                where = f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if gpus else ""
                log(f"[sweep] run {k} of {total}: {job.label}{where} -> {job.run_dir} ({eta()})")
                running[slot] = (k, job, proc, time.monotonic())
            for slot, (k, job, proc, t0) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[slot]
                done += 1
                trained += 1
                if rc == 0:
                    log(f"[sweep] run {k} of {total} finished: {job.label} in {_fmt_seconds(time.monotonic() - t0)} "
                        f"({done} of {total} done, {eta()})")
                else:
                    line = _last_line(job.run_dir / LOG_FILE)
                    failures.append((job, rc, line))
                    log(f"[sweep] run {k} of {total} FAILED: {job.label} exit {rc}: {line} "
                        f"(log {job.run_dir / LOG_FILE})")
            if running:
                time.sleep(0.2)
    except KeyboardInterrupt:
        stop.append(signal.SIGINT)
    finally:
        if stop or sys.exc_info()[0] is not None:
            for _, _, proc, _ in running.values():
                proc.terminate()  # SIGTERM: each run finishes its step and saves a checkpoint
            for _, _, proc, _ in running.values():
                proc.wait()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if stop:
        raise SweepStopped(len(running))
    return failures


def sweep(run: RunConfig, out, *, variants: Sequence[str], seeds: Sequence[int], lrs: Sequence[float] | None = None,
          reference: str | None = None, jobs: int = 1, gpus: Sequence[str] | None = None, data_cache=None,
          log: Callable[[str], None] | None = None, echo: Callable[[str], None] = print) -> tuple[dict, list]:
    """Run (or resume) the sweep into ``out``; write summary.json and print the table.

    Returns (summary, failures); failures are (job, exit code, last stderr line)."""
    from ..data import prepare_dataset
    from .trainer import default_cache_dir

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out)
    variants = [v.strip() for v in variants if v.strip()]
    seeds = [int(s) for s in seeds]
    lrs = [float(x) for x in lrs] if lrs else None
    if not variants or len(set(variants)) != len(variants):
        raise UserError(f"--variants {','.join(variants)}: give one or more distinct names from: "
                        f"{', '.join(variant_names())}")
    overrides = {v: variant_record(v) for v in variants}  # unknown names: UserError listing the known ones
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {seeds}: give one or more distinct integers")
    if lrs is not None and (len(set(lrs)) != len(lrs) or any(not x > 0 for x in lrs)):
        raise UserError(f"--lrs {lrs}: give distinct positive learning rates")
    if jobs < 1:
        raise UserError(f"--jobs {jobs}: give a positive number of concurrent runs")
    if reference is None:
        reference = "baseline" if "baseline" in variants else variants[0]
    if reference not in variants:
        raise UserError(f"--reference {reference} is not one of --variants {','.join(variants)}: add it to --variants")
    all_jobs = plan(run, out, variants, seeds, lrs)
    record = {"run": run.to_dict(), "variants": variants, "seeds": seeds, "lrs": lrs, "overrides": overrides,
              "reference": reference}
    _check_out(out, record)
    cache = Path(data_cache) if data_cache else default_cache_dir()
    log("[sweep] preparing the data once for every run")
    dataset = prepare_dataset(run.data, cache)
    vocab = dataset.vocab_size
    all_jobs = [dataclasses.replace(j, run=j.run.replace(model=j.run.model.replace(vocab_size=vocab)))
                if j.run.train.init_from is None else j for j in all_jobs]
    out.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_bytes(out / SWEEP_FILE, dumps(record).encode())

    start = time.monotonic()
    failures = run_jobs(all_jobs, n_parallel=jobs, gpus=gpus, data_cache=cache, log=log)
    records = {j.key: read_run(j.run_dir, j.run) for j in all_jobs if (j.run_dir / "run.json").is_file()}
    summary = aggregate(all_jobs, records, reference=reference, seeds=seeds, lrs=lrs,
                        unique_train_tokens=len(dataset.train), concurrent=jobs)
    summary["failed"] = [{"run": j.key, "exit_code": rc, "last_stderr_line": line} for j, rc, line in failures]
    summary["wall_seconds_this_invocation"] = time.monotonic() - start
    ckpt.atomic_write_bytes(out / SUMMARY_FILE, dumps(summary).encode())
    echo(format_table(summary))
    for j, rc, line in failures:
        echo(f"failed: {j.label} (exit {rc}): {line}")
    echo(f"wrote {out / SUMMARY_FILE}")
    return summary, failures


def _group_key(variant: str, lr: float | None) -> str:
    return variant if lr is None else f"{variant}@{lr:g}"


def aggregate(jobs: list[Job], records: dict, *, reference: str, seeds: list[int], lrs: list[float] | None,
              unique_train_tokens: int, concurrent: int = 1) -> dict:
    """The sweep's summary from the per-run records (keyed like :attr:`Job.key`)."""
    by = {(j.variant, j.lr, j.seed): records.get(j.key) for j in jobs}
    variants = list(dict.fromkeys(j.variant for j in jobs))
    lr_list = lrs or [None]
    groups = {}
    for v in variants:
        for lr in lr_list:
            groups[_group_key(v, lr)] = _group(v, lr, seeds, by, reference)
    best_lr, best = {}, {}
    if lrs:
        for v in variants:
            cands = [(groups[_group_key(v, lr)]["val_loss_mean"], lr) for lr in lrs
                     if groups[_group_key(v, lr)]["val_loss_mean"] is not None]
            if cands:
                best_lr[v] = min(cands)[1]
        for v, lr in best_lr.items():
            ref_lr = best_lr.get(reference)
            ours = [(by[(v, lr, s)] or {}).get("final_val_loss") for s in seeds]
            ref = [(by[(reference, ref_lr, s)] or {}).get("final_val_loss") for s in seeds] if ref_lr else []
            best[v] = {"lr": lr, "val_loss_mean": groups[_group_key(v, lr)]["val_loss_mean"],
                       "val_loss_std": groups[_group_key(v, lr)]["val_loss_std"],
                       "vs_reference_at_its_best_lr": paired_difference(ours, ref) if ref else None}
    first = next((r for r in records.values() if r), None)
    tokens = first["tokens"] if first else None
    return {
        "reference": reference, "seeds": seeds, "lrs": lrs, "variants": variants,
        "tokens_per_run": tokens, "unique_train_tokens": unique_train_tokens,
        "epochs": tokens / unique_train_tokens if tokens and unique_train_tokens else None,
        "concurrent_runs": concurrent,
        "speed_note": SPEED_NOTE + (f"; {concurrent} runs trained at once and shared the machine"
                                    if concurrent > 1 else ""),
        "groups": groups, "best_lr": best,
        "runs": {k: r for k, r in records.items()},
    }


def _group(v: str, lr, seeds, by: dict, reference: str) -> dict:
    recs = {s: by.get((v, lr, s)) for s in seeds}
    refs = {s: by.get((reference, lr, s)) for s in seeds}
    done = {s: r for s, r in recs.items() if r and r["final_val_loss"] is not None}
    loss = mean_std([r["final_val_loss"] for r in done.values()])
    any_rec = next((r for r in recs.values() if r), None)
    out = {"variant": v, "lr": lr, "seeds_done": sorted(done),
           "params": any_rec["params"] if any_rec else None,
           "params_non_embedding": any_rec["params_non_embedding"] if any_rec else None,
           "flops_per_token": any_rec["flops_per_token"] if any_rec else None,
           "val_loss_mean": loss[0], "val_loss_std": loss[1],
           "tokens_per_s_mean": mean_std([r["tokens_per_s"] for r in done.values()])[0],
           "vs_reference": paired_difference([(recs[s] or {}).get("final_val_loss") for s in seeds],
                                             [(refs[s] or {}).get("final_val_loss") for s in seeds])}
    for axis, field in (("flops", "train_flops"), ("seconds", "train_seconds")):
        values, missing = [], []
        for s in seeds:
            r, ref = recs[s], refs[s]
            if not r or not ref or ref.get(field) is None:
                continue
            y = loss_at(r, axis, ref[field])
            if y is None:
                missing.append(s)
            values.append(y)
        m = mean_std(values)
        out[f"loss_at_reference_{axis}"] = {"mean": m[0], "std": m[1], "per_seed": values,
                                            "seeds_not_reaching": missing}
    return out


def format_table(summary: dict) -> str:
    seeds, lrs = summary["seeds"], summary["lrs"]
    ref = summary["reference"]
    head = (f"sweep: {len(summary['variants'])} variant(s) x {len(seeds)} seed(s) {seeds}"
            + (f" x lrs {[f'{x:g}' for x in lrs]}" if lrs else "") + f", reference {ref}")
    if summary["tokens_per_run"]:
        head += (f"; {summary['tokens_per_run']:,} training tokens a run = {summary['epochs']:.2f} epochs of "
                 f"{summary['unique_train_tokens']:,} unique training tokens")
    w = max([len("variant")] + [len(k) for k in summary["groups"]])
    cols = (f"{'variant':<{w}} {'params':>11} {'FLOP/token':>10} {'val loss (mean ± std)':>22} "
            f"{'Δ vs ' + ref + ' [95% CI], n':>34} {'p':>7} {'tokens/s':>10} {'@ref FLOPs':>10} {'@ref time':>10}")
    lines = [head, cols]

    def num(x, fmt):
        return format(x, fmt) if x is not None else "—"

    notes = []
    for key, g in summary["groups"].items():
        d = g["vs_reference"]
        delta = "—" if g["variant"] == ref else (
            f"{num(d['mean'], '+.4f')} [{num(d['ci_low'], '+.3f')}, {num(d['ci_high'], '+.3f')}], n={d['n']}")
        loss = f"{num(g['val_loss_mean'], '.4f')} ± {num(g['val_loss_std'], '.4f')}"
        fl, tm = g["loss_at_reference_flops"], g["loss_at_reference_seconds"]
        lines.append(f"{key:<{w}} {num(g['params'], ',d'):>11} {num(g['flops_per_token'], '.3e'):>10} "
                     f"{loss:>22} {delta:>34} {num(None if g['variant'] == ref else d['p_value'], '.3g'):>7} "
                     f"{num(g['tokens_per_s_mean'], ',.0f'):>10} {num(fl['mean'], '.4f'):>10} {num(tm['mean'], '.4f'):>10}")
        for name, m in (("FLOPs", fl), ("training time", tm)):
            if m["seeds_not_reaching"]:
                notes.append(f"{key}: seed(s) {m['seeds_not_reaching']} did not reach the reference's {name} "
                             "(left out of that column)")
    if summary.get("best_lr"):
        lines.append("each variant at its own best lr (by mean final val loss):")
        for v, b in summary["best_lr"].items():
            d = b["vs_reference_at_its_best_lr"]
            extra = "" if v == ref or not d else (f", Δ vs {ref} at its best lr {num(d['mean'], '+.4f')} "
                                                  f"[{num(d['ci_low'], '+.3f')}, {num(d['ci_high'], '+.3f')}], "
                                                  f"n={d['n']}, p={num(d['p_value'], '.3g')}")
            lines.append(f"  {v}: lr {b['lr']:g}, val loss {num(b['val_loss_mean'], '.4f')} ± "
                         f"{num(b['val_loss_std'], '.4f')}{extra}")
    lines.append(f"Δ = variant − {ref}, paired by seed (negative favours the variant); CI: Student t, n−1 dof; "
                 "p: paired two-sided t-test")
    lines.append("@ref FLOPs / @ref time: val loss interpolated at the reference run's total training FLOPs "
                 "(6·N_non-emb + 12·L·seq·width, DIFF V1 attention ×16/14) / training seconds, same seed")
    lines.append(summary["speed_note"])
    return "\n".join(lines + notes)
