"""Where ``auto`` takes the fused kernel: a table of measured winners, read once from package data.

``auto_table.json`` holds, for each variant (``v1``: value width 2d, ``v2``: width d), mode (``train``: a
backward follows; ``infer``: forward only) and head dim, the key lengths M where the kernel
(``triton``) or SDPA (``sdpa``) was the faster on a GPU, as ranges that end at their longest M:

    {"format": 1, "meta": {"gpu": ..., "torch": ..., "triton": ..., "date": ..., "command": ...},
     "entries": [{"variant": "v1", "mode": "train", "head_dim": 128, "measured_n": [2048, ...],
                  "ranges": [{"max_keys": 16384, "backend": "triton"}, {"max_keys": null, "backend": "sdpa"}]},
                 ...]}

``benchmarks/attention.py --auto-table --write-table PATH`` measures and writes one (``build_table``),
and without ``--write-table`` checks the table in use (``check_auto``: ``auto`` within 3% of the
faster backend at every measured shape). A head dim the table lacks takes the nearest one it has (by
ratio, ties to the larger); fewer than ``AUTO_MIN_QUERIES`` queries (decoding) take SDPA whatever the
table says. A missing or malformed table falls back, with a warning, to the thresholds below.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch
from torch import Tensor

FORMAT = 1
VARIANTS = ("v1", "v2")
MODES = ("train", "infer")
CHOICES = ("triton", "sdpa")
TABLE_PATH = Path(__file__).with_name("auto_table.json")
AUTO_TOLERANCE = 0.03  # the benchmark's check: auto at most 3% slower than the faster backend

# The fallback, from an H200 at head dim 128 (bf16, causal, 32K tokens a batch; benchmarks/NOTES.md):
# the longest key sequence where the kernel beat every SDPA path, for training and for inference,
# and the fewest queries (decoding one token at a time went faster through SDPA).
AUTO_MAX_KEYS = {("v1", "train"): 16384, ("v1", "infer"): 2048, ("v2", "train"): 4096, ("v2", "infer"): 8192}
AUTO_MIN_QUERIES = 16

Ranges = tuple[tuple[int | None, str], ...]  # (longest M of the range or None = no limit, backend), M increasing


@dataclasses.dataclass(frozen=True)
class AutoTable:
    """A validated table: ``ranges[variant, mode][head_dim]``, head dims in decreasing order."""

    ranges: dict[tuple[str, str], dict[int, Ranges]]
    document: dict  # the JSON document it was parsed from
    fallback_reason: str | None = None  # why the built-in thresholds are used instead of the file


def parse(doc) -> AutoTable:
    """Validate a table document (parsed JSON); ValueError names the first problem."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"not an auto table of format {FORMAT}")
    if not isinstance(doc.get("meta"), dict) or not isinstance(doc.get("entries"), list):
        raise ValueError("an auto table needs a 'meta' object and an 'entries' list")
    ranges: dict[tuple[str, str], dict[int, Ranges]] = {}
    for i, e in enumerate(doc["entries"]):
        if not isinstance(e, dict):
            raise ValueError(f"entry {i} is not an object")
        variant, mode, d = e.get("variant"), e.get("mode"), e.get("head_dim")
        if variant not in VARIANTS or mode not in MODES:
            raise ValueError(f"entry {i}: variant must be one of {VARIANTS} and mode one of {MODES}")
        if not _positive_int(d):
            raise ValueError(f"entry {i}: head_dim must be a positive integer; got {d!r}")
        if d in ranges.get((variant, mode), {}):
            raise ValueError(f"entry {i}: a second entry for {variant} {mode} head_dim {d}")
        ranges.setdefault((variant, mode), {})[d] = _parse_ranges(e.get("ranges"), f"entry {i}")
    missing = [key for key in AUTO_MAX_KEYS if key not in ranges]
    if missing:
        raise ValueError(f"no entry for {missing}")
    ranges = {key: dict(sorted(by_dim.items(), reverse=True)) for key, by_dim in ranges.items()}
    return AutoTable(ranges, doc)


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _parse_ranges(rs, where: str) -> Ranges:
    if not isinstance(rs, list) or not rs:
        raise ValueError(f"{where}: ranges must be a non-empty list")
    out, last = [], 0
    for j, r in enumerate(rs):
        if not isinstance(r, dict) or r.get("backend") not in CHOICES:
            raise ValueError(f"{where}, range {j}: needs a backend, one of {CHOICES}")
        m = r.get("max_keys")
        final = j == len(rs) - 1
        if final and m is not None:
            raise ValueError(f"{where}: the last range must have max_keys null (no limit)")
        if not final and not (_positive_int(m) and m > last):
            raise ValueError(f"{where}, range {j}: max_keys must be an integer above the previous range's")
        out.append((m, r["backend"]))
        last = m
    return tuple(out)


def thresholds_document() -> dict:
    """The built-in thresholds as a table: head dim 128, the kernel up to ``AUTO_MAX_KEYS``, SDPA beyond."""
    return {"format": FORMAT, "meta": {"source": "built-in thresholds (auto_table.AUTO_MAX_KEYS)"},
            "entries": [{"variant": v, "mode": m, "head_dim": 128,
                         "ranges": [{"max_keys": keys, "backend": "triton"}, {"max_keys": None, "backend": "sdpa"}]}
                        for (v, m), keys in AUTO_MAX_KEYS.items()]}


def load(path: Path | str = TABLE_PATH) -> AutoTable:
    """The table at ``path``, or the built-in thresholds (with a warning) when it is missing or malformed."""
    try:
        return parse(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError, RecursionError) as e:  # JSON and UTF-8 errors are ValueErrors
        reason = f"{type(e).__name__}: {e}"
    warnings.warn(f"auto table {path} not used ({reason}); auto falls back to its built-in thresholds",
                  stacklevel=2)
    return dataclasses.replace(parse(thresholds_document()), fallback_reason=reason)


TABLE = load()  # read once, at import: no file access when torch.compile traces the choice


def choose(variant: str, mode: str, head_dim: int, n_queries: int, n_keys: int,
           table: AutoTable | None = None) -> str:
    """"triton" or "sdpa": the backend the table holds faster for these sizes (default: ``TABLE``)."""
    if variant not in VARIANTS or mode not in MODES or head_dim < 1:
        raise ValueError(f"choose({variant!r}, {mode!r}, head_dim={head_dim}): variant in {VARIANTS}, "
                         f"mode in {MODES}, head_dim >= 1")
    if n_queries < AUTO_MIN_QUERIES:
        return "sdpa"
    by_dim = (TABLE if table is None else table).ranges[variant, mode]
    d = min(by_dim, key=lambda t: max(t, head_dim) / min(t, head_dim))  # first of equals: the larger
    for max_keys, backend in by_dim[d]:
        if max_keys is None or n_keys <= max_keys:
            return backend
    raise AssertionError("parse() ends every ranges list with max_keys None")


def choose_for(q1: Tensor, k1: Tensor, k2: Tensor, v: Tensor, table: AutoTable | None = None) -> str:
    """``choose`` for the op's inputs: V1 when the value is 2d wide, training when a backward will follow."""
    d = q1.shape[-1]
    variant = "v1" if v.shape[-1] == 2 * d else "v2"
    mode = "train" if torch.is_grad_enabled() and any(t.requires_grad for t in (q1, k1, k2, v)) else "infer"
    return choose(variant, mode, d, q1.shape[-2], k1.shape[-2], table)


# Measuring a table (benchmarks/attention.py --auto-table) ------------------------------------------
def check_auto(ms: dict[str, float | None], tolerance: float = AUTO_TOLERANCE) -> dict:
    """The faster of the concrete backends at one shape and whether ``auto`` kept within ``tolerance`` of it.

    ``ms``: median milliseconds of "triton", "sdpa" and "auto"; None (or absent) where one failed.
    """
    timed = {k: ms[k] for k in CHOICES if ms.get(k) is not None}
    best = min(timed, key=timed.get) if timed else None
    ratio = ms["auto"] / timed[best] if best is not None and ms.get("auto") is not None else None
    return {"best": best, "best_ms": timed.get(best), "auto_ratio": ratio,
            "auto_ok": ratio is not None and ratio <= 1 + tolerance}


def build_table(rows: list[dict], meta: dict) -> dict:
    """A table document from measured shapes, validated.

    ``rows``: {"variant", "mode", "head_dim", "N", "ms": {"triton": ms, "sdpa": ms, ...}} (N = M, causal).
    At each shape the faster backend wins (a failed one, None, loses; a shape where both failed is
    left out). Consecutive N with one winner make a range ending at its longest N; the shortest range
    reaches down to one key. Past the longest N measured the table holds SDPA, so the kernel is only
    taken where it was measured faster.
    """
    winners: dict[tuple[str, str, int], dict[int, str]] = {}
    for r in rows:
        best = check_auto({**r["ms"], "auto": None})["best"]
        if best is not None:
            winners.setdefault((r["variant"], r["mode"], r["head_dim"]), {})[r["N"]] = best
    entries = []
    for (variant, mode, d), by_n in sorted(winners.items()):
        ns = sorted(by_n)
        ranges = []
        for n in ns:
            if ranges and ranges[-1]["backend"] == by_n[n]:
                ranges[-1]["max_keys"] = n
            else:
                ranges.append({"max_keys": n, "backend": by_n[n]})
        if ranges[-1]["backend"] == "sdpa":
            ranges[-1]["max_keys"] = None
        else:
            ranges.append({"max_keys": None, "backend": "sdpa"})
        entries.append({"variant": variant, "mode": mode, "head_dim": d, "measured_n": ns, "ranges": ranges})
    doc = {"format": FORMAT, "meta": meta, "entries": entries}
    parse(doc)
    return doc
