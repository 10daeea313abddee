"""Helpers the evaluation tasks share: strict JSON, optional matplotlib, progress, autocast, probing, text.

Nothing here measures anything; each measurement lives in its own task file.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .base import EvalContext


# JSON ------------------------------------------------------------------------------------------
def jsonable(obj):
    """``obj`` with numpy/torch scalars and arrays made plain, and NaN/±Infinity replaced by None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        x = float(obj)
        return x if math.isfinite(x) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps(obj) -> str:
    """Strict JSON text (``allow_nan=False``: a non-finite number that slipped through is a bug)."""
    return json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n"


# Plots -----------------------------------------------------------------------------------------
def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a warning) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: the JSON results are written, no PNG", stacklevel=2)
        return None
    return plt


def save_figure(fig, path: Path) -> None:
    """Save ``fig`` as ``path`` through a temporary name (the PNG appears whole or not at all)."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


# Running models --------------------------------------------------------------------------------
def progress(it: Iterable, ctx: EvalContext, desc: str, total: int | None = None) -> Iterator:
    """``it`` with a tqdm bar when ``ctx.progress`` (on stderr; absent tqdm means no bar)."""
    if not ctx.progress:
        yield from it
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        yield from it
        return
    yield from tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True)


def autocast(ctx: EvalContext):
    """bf16 autocast when ``ctx.amp`` (a CUDA run trained in bf16), else a no-op."""
    return torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.amp)


PROBED_ATTENTION = ("baseline", "diff", "diff_v2")


def require_probe_support(ctx: EvalContext, task: str) -> str:
    """The model's attention kind; a UserError for kinds the attention probe cannot read."""
    kind = ctx.model.config.attention
    if kind not in PROBED_ATTENTION:
        raise UserError(f"task {task} is not supported for attention={kind} (only {', '.join(PROBED_ATTENTION)})")
    return kind


@contextlib.contextmanager
def probing(model, probe):
    """Activate ``probe`` with its layer index set by hooks on each block's ``self_attn``."""
    remove = probe.watch([block.self_attn for block in model.layers])
    try:
        with probe:
            yield probe
    finally:
        remove()


def run_config(ctx: EvalContext):
    """The run's RunConfig (run.json) or None for a bare model folder."""
    if ctx.run_dir is None or not (ctx.run_dir / "run.json").is_file():
        return None
    from ..train.config import RunConfig

    return RunConfig.from_json(ctx.run_dir / "run.json")


def require_data(ctx: EvalContext, task: str) -> None:
    if ctx.val_tokens is None or ctx.val_documents is None:
        raise UserError(f"task {task} needs held-out text: evaluate a run directory, or name a text source "
                        "with --opt data=PATH (a .txt/.jsonl/.parquet file or a folder)")


def int_list(ctx: EvalContext, name: str, default: list[int]) -> list[int]:
    return [int(x) for x in _list(ctx, name, default, int)]


def float_list(ctx: EvalContext, name: str, default: list[float]) -> list[float]:
    return [float(x) for x in _list(ctx, name, default, float)]


def _list(ctx: EvalContext, name: str, default: list, cast) -> list:
    if name not in ctx.options:
        return list(default)
    raw = ctx.options[name]
    try:
        values = [cast(x) for x in raw.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise UserError(f"--opt {name}={raw!r} is not a comma-separated list of {cast.__name__} values")
    return values


def positive(name: str, value, minimum=1):
    if value < minimum:
        raise UserError(f"--opt {name}={value} must be at least {minimum}")
    return value


# Text ------------------------------------------------------------------------------------------
def encoded_documents(ctx: EvalContext) -> list[list[int]]:
    """The held-out documents as token ids (cached on the context)."""
    cached = getattr(ctx, "_encoded_documents", None)
    if cached is None:
        require_data(ctx, "this task")
        cached = [ids for ids in ctx.tokenizer.encode_batch(ctx.val_documents) if ids]
        ctx._encoded_documents = cached
    return cached


def haystack_ids(ctx: EvalContext, n_tokens: int, rng: np.random.Generator) -> tuple[list[int], bool]:
    """At least ``n_tokens`` ids of ordinary text for a needle haystack, and whether text had to repeat.

    From ``--opt haystack=FILE`` when given, else the held-out documents joined by a blank line,
    starting at a document chosen by ``rng`` and wrapping around.
    """
    source = ctx.options.get("haystack")
    if source is not None:
        cached = getattr(ctx, "_haystack_file", None)
        if cached is None:
            path = Path(source)
            if not path.is_file():
                raise UserError(f"--opt haystack={source}: no such file; give a UTF-8 text file")
            cached = ctx.tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
            if not cached:
                raise UserError(f"--opt haystack={source} is empty")
            ctx._haystack_file = cached
        docs = [cached]
    else:
        docs = encoded_documents(ctx)
        if not docs:
            raise UserError("the held-out documents are empty: no haystack for the needles")
    sep = ctx.tokenizer.encode("\n\n")
    start = int(rng.integers(len(docs)))
    out: list[int] = []
    i = 0
    while len(out) < n_tokens:
        out.extend(docs[(start + i) % len(docs)])
        out.extend(sep)
        i += 1
    total = sum(len(d) + len(sep) for d in docs)
    return out, total < n_tokens


def label_colors(n: int) -> list:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def integer_ticks():
    """A tick locator for layer axes (whole numbers only)."""
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)
