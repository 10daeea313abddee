"""What every evaluation task shares: the context it reads and the registry the CLI looks tasks up in.

A task is one file in this package that calls :func:`register` at import time with

- ``run(ctx: EvalContext) -> dict``: the measurement. The dict is JSON-able (no NaN/Infinity: use
  None) and holds a ``"summary"`` entry, a flat ``{metric_name: float | None}`` that the compare
  table and the report show side by side; everything else (curves, grids, per-layer lists) is the
  task's own.
- ``plot(results: list[tuple[str, dict]], path: Path) -> None``: draw one PNG from one or several
  labelled results (``[("DIFF seed 1", result), ...]``), so the same function serves ``eval`` on one
  run and ``eval-compare`` on a pair.

Tasks read models; the model never imports this package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError


@dataclass
class EvalContext:
    """Everything a task may read. Built once per model by the runner."""

    model: Any  # DiffTransformerLM in eval mode, on ``device``
    tokenizer: Any  # the model's tokenizer (encode/decode/eos_id/vocab_size)
    device: torch.device
    model_dir: Path  # the folder holding config.json + model.safetensors (a checkpoint or model folder)
    run_dir: Path | None  # the run directory when there is one (metrics.jsonl, run.json), else None
    val_tokens: np.ndarray | None  # held-out token ids (documents separated by EOS), or None without data
    val_documents: list[str] | None  # held-out documents as text (haystacks, long documents), or None
    options: dict[str, str] = field(default_factory=dict)  # --opt key=value for the tasks, as strings
    seed: int = 0  # every random choice of a task derives from this
    progress: bool = True  # show progress bars on long work
    amp: bool = False  # bf16 autocast (CUDA runs trained in bf16)

    def option(self, name: str, default, cast: Callable[[str], Any] | None = None):
        """Task option ``name`` from ``--opt``, cast like ``default`` (or by ``cast``); a bad value is a UserError."""
        if name not in self.options:
            return default
        raw = self.options[name]
        cast = cast or (type(default) if default is not None else str)
        try:
            if cast is bool:
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(raw)
                return raw.lower() in ("1", "true", "yes")
            return cast(raw)
        except (TypeError, ValueError):
            raise UserError(f"--opt {name}={raw!r} is not a valid {getattr(cast, '__name__', cast)}") from None


@dataclass(frozen=True)
class Task:
    name: str
    run: Callable[[EvalContext], dict]
    plot: Callable[[list[tuple[str, dict]], Path], None] | None
    description: str  # one line for --help and the report
    needs_data: bool = True  # reads val_tokens / val_documents
    options: tuple[str, ...] | None = None  # the --opt keys it reads; None = undeclared (keys not checked)
    in_all: bool = True  # part of --task all; False for tasks that need inputs of their own (a dataset, a package)


TASKS: dict[str, Task] = {}


def register(name: str, run, plot=None, *, description: str, needs_data: bool = True,
             options: tuple[str, ...] | None = None, in_all: bool = True) -> None:
    """Add a task. ``options`` names the ``--opt`` keys it reads, so the runner can refuse a misspelt key
    before anything runs (leave it None to skip that check for this task). ``in_all=False`` keeps a task
    that needs inputs of its own (``--opt dataset=...``, an optional package) out of ``--task all``."""
    if name in TASKS:
        raise ValueError(f"evaluation task {name!r} registered twice")
    TASKS[name] = Task(name, run, plot, description, needs_data, tuple(options) if options is not None else None,
                       in_all)
