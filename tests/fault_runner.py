"""Run ``diff-transformer`` (``diff_transformer.cli.main``) with one injected fault; for test_fault_tolerance.py.

    python tests/fault_runner.py train --preset tiny ... --out RUN

The command line is the user's; the fault comes from the environment, so a rerun is the same command:

``FAULT=kill_step:N``      SIGKILL during training step N (1-based), after its backward, before the update.
``FAULT=term_step:N``      SIGTERM during training step N (the trainer finishes the step, saves, exits 75).
``FAULT=save:N:STAGE``     SIGKILL inside the save of the checkpoint of step N, at STAGE:
    ``before``    the folder exists, no file written yet;
    ``mid``       half of ``optimizer.safetensors`` written to its temporary name (the weights already renamed);
    ``manifest``  every file in place, ``manifest.json`` written to its temporary name but not renamed;
    ``marker``    ``COMPLETE`` written to its temporary name but not renamed;
    ``prune``     after the commit, before older checkpoints are deleted.
``FAULT=slow_task:PATH``   register an evaluation task ``slow`` that creates PATH, then sleeps (until a signal).
``FAULT_BATCH_LOG=PATH``   append ``{"step": s, "x": token ids}`` for every training batch the trainer takes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

from diff_transformer.cli import main
from diff_transformer.data import Batches
from diff_transformer.train import checkpoint as ckpt
from diff_transformer.train.trainer import Trainer


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def at_step(n: int, sig: int) -> None:
    orig = Trainer.train_step

    def train_step(self):
        out = orig(self)
        if self.step + 1 == n:
            os.kill(os.getpid(), sig)
        return out

    Trainer.train_step = train_step


def in_save(step: int, stage: str) -> None:
    folder = f"{ckpt.PREFIX}{step:08d}"
    orig_write, orig_prune = ckpt.atomic_write, ckpt.prune

    def atomic_write(path: Path, write) -> None:
        if path.parent.name != folder or stage == "prune":
            return orig_write(path, write)
        if stage == "before":
            die()
        last = {"mid": ckpt.OPTIM_TENSORS, "manifest": ckpt.MANIFEST, "marker": ckpt.MARKER}[stage]
        if path.name != last:
            return orig_write(path, write)
        tmp = path.with_name(f".{path.name}.tmp")
        write(tmp)
        if stage == "mid":
            data = tmp.read_bytes()
            tmp.write_bytes(data[: len(data) // 2])
        die()

    def prune(run_dir, keep_last):
        if stage == "prune" and (ckpt.checkpoints_dir(run_dir) / folder / ckpt.MARKER).is_file():
            die()
        return orig_prune(run_dir, keep_last)

    ckpt.atomic_write, ckpt.prune = atomic_write, prune


def log_batches(path: str) -> None:
    orig = Batches.batch
    out = open(path, "a")

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = orig(self, step, rank, world_size)
        out.write(json.dumps({"step": step, "x": torch.as_tensor(x).tolist()}) + "\n")
        out.flush()  # a SIGKILL loses nothing already handed to the OS
        return x, y

    Batches.batch = batch


def slow_task(ready: str) -> None:
    import time

    from diff_transformer.evals.base import register

    def run(ctx):
        Path(ready).touch()  # the tasks before this one have finished
        time.sleep(300)
        return {"summary": {}}

    register("slow", run, description="sleeps (a test's stand-in for a long task)", needs_data=False, options=())


def install(spec: str) -> None:
    kind, _, rest = spec.partition(":")
    if kind == "kill_step":
        at_step(int(rest), signal.SIGKILL)
    elif kind == "term_step":
        at_step(int(rest), signal.SIGTERM)
    elif kind == "slow_task":
        slow_task(rest)
    elif kind == "save":
        step, stage = rest.split(":")
        in_save(int(step), stage)
    elif kind:
        raise SystemExit(f"fault_runner: unknown FAULT {spec!r}")


if __name__ == "__main__":
    install(os.environ.get("FAULT", ""))
    if os.environ.get("FAULT_BATCH_LOG"):
        log_batches(os.environ["FAULT_BATCH_LOG"])
    sys.exit(main(sys.argv[1:]))
