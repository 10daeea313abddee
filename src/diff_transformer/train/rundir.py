"""The run directory: ``run.json``, ``tokenizer/``, ``checkpoints/`` and ``metrics.jsonl``.

An output folder is accepted when it is new or empty, or when it holds the same run (then the run
resumes). A folder holding another run, or anything that is not a run, is refused and left as it is.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ..errors import UserError
from . import checkpoint as ckpt
from .config import RESUMABLE_CHANGES, RunConfig

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
TOKENIZER_DIR = "tokenizer"
LOCK_FILE = ".lock"  # flock-ed by the train process that owns the folder; holds its PID
# What a start-up killed before run.json was written can leave behind: a rerun finishes the start-up.
START_UP_LEFTOVERS = frozenset({TOKENIZER_DIR, f".{TOKENIZER_DIR}.tmp", LOCK_FILE})


def read_run_config(run_dir) -> RunConfig | None:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    return RunConfig.from_json(path)


def check_output_dir(run_dir, run: RunConfig) -> bool:
    """Raise if ``run_dir`` holds something other than ``run``. True when it holds this run already."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file: choose a folder name")
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return False
    existing = read_run_config(run_dir)
    if existing is None and {p.name for p in run_dir.iterdir()} <= START_UP_LEFTOVERS:
        return False  # write_run_files replaces the leftovers
    if existing is None:
        raise UserError(f"--out {run_dir} is not empty and holds no {RUN_FILE}: choose a new or empty folder")
    diffs = [k for k in run.differences(existing) if k not in RESUMABLE_CHANGES]
    if diffs:
        shown = ", ".join(f"{k} ({_get(existing, k)!r} there, {_get(run, k)!r} now)" for k in diffs[:3])
        more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
        raise UserError(f"--out {run_dir} holds another run (differs in {shown}{more}): "
                        "choose a new --out folder, or repeat that run's settings to resume it")
    return True


def _get(run: RunConfig, key: str):
    section, name = key.split(".", 1) if "." in key else (key, None)
    value = run.to_dict()[section]
    return value.get(name) if name else value


def resolve_resume(run_dir, resume, same_run: bool, warn: Callable[[str], None]) -> Path | None:
    """The checkpoint to start from: ``resume`` is "auto" (the newest good one of this run, if any),
    "require" (as auto, but the run must have one) or a path given by the user (must verify)."""
    if resume not in ("auto", "require") and resume is not None:
        path = Path(resume)
        if ckpt.is_checkpoint_dir(path) or path.name.startswith(ckpt.PREFIX):
            ckpt.verify(path)
            return path
        if (path / RUN_FILE).is_file() or (path / "checkpoints").is_dir():
            found = ckpt.latest_valid(path, warn)
            if found is None:
                raise ckpt.CheckpointError(f"--resume {path}: the run holds no complete checkpoint")
            return found
        raise ckpt.CheckpointError(f"--resume {path}: not a checkpoint folder (checkpoints/step_*) or a run directory")
    if not same_run:
        if resume == "require":
            raise UserError(f"--resume: {run_dir} holds no run to resume; drop --resume to start one")
        return None
    found = ckpt.latest_valid(run_dir, warn)
    if found is None and ckpt.complete_checkpoints(run_dir):
        raise ckpt.CheckpointError(f"no checkpoint in {run_dir} passes verification (see the warnings above): "
                                   "pass --resume PATH to a good one or choose a new --out")
    if found is None and resume == "require":
        raise UserError(f"--resume: {run_dir} has no complete checkpoint yet; drop --resume to start the run again")
    return found


def write_run_files(run_dir, run: RunConfig, tokenizer) -> None:
    """Create the run directory's ``run.json`` and ``tokenizer/`` (rank 0 only)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tok_dir = run_dir / TOKENIZER_DIR
    if tok_dir.is_dir() and not (run_dir / RUN_FILE).is_file():
        shutil.rmtree(tok_dir)  # left by a start-up killed before run.json: maybe of other data settings
    if not tok_dir.is_dir():
        tmp = run_dir / f".{TOKENIZER_DIR}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        tokenizer.save(tmp)
        tmp.rename(tok_dir)
    ckpt.atomic_write_bytes(run_dir / RUN_FILE, (run.to_json() + "\n").encode())


@contextlib.contextmanager
def exclusive(run_dir):
    """Hold an exclusive ``flock`` on ``RUN_DIR/.lock`` (created, with the run directory) until the block
    ends or the process dies; a second train process on the folder gets a UserError naming the holder."""
    import fcntl

    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        f = open(run_dir / LOCK_FILE, "a+")
    except OSError as e:
        raise UserError(f"cannot write to --out {run_dir} ({e.strerror or e}): choose a writable folder") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip()[:20] or "unknown"
            raise UserError(f"--out {run_dir} is in use by another train process (PID {holder}): wait for it to "
                            "end (or stop it), or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def json_safe(obj):
    """``obj`` with non-finite floats as None: metrics files stay strict JSON (no bare NaN/Infinity)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def rewrite_metrics(run_dir, records: list[dict]) -> None:
    """metrics.jsonl as of a checkpoint: records logged after it (before a crash) are dropped."""
    text = "".join(json.dumps(json_safe(r), sort_keys=True, allow_nan=False) + "\n" for r in records)
    ckpt.atomic_write_bytes(Path(run_dir) / METRICS_FILE, text.encode())


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_record_folder(out: Path, record_file: str, record: dict, keys: tuple[str, ...], what: str) -> None:
    """Refuse ``out`` unless it is new, empty, or holds ``record_file`` equal to ``record`` on ``keys``
    (the same ``what`` -- a compare, a sweep -- repeated to resume it). One UserError names the difference."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: choose a folder name")
    if not out.exists() or not any(out.iterdir()):
        return
    path = out / record_file
    if not path.is_file():
        raise UserError(f"--out {out} is not empty and holds no {record_file}: choose a new or empty folder")
    try:
        existing = json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path} is not valid JSON: choose a new --out folder") from None
    if not isinstance(existing, dict):
        raise UserError(f"{path} holds no {what} record: choose a new --out folder")
    diffs = [k for k in keys if existing.get(k) != record.get(k)]
    if not diffs:
        return
    if "run" in diffs and isinstance(existing.get("run"), dict):
        try:  # name the changed fields rather than "run"
            fields = RunConfig.from_dict(record["run"]).differences(RunConfig.from_dict(existing["run"], str(path)))
        except UserError:
            fields = []
        diffs = (fields or ["run"]) + [d for d in diffs if d != "run"]
    raise UserError(f"--out {out} holds another {what} (differs in {', '.join(diffs[:4])}): "
                    f"choose a new --out folder, or repeat that {what}'s settings to resume it")
