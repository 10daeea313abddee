"""Run evaluation tasks on models and write what they find.

- :func:`evaluate_path`: one run directory / checkpoint / model folder, some tasks; writes
  ``evals/<task>.json`` and ``evals/<task>.png`` into the run directory (into the model folder when
  there is no run). ``diff-transformer eval RUN --task ...``.
- :func:`evaluate_runs`: groups of runs (e.g. several seeds of DIFF and of the baseline) side by
  side: per-run files as above, plus ``evals.md``, ``evals.json`` and one PNG per task with every
  model in ``out``. ``diff-transformer eval-compare`` and the training ``compare`` call it.

Nothing is written until every task of every model has finished, so a bad option or a missing
input (a UserError) leaves every folder as it was; when either is stopped by anything else (a
crash, Ctrl-C, SIGTERM), the tasks that finished are written into each run's ``evals/``. SIGTERM
then raises :class:`EvalStopped` (the CLI exits 75, as a preempted ``train``; Ctrl-C exits 130).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..fileio import write_bytes_atomically
from . import TASK_MODULES
from .base import TASKS, EvalContext, Task
from .common import dumps

GLOBAL_OPTIONS = ("data",)  # read by the runner itself
MAX_DOCUMENT_TOKENS = 4_000_000  # held-out tokens decoded into documents (the first ones)
EXIT_STOPPED = 75  # EX_TEMPFAIL, as a preempted `train`: the finished tasks are written, rerun for the rest


class EvalStopped(BaseException):
    """SIGTERM arrived while tasks ran. A BaseException, as KeyboardInterrupt, so that a task's own
    ``except Exception`` cannot take it for a failure of its own and carry on."""

    exit_code = EXIT_STOPPED

    def __init__(self):
        super().__init__("stopped by SIGTERM: rerun the tasks that did not finish")


class _SigtermRaises:
    """Within ``with``: SIGTERM raises :class:`EvalStopped` in the main thread, once; while ``held`` (the
    finished tasks are being written) it is ignored, so that the writing is not cut short."""

    def __init__(self):
        self.held = False
        self._previous = None
        self._installed = False

    def _on_sigterm(self, signum, frame) -> None:
        if not self.held:
            self.held = True
            raise EvalStopped()

    def __enter__(self) -> "_SigtermRaises":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)


def load_tasks() -> dict[str, Task]:
    """Every registered task (imports the modules of evals/__init__.py's TASK_MODULES once), in the order of
    TASK_MODULES whatever order the modules were first imported in."""
    for name in TASK_MODULES:
        importlib.import_module(f"{__package__}.{name}")
    rank = {f"{__package__}.{name}": i for i, name in enumerate(TASK_MODULES)}
    return dict(sorted(TASKS.items(), key=lambda item: rank.get(item[1].run.__module__, len(rank))))


def select_tasks(names: str | Sequence[str]) -> list[Task]:
    """Tasks by name (a comma list or a sequence; "all" = every registered task that needs no inputs of its
    own, i.e. registered with ``in_all=True``), in the order given."""
    tasks = load_tasks()
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise UserError(f"no task named: give --task NAME[,NAME...] or --task all (known: {', '.join(tasks)})")
    chosen: list[str] = []
    for n in names:
        for m in ([k for k, t in tasks.items() if t.in_all] if n == "all" else [n]):
            if m not in tasks:
                raise UserError(f"unknown task {m!r}: known tasks are {', '.join(tasks)} (or all)")
            if m not in chosen:
                chosen.append(m)
    return [tasks[n] for n in chosen]


def parse_options(pairs: Sequence[str]) -> dict[str, str]:
    """``["key=value", ...]`` -> dict; a pair without ``=`` or with an empty key is a UserError."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--opt {pair!r} is not key=value (e.g. --opt context=512)")
        out[key.strip()] = value.strip()
    return out


def check_options(tasks: Sequence[Task], options: dict[str, str]) -> None:
    """Refuse ``--opt`` keys that no registered task reads (a misspelling), before anything runs.

    Keys of tasks not selected are accepted, so one option set serves any subset of tasks; the
    check is skipped when a selected task does not declare its options.
    """
    registered = load_tasks().values()
    if any(t.options is None for t in tasks):
        return
    known = set(GLOBAL_OPTIONS).union(*(t.options or () for t in registered))
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"--opt {', '.join(unknown)}: no task reads this option "
                        f"(known options: {', '.join(sorted(known))})")


# Context -----------------------------------------------------------------------------------------
def find_run_dir(path: Path, model_dir: Path) -> Path | None:
    for candidate in (path, model_dir.parent.parent):
        if (candidate / "run.json").is_file():
            return candidate
    return None


def output_folder(run_dir: Path | None, model_dir: Path) -> Path:
    """Where ``evals/`` goes, refused (UserError) when it cannot be written."""
    base = run_dir or model_dir
    evals = base / "evals"
    if not os.access(base, os.W_OK) or (evals.exists() and not os.access(evals, os.W_OK)):
        raise UserError(f"{evals} is not writable: copy the run or model folder somewhere writable and evaluate that")
    return evals


def _documents_from_tokens(tokens: np.ndarray, tokenizer) -> tuple[list[str], list[list[int]]]:
    ids = np.asarray(tokens[:MAX_DOCUMENT_TOKENS])
    cuts = np.flatnonzero(ids == tokenizer.eos_id)
    bounds = zip(np.concatenate([[0], cuts + 1]), np.concatenate([cuts, [len(ids)]]))
    encoded = [ids[a:b].tolist() for a, b in bounds if b > a]
    return [tokenizer.decode(e) for e in encoded], encoded


def _data_from_source(source: str, tokenizer) -> tuple[np.ndarray, list[str], list[list[int]]]:
    from ..data import open_corpus

    docs = [d for d in open_corpus(source).documents()]
    if not docs:
        raise UserError(f"--opt data={source} holds no text")
    encoded = tokenizer.encode_batch(docs)
    stream = np.fromiter((t for e in encoded for t in (*e, tokenizer.eos_id)), dtype=np.int64)
    return stream, docs, encoded


def build_context(path, *, tasks: Sequence[Task], device: str = "cpu", data_cache=None,
                  options: dict[str, str] | None = None, seed: int = 0, progress: bool = True) -> EvalContext:
    """Load the model at ``path`` and, when a task needs it, its held-out data, into an EvalContext."""
    from ..api import load_model_dir, resolve_model_dir

    options = dict(options or {})
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu")
    path = Path(path)
    model_dir = resolve_model_dir(path)
    run_dir = find_run_dir(path, model_dir)
    model, tokenizer = load_model_dir(model_dir, dev)
    run = None
    if run_dir is not None:
        from ..train.config import RunConfig

        run = RunConfig.from_json(run_dir / "run.json")
    amp = dev.type == "cuda" and (run is None or run.train.dtype in ("bf16", "auto"))
    val_tokens = val_documents = encoded = None
    if any(t.needs_data for t in tasks):
        if "data" in options:
            val_tokens, val_documents, encoded = _data_from_source(options["data"], tokenizer)
        elif run is not None:
            from ..data import prepare_dataset
            from ..train.trainer import default_cache_dir

            dataset = prepare_dataset(run.data, Path(data_cache) if data_cache else default_cache_dir())
            if dataset.vocab_size != model.config.vocab_size:
                raise UserError(f"the run's data has {dataset.vocab_size} token ids, the model {model.config.vocab_size}: "
                                "the data changed since training; evaluate with the run's data")
            val_tokens = dataset.val
            val_documents, encoded = _documents_from_tokens(val_tokens, tokenizer)
    ctx = EvalContext(model=model, tokenizer=tokenizer, device=dev, model_dir=model_dir, run_dir=run_dir,
                      val_tokens=val_tokens, val_documents=val_documents, options=options, seed=seed,
                      progress=progress, amp=amp)
    if encoded is not None:
        ctx._encoded_documents = [e for e in encoded if e]
    return ctx


# Running and writing -----------------------------------------------------------------------------
def summary_line(name: str, result: dict) -> str:
    parts = []
    for k, v in (result.get("summary") or {}).items():
        parts.append(f"{k} {v:.4g}" if isinstance(v, (int, float)) and v is not None else f"{k} {v}")
    return f"{name}: " + (", ".join(parts) if parts else str(result.get("lambda", "done")))


def run_tasks(ctx: EvalContext, tasks: Sequence[Task], echo=None, into: dict | None = None) -> dict[str, dict]:
    """``{task name: result}`` (filled into ``into`` as tasks finish, if given); ``echo(line)`` gets each
    task's one-line summary as it finishes."""
    results = {} if into is None else into
    for task in tasks:
        torch.manual_seed(ctx.seed)
        result = task.run(ctx)
        result.setdefault("meta", {"task": task.name, "model_dir": str(ctx.model_dir), "attention":
                                   ctx.model.config.attention, "seed": ctx.seed, "options": dict(ctx.options),
                                   "device": str(ctx.device), "amp_bf16": ctx.amp})
        dumps(result)  # fail here, before anything is written, if a task returned something not strict JSON
        results[task.name] = result
        if echo is not None:
            echo(summary_line(task.name, result))
    return results


def draw(task: Task, labelled: list[tuple[str, dict]], path: Path) -> bool:
    """Draw ``path`` with ``task.plot``; False (with a warning) when there is no PNG."""
    path.unlink(missing_ok=True)  # never leave an older run's figure beside new numbers
    if task.plot is None:
        return False
    try:
        task.plot(labelled, path)
    except Exception as e:  # a figure is never worth losing the numbers
        warnings.warn(f"could not draw {path}: {type(e).__name__}: {e}", stacklevel=2)
        return False
    return path.is_file()


def write_results(out: Path, results: dict[str, dict], label: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, result in results.items():
        write_bytes_atomically(out / f"{name}.json", dumps(result).encode())
        written.append(out / f"{name}.json")
        if draw(TASKS[name], [(label, result)], out / f"{name}.png"):
            written.append(out / f"{name}.png")
    return written


def evaluate_path(path, tasks, *, device: str = "cpu", data_cache=None, options: dict[str, str] | None = None,
                  seed: int = 0, progress: bool = True, echo=None) -> dict[str, dict]:
    """Run ``tasks`` on one run/checkpoint/model folder and write ``evals/`` beside it."""
    tasks = select_tasks(tasks) if isinstance(tasks, str) or (tasks and isinstance(tasks[0], str)) else list(tasks)
    options = dict(options or {})
    check_options(tasks, options)
    ctx = build_context(path, tasks=tasks, device=device, data_cache=data_cache, options=options, seed=seed,
                        progress=progress)
    out = output_folder(ctx.run_dir, ctx.model_dir)
    results: dict[str, dict] = {}
    with _keep_finished_if_stopped([(out, results, _default_label(ctx))]):
        run_tasks(ctx, tasks, echo, into=results)
        write_results(out, results, _default_label(ctx))
    return results


@contextlib.contextmanager
def _keep_finished_if_stopped(started: list[tuple[Path, dict[str, dict], str]]) -> Iterator[None]:
    """Within: SIGTERM raises :class:`EvalStopped`. Any exception but a UserError (a crash, Ctrl-C,
    SIGTERM) first writes the finished tasks of each run in ``started``, ``(evals folder, results so
    far, label)``, which the caller fills as runs begin and tasks finish."""
    with _SigtermRaises() as sigterm:
        try:
            yield
        except UserError:
            raise  # bad input: nothing is written
        except BaseException:
            sigterm.held = True
            for out, results, label in started:
                if results:
                    write_results(out, results, label)  # each file atomically, again if need be
                    print(f"note: wrote the finished tasks ({', '.join(results)}) to {out}", file=sys.stderr)
            raise


def _default_label(ctx: EvalContext) -> str:
    return {"diff": "DIFF", "diff_v2": "DIFF V2", "baseline": "baseline"}.get(ctx.model.config.attention,
                                                                              ctx.model.config.attention)


def _stats(values: list) -> dict:
    finite = [float(v) for v in values if isinstance(v, (int, float)) and v is not None and math.isfinite(v)]
    mean = float(np.mean(finite)) if finite else None
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else None
    return {"values": values, "mean": mean, "std": std, "n": len(finite)}


def _fmt(cell: dict) -> str:
    if cell["mean"] is None:
        return "–"
    s = f"{cell['mean']:.4g}"
    if cell["std"] is not None:  # several runs: mean ± std, then each run's value
        each = ", ".join("–" if v is None else f"{v:.4g}" for v in cell["values"])
        s += f" ± {cell['std']:.2g} ({each})"
    return s


def comparison_table(groups: dict[str, list[dict[str, dict]]], tasks: Sequence[Task]) -> dict:
    """``{task: {metric: {label: {"values" (per run), "mean", "std", "n"}}}}`` from the summaries."""
    table: dict[str, dict] = {}
    for task in tasks:
        metrics: list[str] = []
        for runs in groups.values():
            for results in runs:
                for m in (results[task.name].get("summary") or {}):
                    if m not in metrics:
                        metrics.append(m)
        table[task.name] = {m: {label: _stats([(r[task.name].get("summary") or {}).get(m) for r in runs])
                                for label, runs in groups.items()} for m in metrics}
    return table


def table_markdown(table: dict, labels: list[str], n_runs: dict[str, int]) -> str:
    head = "| task | metric | " + " | ".join(f"{lb} (n={n_runs[lb]})" for lb in labels) + " |"
    lines = [head, "|" + "---|" * (len(labels) + 2)]
    for task, metrics in table.items():
        for m, cells in metrics.items():
            lines.append(f"| {task} | {m} | " + " | ".join(_fmt(cells[lb]) for lb in labels) + " |")
    return "\n".join(lines) + "\n"


MAX_RESULT_BYTES = 64 << 20  # one task's stored result (the largest, needle's samples, is well under 1 MiB)


def stored_results(path: Path, tasks: Sequence[Task]) -> dict[str, dict]:
    """The results of ``tasks`` already in ``path``'s ``evals/`` folder (as ``eval --task`` wrote them),
    for ``eval-compare --reuse``. A task without a file is left out (it will be run); a file that is not
    a result (too large, not JSON, not an object with a ``summary`` object of numbers) is refused."""
    path = Path(path)
    run_dir = find_run_dir(path, path)
    folder = (run_dir or path) / "evals"
    found: dict[str, dict] = {}
    for task in tasks:
        file = folder / f"{task.name}.json"
        if not file.is_file():
            continue
        fix = f"delete it to evaluate {task.name} again, or run without --reuse"
        if file.is_symlink() or file.resolve().parent != folder.resolve():
            raise UserError(f"{file} is a link (results are read only from files inside the run's evals/): {fix}")
        if file.stat().st_size > MAX_RESULT_BYTES:
            raise UserError(f"{file} is {file.stat().st_size:,} bytes, more than an evaluation result can be: {fix}")
        try:
            result = json.loads(file.read_bytes())
        except (OSError, ValueError) as e:
            raise UserError(f"{file} is not valid JSON ({e}): {fix}") from None
        summary = result.get("summary") if isinstance(result, dict) else None
        if not isinstance(summary, dict) or not all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in summary.values()):
            raise UserError(f"{file} is not an evaluation result (no 'summary' object of numbers): {fix}")
        found[task.name] = result
    return found


def _own_options(task: Task, result: dict) -> str:
    """The options a stored result was made with that concern its task (meta keeps every --opt given)."""
    options = (result.get("meta") or {}).get("options")
    options = options if isinstance(options, dict) else {}
    own = options if task.options is None else {k: v for k, v in options.items() if k in task.options}
    return json.dumps(own, sort_keys=True)


def evaluate_runs(groups: dict[str, list[Path]], tasks, *, out: Path | None = None, device: str = "cpu",
                  data_cache=None, options: dict[str, str] | None = None, seed: int = 0, progress: bool = True,
                  write_runs: bool = True, reuse: bool = False, echo=print) -> dict:
    """Evaluate groups of runs (``{"DIFF": [seed1_dir, seed2_dir], "baseline": [...]}``) side by side.

    Each run gets its own ``evals/`` (unless ``write_runs=False``); ``out`` (if given) gets
    ``evals.md`` (the table: per metric, mean ± sample std over a group's runs), ``evals.json``
    (the table with every run's value, and each run's summaries) and ``<task>.png`` with every
    model. Returns the evals.json content. ``tasks``: names, "all", or Task objects.

    ``reuse``: a task whose result a run already holds in its ``evals/`` (from ``eval --task``, e.g.
    on another machine) is read, not run again; a run holding every task needs no checkpoint. The
    options each stored result was made with are in its ``meta``; the table notes tasks whose runs
    were made with different options.
    """
    tasks = select_tasks(tasks) if isinstance(tasks, str) or (tasks and isinstance(tasks[0], str)) else list(tasks)
    options = dict(options or {})
    check_options(tasks, options)
    if not groups or any(not runs for runs in groups.values()):
        raise UserError("eval-compare needs at least one run in every group")
    if out is not None:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file: give a folder")
        probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
        if not os.access(probe, os.W_OK):
            raise UserError(f"--out {out} is not writable")
    per_group: dict[str, list[dict[str, dict]]] = {}
    paths: dict[str, list[Path]] = {}
    started: list[tuple[Path, dict[str, dict], str]] = []  # (evals folder, results so far, label) per run
    with _keep_finished_if_stopped(started):
        for label, runs in groups.items():
            for path in runs:
                if echo:
                    echo(f"[{label}] {path}")
                stored = stored_results(path, tasks) if reuse else {}
                if echo and stored:
                    echo(f"reused from {path}: {', '.join(stored)}")
                todo = [t for t in tasks if t.name not in stored]
                results: dict[str, dict] = {}
                if todo:
                    ctx = build_context(path, tasks=todo, device=device, data_cache=data_cache, options=options,
                                        seed=seed, progress=progress)
                    if write_runs:
                        started.append((output_folder(ctx.run_dir, ctx.model_dir), results, label))
                    run_tasks(ctx, todo, echo, into=results)
                    ctx.model = None  # keep one model in memory at a time
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                per_group.setdefault(label, []).append({t.name: stored.get(t.name) or results[t.name]
                                                        for t in tasks})
                paths.setdefault(label, []).append(Path(path))
        for evals, results, label in started:
            write_results(evals, results, label)
        labels = list(groups)
        table = comparison_table(per_group, tasks)
        n_runs = {lb: len(groups[lb]) for lb in labels}
        md = table_markdown(table, labels, n_runs)
        summary = {
            "tasks": [t.name for t in tasks], "options": options, "seed": seed,
            "groups": {lb: [{"path": str(p), "summaries": {t: r[t].get("summary") for t in r},
                             "options": {t: (r[t].get("meta") or {}).get("options") for t in r}}
                            for p, r in zip(paths[lb], per_group[lb])] for lb in labels},
            "table": table,
        }
        mixed = [t.name for t in tasks if len({_own_options(t, r[t.name]) for runs in per_group.values()
                                                  for r in runs}) > 1]
        if mixed:
            summary["options_differ"] = mixed
            md += (f"\nnote: the runs' results of {', '.join(mixed)} were made with different options "
                   "(each run's are in evals.json)\n")
        if echo:
            echo(md.rstrip())
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            write_bytes_atomically(out / "evals.md", md.encode())
            write_bytes_atomically(out / "evals.json", dumps(summary).encode())
            for task in tasks:
                labelled = [(lb if n_runs[lb] == 1 else f"{lb} #{i + 1}", r[task.name])
                            for lb in labels for i, r in enumerate(per_group[lb])]
                draw(task, labelled, out / f"{task.name}.png")
    return summary

