"""Numbers shared by ``compare``, ``sweep`` and ``report``: paired statistics over seeds, training FLOPs,
curve interpolation, and JSON without NaN.

Pure Python (no SciPy): the Student t distribution comes from the regularised incomplete beta function.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from ..config import ModelConfig


# Student t -----------------------------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
            if aa == 0.0:
                break
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, dof: int) -> float:
    """P(|T| >= |t|) for Student's t with ``dof`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(dof / 2.0, 0.5, dof / (dof + t * t))


def t_quantile(q: float, dof: int) -> float:
    """The ``q`` quantile (0.5 < q < 1) of Student's t, by bisection on the two-sided tail."""
    tail = 2.0 * (1.0 - q)
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, dof) > tail:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_two_sided_p(mid, dof) > tail else (lo, mid)
    return (lo + hi) / 2.0


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1) of the non-missing values; std 0 for one value."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """``a - b`` paired element-wise (by seed): mean, std, n, a Student-t confidence interval of the mean
    (n - 1 degrees of freedom) and the two-sided p-value of the paired t-test (H0: mean difference 0).
    Interval and p-value are None for n < 2; a zero spread gives p 0 (or 1 when the mean is 0)."""
    diffs = [x - y for x, y in zip(a, b) if x is not None and y is not None and math.isfinite(x - y)]
    n = len(diffs)
    out: dict[str, Any] = {"n": n, "per_seed": diffs, "mean": None, "std": None, "ci_low": None, "ci_high": None,
                           "p_value": None, "confidence": confidence}
    if not n:
        return out
    mean, std = mean_std(diffs)
    out.update(mean=mean, std=std)
    if n < 2:
        return out
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    out.update(ci_low=mean - half, ci_high=mean + half)
    if std == 0.0:
        out["p_value"] = 1.0 if mean == 0.0 else 0.0
    else:
        out["p_value"] = t_two_sided_p(mean / (std / math.sqrt(n)), n - 1)
    return out


# FLOPs -------------------------------------------------------------------------------------------------
def attention_width(model: ModelConfig) -> int:
    """Width of the attention's score/value products, in baseline units: ``n_heads * head_dim`` (a DIFF V1
    layer has n_heads/2 heads of two d-wide q/k pairs and a 2d value: the same width)."""
    return model.n_heads * model.head_dim


# Work of one DIFF V1 head pair relative to the two baseline heads it replaces (SPEC.md "Work floor"):
# forward 6N²d vs 4N²d, backward 10N²d vs 10N²d.
DIFF_V1_ATTENTION_FACTOR = 16.0 / 14.0


def non_embedding_params(model: ModelConfig) -> int:
    """Parameters without the token embedding and the (untied) output head, counted on the meta device."""
    import torch

    from ..model import DiffTransformerLM

    with torch.device("meta"):
        return DiffTransformerLM(model).num_parameters(non_embedding=True)


def flops_per_token(model: ModelConfig, seq_len: int, params_non_embedding: int | None = None) -> float:
    """Training FLOPs per token (forward + backward):

        6 · P_non_embedding + 12 · n_layers · seq_len · w · f

    with ``w = n_heads · head_dim`` the attention width, ``f = 1`` for the baseline, ``f = 16/14`` for
    DIFF V1 (SPEC.md "Work floor": forward 6N²d against 4N²d, backward 10N²d against 10N²d) and
    ``f = 2`` for DIFF V2 (2h query heads of width d over the same keys and values); every other kind 1
    (the single-map ablations, and ``gated``: two score maps but one P·V of width 2d, the baseline's
    work). DIFF V1 keeps 16/14 in every ``lambda_mode``. The 12 counts
    QKᵀ and PV (2 · 2 · N · w a token forward, twice that backward), without halving for the causal
    mask (as Kaplan et al. and PaLM count it); the λ and norm work is negligible and not counted."""
    p = non_embedding_params(model) if params_non_embedding is None else params_non_embedding
    factor = {"diff": DIFF_V1_ATTENTION_FACTOR, "diff_v2": 2.0}.get(model.attention, 1.0)
    return 6.0 * p + 12.0 * model.n_layers * seq_len * attention_width(model) * factor


# Curves ------------------------------------------------------------------------------------------------
def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """Linear interpolation of the curve (xs ascending) at ``x``; None outside [xs[0], xs[-1]]."""
    if not xs or x < xs[0] - 1e-9 * max(1.0, abs(xs[0])) or x > xs[-1] * (1 + 1e-9) + 1e-12:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y1 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def catch_up(xs: Sequence[float], mean_gap: Sequence[float | None]) -> float | None:
    """The first x from which the mean gap stays <= 0 to the end of the curve, or None (never)."""
    first = None
    for x, g in zip(xs, mean_gap):
        if g is not None and g <= 0.0:
            first = x if first is None else first
        else:
            first = None
    return first


# JSON ---------------------------------------------------------------------------------------------------
def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN/Infinity float replaced by None (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any) -> str:
    """Strict JSON (``allow_nan=False`` after :func:`json_safe`), indented, keys sorted."""
    import json

    return json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"
