"""Checkpoints that are either complete and verified, or ignored.

Layout of ``RUN_DIR/checkpoints/step_XXXXXXXX/``::

    config.json, model.safetensors, <tokenizer files>   a model folder (diff_transformer.load reads it)
    optimizer.safetensors, optimizer.json               AdamW tensors by parameter name; groups and scalars
    rng.safetensors                                     RNG states as tensors (torch CPU/CUDA as uint8)
    trainer_state.json                                  step (= data position), counters, metrics so far, run config
    manifest.json                                       SHA-256 and size of every file above
    COMPLETE                                            written last; holds the manifest's SHA-256

Every file is written to a temporary name in the same folder, flushed, fsynced and renamed; the
folder is fsynced after the renames. A folder without ``COMPLETE`` is an interrupted save: it is never
loaded and is removed by the next save. Nothing here unpickles: tensors come from safetensors and
everything else from JSON. In a distributed run rank 0 writes, and commits (``COMPLETE``) only after
a barrier (see the trainer).

Any world size resumes any checkpoint, under DDP or FSDP2: the tensors are full (unsharded) and keyed
by parameter name, gathered to rank 0 by ``get_model_state_dict`` / ``get_optimizer_state_dict``
(``full_state_dict=True, cpu_offload=True``: one tensor at a time through the GPU, the result in rank 0's
host memory), and ``set_*_state_dict`` shards them again on load. Chosen over PyTorch's sharded
distributed checkpoint because the folder stays a model folder (``diff_transformer.load``, the
transformers export) written by one process, so the atomic commit above stays as it is. Cost at
``paper-1.4b`` (1,625,149,440 parameters with the paper's 100,288-token vocabulary): weights and two AdamW
moments in fp32 are 19.5 GB of rank 0's host memory during a save (safetensors writes from the tensors,
without a copy) and of every rank's while resuming; writing and hashing them takes about 25 s on NVMe
(~2 GB/s write, ~1.5 GB/s SHA-256). Past ~10B parameters (120 GB a checkpoint) a sharded format is the
better choice.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import ModelConfig
from ..fileio import sha256_file
from ..errors import UserError
from ..data.tokenizer import BPE_FILE, META_FILE, TIKTOKEN_FILE, saved_tokenizer_files
from ..serialization import CONFIG_NAME, WEIGHTS_NAME, check_finite, config_bytes, load_config, save_weights

MARKER = "COMPLETE"
MANIFEST = "manifest.json"
OPTIM_TENSORS = "optimizer.safetensors"
OPTIM_META = "optimizer.json"
RNG = "rng.safetensors"
STATE = "trainer_state.json"
PREFIX = "step_"


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the run."""


class CheckpointWarning(UserWarning):
    """Auto-resume skipped a checkpoint that failed verification."""


def checkpoints_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"{PREFIX}{step:08d}"


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


# Atomic file writes --------------------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` a temporary file beside ``path``, fsync it, then rename it onto ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


sha256 = sha256_file  # the manifest's hash of one file


# State <-> files ----------------------------------------------------------------------------------
def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A name-keyed optimizer state dict (``get_optimizer_state_dict``) -> (tensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pname, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pname}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(pname, {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict[str, Any]] = {}
    for name, t in tensors.items():
        pname, key = name.rsplit("/", 1)
        state.setdefault(pname, {})[key] = t
    for pname, values in meta.get("scalars", {}).items():
        state.setdefault(pname, {}).update(values)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """Every RNG the process uses, as tensors (safetensors) and JSON scalars. Nothing is pickled."""
    tensors = {"torch_cpu": torch.get_rng_state()}  # uint8
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s  # uint8
    version, internal, gauss = random.getstate()
    tensors["python"] = torch.tensor(internal, dtype=torch.int64)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    return tensors, {"python_version": version, "python_gauss": gauss, "numpy_kind": kind, "numpy_pos": int(pos),
                     "numpy_has_gauss": int(has_gauss), "numpy_cached_gaussian": float(cached)}


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    random.setstate((meta["python_version"], tuple(int(x) for x in tensors["python"].tolist()), meta["python_gauss"]))
    np.random.set_state((meta["numpy_kind"], tensors["numpy"].numpy().astype(np.uint32), meta["numpy_pos"],
                         meta["numpy_has_gauss"], meta["numpy_cached_gaussian"]))


# Save ------------------------------------------------------------------------------------------------
def write_checkpoint(
    path: Path,
    *,
    model_config: ModelConfig,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    trainer_state: dict,
    tokenizer=None,
) -> None:
    """Write every file of a checkpoint and its manifest; :func:`commit` then marks it complete."""
    path = Path(path)
    if path.exists():
        if (path / MARKER).exists():
            try:
                verify(path)
            except CheckpointError:  # a corrupt one that resume skipped: this save replaces it
                (path / MARKER).unlink()
                fsync_dir(path)
            else:
                raise FileExistsError(f"{path} is already a complete checkpoint")
        shutil.rmtree(path)  # an interrupted earlier save of this step
    path.mkdir(parents=True)
    names: list[str] = []

    def put(name: str, write: Callable[[Path], None]) -> None:
        atomic_write(path / name, write)
        names.append(name)

    put(WEIGHTS_NAME, lambda tmp: save_weights(model_state, tmp))
    put(CONFIG_NAME, lambda tmp: tmp.write_bytes(config_bytes(model_config)))
    if tokenizer is not None:
        with tempfile.TemporaryDirectory(dir=path, prefix=".tokenizer-") as tmpdir:
            tokenizer.save(tmpdir)
            for src in sorted(Path(tmpdir).iterdir()):
                if src.is_file():
                    put(src.name, lambda tmp, src=src: shutil.copyfile(src, tmp))
    tensors, meta = flatten_optimizer(optimizer_state)
    put(OPTIM_TENSORS, lambda tmp: save_file(tensors, str(tmp)))
    put(OPTIM_META, lambda tmp: tmp.write_bytes(json.dumps(meta, indent=2, sort_keys=True).encode()))
    rng_tensors, rng_meta = capture_rng()
    put(RNG, lambda tmp: save_file(rng_tensors, str(tmp)))
    state = {**trainer_state, "rng": rng_meta}
    put(STATE, lambda tmp: tmp.write_bytes(json.dumps(state, indent=2, sort_keys=True).encode()))
    manifest = {"step": trainer_state["step"],
                "files": {n: {"sha256": sha256(path / n), "bytes": (path / n).stat().st_size} for n in sorted(names)}}
    atomic_write_json(path / MANIFEST, manifest)
    fsync_dir(path)


def commit(path: Path) -> None:
    """Mark ``path`` complete: the marker is the last file written, and it pins the manifest."""
    path = Path(path)
    atomic_write_json(path / MARKER, {"manifest_sha256": sha256(path / MANIFEST)})
    fsync_dir(path)
    fsync_dir(path.parent)


def complete_checkpoints(run_dir) -> list[Path]:
    """Checkpoint folders holding the completion marker, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / MARKER).is_file()]
    return sorted(found, key=step_of)


def prune(run_dir, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints and every interrupted save
    older than the newest complete one. Returns the deleted folders."""
    complete = complete_checkpoints(run_dir)
    doomed = complete[:-keep_last] if keep_last < len(complete) else []
    newest = step_of(complete[-1]) if complete else -1
    root = checkpoints_dir(run_dir)
    if root.is_dir():
        doomed += [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                   and p.name[len(PREFIX):].isdigit() and not (p / MARKER).exists() and step_of(p) < newest]
    for p in doomed:
        (p / MARKER).unlink(missing_ok=True)  # first, so a crash mid-delete leaves an incomplete folder
        fsync_dir(p)
        shutil.rmtree(p)
    return doomed


def remove_after(run_dir, step: int) -> list[Path]:
    """Delete the complete checkpoints newer than ``step`` (a run resumed from an older checkpoint replaces
    them). Returns the deleted folders."""
    doomed = [p for p in complete_checkpoints(run_dir) if step_of(p) > step]
    for p in reversed(doomed):  # newest first: a crash midway leaves an older newest checkpoint
        (p / MARKER).unlink(missing_ok=True)
        fsync_dir(p)
        shutil.rmtree(p)
    return doomed


# Load ------------------------------------------------------------------------------------------------
def verify(path) -> dict:
    """Check the marker, the manifest and every file's SHA-256; return the manifest.

    Raises :class:`CheckpointError` naming the bad file (and, for corruption, both hashes)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist: point --resume at a checkpoints/step_* folder")
    if not (path / MARKER).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {MARKER} marker; its save was interrupted): "
                              "resume from an earlier checkpoint")
    try:
        marker = json.loads((path / MARKER).read_text())
        manifest_hash = sha256(path / MANIFEST)
        if marker.get("manifest_sha256") != manifest_hash:
            raise CheckpointError(f"checkpoint {path}: {MANIFEST} has SHA-256 {manifest_hash}, {MARKER} expects "
                                  f"{marker.get('manifest_sha256')}: the checkpoint is corrupt; resume from an earlier one")
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        _check_listing(path, files)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {MARKER} or {MANIFEST} ({e}): resume from an earlier one") from None
    for name, entry in sorted(files.items()):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: file {name} is missing: the checkpoint is corrupt; resume from an earlier one")
        actual = sha256(f)
        if actual != entry["sha256"]:
            raise CheckpointError(
                f"checkpoint {path}: file {name} has SHA-256 {actual}, the manifest says {entry['sha256']}: "
                "the file is corrupt; resume from an earlier checkpoint"
            )
    named = [p.name for p in saved_tokenizer_files(path)]  # read only now that tokenizer_meta.json verified
    if not set(named) <= set(files):
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} does not list the tokenizer files {sorted(named)}: "
                              "the checkpoint was altered; resume from an earlier one")
    return manifest


REQUIRED = (WEIGHTS_NAME, CONFIG_NAME, OPTIM_TENSORS, OPTIM_META, RNG, STATE)  # what load_checkpoint reads


def _check_listing(path: Path, files) -> None:
    """The manifest lists exactly the files a load reads: plain names in the folder, every required file,
    and the tokenizer files when the folder holds a tokenizer (load() reads them too)."""
    if not isinstance(files, dict) or not all(isinstance(e, dict) and isinstance(e.get("sha256"), str)
                                              for e in files.values()):
        raise TypeError("'files' must map file names to {'sha256': ...}")
    allowed = set(REQUIRED) | {META_FILE, BPE_FILE, TIKTOKEN_FILE}
    stray = sorted(n for n in files if n not in allowed)
    missing = sorted(n for n in REQUIRED if n not in files)
    if (path / META_FILE).exists() and META_FILE not in files:
        missing.append(META_FILE)
    if stray or missing:
        what = "; ".join(([f"names files a checkpoint does not hold {stray[:3]}"] if stray else []) +
                         ([f"does not list {missing}"] if missing else []))
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} {what}: the checkpoint was altered or is not one "
                              "of this project's; resume from an earlier one")


def latest_valid(run_dir, warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest complete checkpoint that verifies; corrupt newer ones are skipped with a warning."""
    for path in reversed(complete_checkpoints(run_dir)):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            msg = f"skipping checkpoint {path.name}: {e}"
            if warn is not None:
                warn(msg)
            warnings.warn(msg, CheckpointWarning, stacklevel=2)
    return None


@dataclass
class Checkpoint:
    path: Path
    model_config: ModelConfig
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict
    trainer_state: dict
    rng_tensors: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.trainer_state["step"])

    def restore_rng(self) -> None:
        restore_rng(self.rng_tensors, self.trainer_state["rng"])


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def load_checkpoint(path, *, verified: bool = False) -> Checkpoint:
    """Load a checkpoint folder after verifying it (unless ``verified``)."""
    path = Path(path)
    if not verified:
        verify(path)
    try:
        model_config = load_config(path)
        trainer_state = json.loads((path / STATE).read_text())
        optim_meta = json.loads((path / OPTIM_META).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read its JSON files ({e})") from None
    try:
        _check_trainer_state(path, trainer_state)
        optimizer_state = unflatten_optimizer(_load_tensors(path / OPTIM_TENSORS), optim_meta)
        if not (isinstance(optimizer_state["param_groups"], list)
                and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in optimizer_state["param_groups"])):
            raise ValueError("param_groups must be a list of groups with their 'params'")
        rng_tensors = _load_tensors(path / RNG)
        _check_rng(rng_tensors, trainer_state["rng"])
        model_state = _load_tensors(path / WEIGHTS_NAME)
        check_finite(model_state, str(path / WEIGHTS_NAME))
        check_finite({f"{p}/{k}": v for p, s in optimizer_state["state"].items() for k, v in s.items()
                      if isinstance(v, torch.Tensor)}, str(path / OPTIM_TENSORS))
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, IndexError) as e:
        raise CheckpointError(f"checkpoint {path}: malformed {OPTIM_META}, {STATE} or {RNG} ({type(e).__name__}: "
                              f"{str(e)[:200]}): resume from an earlier checkpoint") from None
    return Checkpoint(
        path=path,
        model_config=model_config,
        model_state=model_state,
        optimizer_state=optimizer_state,
        trainer_state=trainer_state,
        rng_tensors=rng_tensors,
    )


def _check_trainer_state(path: Path, state) -> None:
    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63

    if not isinstance(state, dict) or not is_int(state.get("step")):
        raise ValueError("'step' must be a non-negative integer")
    if not all(is_int(state.get(k, 0)) for k in ("bad_steps_total", "consecutive_bad_steps")):
        raise ValueError("the bad-step counters must be non-negative integers")
    if not (state.get("last_rollback_to") is None or is_int(state["last_rollback_to"])):
        raise ValueError("'last_rollback_to' must be null or a step")
    if not (isinstance(state.get("metrics", []), list) and all(isinstance(m, dict) for m in state.get("metrics", []))):
        raise ValueError("'metrics' must be a list of records")
    if not isinstance(state.get("rng"), dict):
        raise ValueError("'rng' must be an object")
    if path.name.startswith(PREFIX) and path.name[len(PREFIX):].isdigit() and state["step"] != step_of(path):
        raise ValueError(f"'step' is {state['step']} in a folder of step {step_of(path)}")


def _check_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Restore the RNG states once and put the current ones back: raises what a resume would."""
    saved_tensors, saved_meta = capture_rng()
    try:
        restore_rng(tensors, meta)
    finally:
        restore_rng(saved_tensors, saved_meta)


def same_tokenizer(path, tokenizer) -> bool:
    """Whether ``tokenizer`` saves exactly the tokenizer files stored in checkpoint ``path``."""
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        return all((path / f.name).is_file() and sha256(path / f.name) == sha256(f)
                   for f in Path(tmp).iterdir() if f.is_file())


def is_checkpoint_dir(path) -> bool:
    return (Path(path) / MANIFEST).is_file() or (Path(path) / MARKER).is_file()
