"""Named model variants for ablations: each a set of ``--set``-style overrides on a run config.

A variant is data, not code: ``VARIANTS[name]`` maps ``section.field`` keys (``model.*``,
``train.*``) to values, applied on top of the user's run config by :func:`apply_variant`, so every
variant of a sweep shares the preset, data, seed, schedule and token budget. ``compare`` and
``sweep`` take these names.
"""

from __future__ import annotations

from typing import Any

from .errors import UserError

# name -> (one-line description, overrides). The baseline and DIFF of the paper come first.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "baseline": ("softmax attention, h heads of d (the matched baseline)", {"model.attention": "baseline"}),
    "diff": ("DIFF V1 as in the paper (per-head norm at gain 1, λ_init depth schedule)", {"model.attention": "diff"}),
    "diff-no-norm": ("DIFF V1 without the per-head RMSNorm", {"model.attention": "diff", "model.head_norm": False}),
    "diff-v2": ("DIFF V2 (2h query heads, per-token sigmoid λ, no norm)", {"model.attention": "diff_v2"}),
}


def variant_names() -> list[str]:
    return list(VARIANTS)


def variant_overrides(name: str) -> dict[str, Any]:
    """The overrides of variant ``name`` (a UserError naming the known ones otherwise)."""
    if name not in VARIANTS:
        raise UserError(f"unknown variant {name!r}; choose from: {', '.join(VARIANTS)}")
    return dict(VARIANTS[name][1])


def apply_variant(run, name: str):
    """``run`` (a RunConfig) with variant ``name``'s overrides applied; the config validates them."""
    from .train.config import apply_overrides

    return apply_overrides(run, [f"{k}={_fmt(v)}" for k, v in variant_overrides(name).items()])


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
