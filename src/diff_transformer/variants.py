"""Named model variants for ablations: each a set of ``--set``-style overrides on a run config.

A variant is data, not code: ``VARIANTS[name]`` maps ``section.field`` keys (``model.*``,
``train.*``) to values, applied on top of the user's run config by :func:`apply_variant`, so every
variant of a sweep shares the preset, data, seed, schedule and token budget. ``compare`` and
``sweep`` take these names. A value may be :class:`Scaled`, a field of the run's model config times a
fraction (``baseline-wide`` halves the user's head count, whatever the preset). Fields a variant leaves
alone keep the run's values: ``--set model.init=official`` composes with every variant, and a
variant that changes ``n_heads`` gets ``head_dim`` (and ``n_kv_heads``) re-derived unless the run set
them on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from .errors import UserError


@dataclass(frozen=True)
class Scaled:
    """``field`` of the run's model config times ``factor`` (an exact fraction; the result must be an integer)."""

    field: str
    factor: Fraction

    def resolve(self, model) -> int:
        value = getattr(model, self.field) * self.factor
        if value.denominator != 1 or value <= 0:
            raise UserError(f"model.{self.field}={getattr(model, self.field)} times {self.factor} is not a positive "
                            "integer: choose a model config this variant can scale")
        return int(value)

    def __str__(self) -> str:
        return f"{self.factor}·{self.field}"


HALF, DOUBLE = Fraction(1, 2), Fraction(2)

# name -> (one-line description, overrides). The baseline and DIFF of the paper come first.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "baseline": ("softmax attention, h heads of d (the matched baseline)", {"model.attention": "baseline"}),
    "diff": ("DIFF V1 as in the paper (per-head norm at gain 1, λ_init depth schedule)", {"model.attention": "diff"}),
    "diff-no-norm": ("DIFF V1 without the per-head RMSNorm", {"model.attention": "diff", "model.head_norm": False}),
    "diff-v2": ("DIFF V2 (2h query heads, per-token sigmoid λ, no norm)", {"model.attention": "diff_v2"}),
    # Head layout and the per-head norm, on the baseline
    "baseline-wide": ("softmax attention with DIFF's head layout: h/2 heads of q/k/v width 2d (same parameters)",
                      {"model.attention": "baseline", "model.n_heads": Scaled("n_heads", HALF),
                       "model.n_kv_heads": Scaled("n_kv_heads", HALF), "model.head_dim": Scaled("head_dim", DOUBLE)}),
    "baseline-norm": ("the baseline with a per-head RMSNorm at gain 1 (DIFF's norm without the differential)",
                      {"model.attention": "baseline", "model.head_norm": True}),
    "baseline-norm-matched": ("the baseline with a per-head RMSNorm at the matched gain (init loudness unchanged)",
                              {"model.attention": "baseline", "model.head_norm": True,
                               "model.head_norm_init": "matched"}),
    # The per-head norm and λ of DIFF V1
    "diff-norm-matched": ("DIFF V1 with the per-head norm's gain matched to the baseline's output RMS at init",
                          {"model.attention": "diff", "model.head_norm_init": "matched"}),
    "diff-norm-no-scale": ("DIFF V1 with the per-head norm but without the (1 − λ_init) factor",
                           {"model.attention": "diff", "model.head_norm_lambda_scale": False}),
    "diff-lambda-0.8": ("DIFF V1 with a constant λ_init = 0.8 in every layer",
                        {"model.attention": "diff", "model.lambda_init": 0.8}),
    "diff-lambda-0.5": ("DIFF V1 with a constant λ_init = 0.5 in every layer",
                        {"model.attention": "diff", "model.lambda_init": 0.5}),
    "diff-lambda-fixed": ("DIFF V1 with λ = λ_init, not learned (no λ vectors)",
                          {"model.attention": "diff", "model.lambda_mode": "fixed"}),
    "diff-lambda-zero": ("DIFF V1's layout, norm and scale with λ = 0 (one softmax map: no differential)",
                         {"model.attention": "diff", "model.lambda_mode": "zero"}),
    # Head count at the same width (the official README recommends >= 8 DIFF heads)
    "diff-16h": ("DIFF V1 with n_heads=16 at the same width (8 differential heads, d = dim/16)",
                 {"model.attention": "diff", "model.n_heads": 16}),
    "baseline-16h": ("the baseline with 16 heads at the same width (d = dim/16)",
                     {"model.attention": "baseline", "model.n_heads": 16}),
    # Single-softmax alternatives (baseline layout unless said)
    "softmax-plus-one": ("softmax with +1 in the denominator: a head may attend to nothing",
                         {"model.attention": "softmax_plus_one"}),
    "temperature": ("the baseline with a learned per-head temperature exp(τ_h), τ_h = 0 at init",
                    {"model.attention": "temperature"}),
    "sigmoid": ("sigmoid attention with bias −log(max_seq_len) (Ramapuram et al. 2024)",
                {"model.attention": "sigmoid"}),
    "gated": ("DIFF V1's layout, softmax(α·s1 + log σ(β·s2)): branch 2 gates branch 1's keys",
              {"model.attention": "gated"}),
    # Positional encoding
    "baseline-alibi": ("the baseline with ALiBi instead of RoPE", {"model.attention": "baseline",
                                                                  "model.pos_encoding": "alibi"}),
    "diff-alibi": ("DIFF V1 with ALiBi instead of RoPE (both branches of a head share its slope)",
                   {"model.attention": "diff", "model.pos_encoding": "alibi"}),
    "baseline-nope": ("the baseline without positional encoding (NoPE)",
                      {"model.attention": "baseline", "model.pos_encoding": "none"}),
    "diff-nope": ("DIFF V1 without positional encoding (NoPE)", {"model.attention": "diff", "model.pos_encoding": "none"}),
}


def variant_names() -> list[str]:
    return list(VARIANTS)


def variant_overrides(name: str) -> dict[str, Any]:
    """The overrides of variant ``name`` (a UserError naming the known ones otherwise)."""
    if name not in VARIANTS:
        raise UserError(f"unknown variant {name!r}; choose from: {', '.join(VARIANTS)}")
    return dict(VARIANTS[name][1])


def variant_record(name: str) -> dict[str, Any]:
    """Variant ``name``'s overrides as JSON values (a :class:`Scaled` as its text, e.g. ``1/2·n_heads``)."""
    return {k: str(v) if isinstance(v, Scaled) else v for k, v in variant_overrides(name).items()}


def apply_variant(run, name: str):
    """``run`` (a RunConfig) with variant ``name``'s overrides applied; the config validates them.

    :class:`Scaled` values are resolved against ``run.model`` as given (before any override).
    """
    from .train.config import apply_overrides

    items = [(k, v.resolve(run.model) if isinstance(v, Scaled) else v) for k, v in variant_overrides(name).items()]
    return apply_overrides(run, [f"{k}={_fmt(v)}" for k, v in items])


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
