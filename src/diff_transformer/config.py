"""Model configuration, presets and the DIFF/baseline matched pair.

Head counting follows the baseline (see SPEC.md): ``n_heads`` is the baseline's head count ``h``
and ``head_dim`` its head width ``d``. A DIFF V1 layer built from the same config has ``h/2``
differential heads (two q/k sub-heads of width ``d``, one value of width ``2d``), so its projections
have exactly the baseline's shapes. DIFF V2 has ``2h`` query heads of width ``d`` over the same kv
heads. The ablation kinds keep the baseline's layout (``softmax_plus_one``, ``temperature``,
``sigmoid``) or DIFF V1's (``gated``).

Every ablation knob defaults to the paper's choice. Knobs of one kind only (``lambda_mode``,
``lambda_init``, ``head_norm_lambda_scale`` for DIFF V1; ``head_norm_init`` without a head norm) are
ignored by the others, so that :func:`matched_pair` can hand a DIFF config's fields to its baseline.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

from .errors import UserError

Attention = Literal["diff", "diff_v2", "baseline", "softmax_plus_one", "temperature", "sigmoid", "gated"]
AttnBackend = Literal["auto", "reference", "sdpa", "triton"]
Init = Literal["hf", "official"]
LambdaMode = Literal["learned", "fixed", "zero"]
PosEncoding = Literal["rope", "alibi", "none"]
# Kinds with DIFF V1's layout (h/2 heads of two q/k sub-heads of d, values 2d): they pair heads.
PAIRED_KINDS = ("diff", "gated")


def lambda_init_schedule(layer_idx: int) -> float:
    """The paper's depth schedule, on 0-based layers: 0.8 - 0.6 * exp(-0.3 * l)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


class ConfigError(UserError):
    """A configuration value is invalid; the message names the field and the fix."""


@dataclass
class ModelConfig:
    """Everything that defines the network's function (not how it is trained)."""

    vocab_size: int = 8192  # set from the tokenizer when training
    dim: int = 512  # residual stream width D_model
    n_layers: int = 8  # decoder blocks
    n_heads: int = 8  # baseline attention heads h (DIFF V1 has h/2 differential heads)
    n_kv_heads: int | None = None  # baseline kv heads for GQA; None means n_heads (MHA)
    head_dim: int | None = None  # baseline head width d; None means dim // n_heads
    ffn_dim: int | None = None  # SwiGLU hidden width; None means 8/3 * dim rounded up to multiple_of
    multiple_of: int = 64  # rounding of the default ffn_dim, for efficient matmul shapes
    max_seq_len: int = 1024  # longest context the model is trained and evaluated at
    rope_theta: float = 10000.0  # RoPE base; rotate-half (NeoX/HF) convention
    norm_eps: float = 1e-5  # eps of the pre-norm RMSNorms and of DIFF's per-head RMSNorm
    tie_embeddings: bool = False  # share the token embedding with the output head
    attention: Attention = "diff"  # which attention the blocks use
    lambda_init: float | None = None  # DIFF V1: None = the paper's depth schedule, a number = constant (ablation)
    head_norm: bool | None = None  # per-head RMSNorm; None = the paper's choice (on for diff, off otherwise)
    lambda_std: float = 0.1  # std of the λ re-parametrisation vectors' normal init (paper: 0.1)
    init_std: float = 0.02  # std of every linear and embedding weight; residual outputs get init_std / sqrt(2 n_layers)
    attn_backend: AttnBackend = "auto"  # differential/softmax attention implementation; does not change the function
    init: Init = "hf"  # initial values: hf (Llama's N(0, init_std)) or official (unilm Diff-Transformer's nn.Linear defaults)
    head_norm_init: float | Literal["matched"] = 1.0  # per-head norm's initial gain (paper: 1); "matched": see head_norm_gain
    head_norm_lambda_scale: bool = True  # DIFF V1: multiply the normed head output by (1 - λ_init) (paper); false = ablation
    lambda_mode: LambdaMode = "learned"  # DIFF V1 λ: learned (paper), fixed = λ_init (no λ vectors), zero = one softmax map
    pos_encoding: PosEncoding = "rope"  # rope (paper), alibi (Press et al.'s slopes, one per output head) or none (NoPE)

    def __post_init__(self) -> None:
        _check_literals(self)
        _check_types(self)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "multiple_of"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(
                    f"dim={self.dim} is not divisible by n_heads={self.n_heads}: set head_dim or change n_heads"
                )
            self.head_dim = self.dim // self.n_heads
        if self.ffn_dim is None:
            self.ffn_dim = self.multiple_of * math.ceil(8 * self.dim / 3 / self.multiple_of)
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} (GQA groups)"
            )
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be a positive even number (RoPE rotates pairs)")
        if self.attention in PAIRED_KINDS and (self.n_heads % 2 or self.n_kv_heads % 2):
            raise ConfigError(
                f"attention={self.attention!r} pairs the baseline's heads: n_heads={self.n_heads} and "
                f"n_kv_heads={self.n_kv_heads} must both be even"
            )
        if self.head_norm is None:
            self.head_norm = self.attention == "diff"
        if self.lambda_init is not None and not 0.0 <= self.lambda_init < 1.0:
            raise ConfigError(f"lambda_init={self.lambda_init} must lie in [0, 1) (the output is scaled by 1 - λ_init)")
        if self.norm_eps <= 0 or self.init_std <= 0 or self.lambda_std <= 0 or self.rope_theta <= 0:
            raise ConfigError("norm_eps, init_std, lambda_std and rope_theta must be positive")
        if self.head_norm_init != "matched" and not (math.isfinite(self.head_norm_init) and self.head_norm_init > 0):
            raise ConfigError(f"head_norm_init={self.head_norm_init!r} must be a positive finite gain or 'matched'")

    # Derived layout -------------------------------------------------------------------------
    def layer_lambda_init(self, layer_idx: int) -> float:
        """λ_init of layer ``layer_idx`` (0-based): the schedule, or the constant ablation."""
        return lambda_init_schedule(layer_idx) if self.lambda_init is None else float(self.lambda_init)

    def layer_head_norm_scale(self, layer_idx: int) -> float:
        """What the per-head norm's output is multiplied by: (1 − λ_init) for DIFF V1 (paper), else 1."""
        if self.attention == "diff" and self.head_norm_lambda_scale:
            return 1.0 - self.layer_lambda_init(layer_idx)
        return 1.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s) {unknown}; known fields: {sorted(known)}")
        check_field_types(cls, d, "model")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with ``changes`` applied.

        Changing ``attention`` re-derives ``head_norm`` (the paper's choice for the new kind) unless
        ``head_norm`` is given too; other derived fields (head_dim, ffn_dim) keep their values.
        """
        if "attention" in changes and "head_norm" not in changes:
            changes = {**changes, "head_norm": None}
        return ModelConfig.from_dict({**self.to_dict(), **changes})


def _type_matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` is of the annotated type: bools are not numbers, ints are floats."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_matches(value, a) for a in get_args(tp))
    if origin is Literal:
        return isinstance(value, str) and value in get_args(tp)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True


def type_name(tp: Any) -> str:
    """A type annotation in words, e.g. "float or 'matched'"."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if origin is Literal:
        return " or ".join(repr(c) for c in get_args(tp))
    return "None" if tp is type(None) else tp.__name__


def _check_types(obj: Any) -> None:
    """Refuse values of the wrong type (a string or bool where a number is expected) by field name."""
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _type_matches(value, hints[f.name]):
            raise ConfigError(f"{f.name}={value!r} has the wrong type: expected {type_name(hints[f.name])}")


def _check_literals(obj: Any) -> None:
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        choices = get_args(hints[f.name])
        if choices and all(isinstance(c, str) for c in choices) and getattr(obj, f.name) not in choices:
            raise ConfigError(f"{f.name}={getattr(obj, f.name)!r} is not one of {list(choices)}")


# Presets ---------------------------------------------------------------------------------------
# Data, not code: each entry lists only what differs from ModelConfig's defaults. Head counts are
# the baseline's (the paper's tables list DIFF heads, i.e. half of these).
PRESETS: dict[str, dict[str, Any]] = {
    # The test flavor: runs a full compare on a 2-core CPU in minutes.
    "tiny": dict(dim=128, n_layers=4, n_heads=4, max_seq_len=256, multiple_of=32),
    # ~25M non-embedding parameters.
    "small": dict(dim=512, n_layers=8, n_heads=8, max_seq_len=1024),
    # ~126M non-embedding parameters, head dim 128 (DIFF: 4 heads of q/k 128, v 256).
    "base": dict(dim=1024, n_layers=10, n_heads=8, max_seq_len=2048),
    # The paper's layouts (Ye et al., Tables 9/10): width / layers / DIFF heads x2.
    # The paper's tokenizer has 100,288 tokens; training here sets vocab_size from the user's tokenizer.
    "paper-830m": dict(dim=1536, n_layers=24, n_heads=16, vocab_size=100288, max_seq_len=2048),
    "paper-1.4b": dict(dim=2048, n_layers=24, n_heads=16, vocab_size=100288, max_seq_len=2048),
    "paper-2.8b": dict(dim=2560, n_layers=32, n_heads=20, vocab_size=100288, max_seq_len=2048),
    "paper-3b": dict(dim=3072, n_layers=28, n_heads=24, ffn_dim=8192, vocab_size=100288, max_seq_len=4096),
    "paper-6.8b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=100288, max_seq_len=2048),
    "paper-13.1b": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=100288, max_seq_len=2048),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset's config, with ``overrides`` applied (e.g. ``attention="baseline"``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def matched_pair(config: ModelConfig) -> tuple[ModelConfig, ModelConfig]:
    """``(diff, baseline)``: the same decoder with only the attention changed.

    Both share every field except ``attention`` and ``head_norm`` (re-derived: the paper's choice for
    each). For DIFF V1 the parameter counts differ only by the λ vectors and the norm weight
    (6·d per layer); ``diff_v2`` is kept when given, and its extra query heads and λ projection are
    real extra parameters that :func:`parameter_report` shows.
    """
    kind = config.attention if config.attention != "baseline" else "diff"
    fields = {**config.to_dict(), "head_norm": None}
    return ModelConfig(**{**fields, "attention": kind}), ModelConfig(**{**fields, "attention": "baseline"})


@dataclass
class ParameterReport:
    diff: int
    baseline: int
    diff_non_embedding: int = field(default=0)
    baseline_non_embedding: int = field(default=0)

    @property
    def relative_difference(self) -> float:
        return (self.diff - self.baseline) / self.baseline

    def __str__(self) -> str:
        return (
            f"DIFF {self.diff:,} params ({self.diff_non_embedding:,} non-embedding), baseline {self.baseline:,} "
            f"({self.baseline_non_embedding:,}); difference {100 * self.relative_difference:+.4f}%"
        )


# Validation shared by the loaders ----------------------------------------------------------------
_INT_LIMIT = 2**63  # what torch and numpy take as an integer (seeds, sizes)


def _fits(value: Any, tp: Any) -> bool:
    if get_origin(tp) is Literal:
        return isinstance(value, str)  # which string: the literal checks in __post_init__
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool) and -_INT_LIMIT <= value < _INT_LIMIT
    if tp is float:
        if isinstance(value, int) and not isinstance(value, bool):
            return -_INT_LIMIT <= value < _INT_LIMIT  # torch converts it through int64
        return isinstance(value, float) and abs(value) < 1e300 and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    return True


def check_field_types(cls: type, values: dict[str, Any], section: str) -> None:
    """Refuse a value of the wrong JSON type for its dataclass field (``"false"`` for a bool, ``2.5`` for an
    int, ``NaN`` or ``Infinity`` for a float, an integer beyond 64 bits), before any arithmetic on it."""
    hints = get_type_hints(cls)
    for name, value in values.items():
        tp = hints.get(name)
        if tp is None:
            continue
        allowed = get_args(tp) if get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        if value is None and type(None) in allowed:
            continue
        if not any(_fits(value, a) for a in allowed if a is not type(None)):
            names = [("a finite number" if a is float else "true or false" if a is bool else
                      "an integer below 2**63" if a is int else "null" if a is type(None) else
                      "a string") for a in allowed]
            raise ConfigError(f"{section}.{name}={value!r} is not {' or '.join(dict.fromkeys(names))}: "
                              f"give {section}.{name} a value of that type")


def _memory_bytes(device: Any = None) -> int:
    """The memory a model may take: this machine's RAM, or the GPU's for a CUDA device."""
    if device is not None and str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def estimated_parameters(config: ModelConfig) -> int:
    """An upper bound of the parameter count of ``config``, computed without building anything."""
    d, h, kv = config.head_dim, config.n_heads, config.n_kv_heads
    attn = config.dim * 2 * h * d + 2 * config.dim * kv * d * 2 + h * d * config.dim + config.dim * h + 8 * d
    layer = attn + 3 * config.dim * config.ffn_dim + 2 * config.dim
    embed = config.vocab_size * config.dim * (1 if config.tie_embeddings else 2)
    return config.n_layers * layer + embed + config.dim


def validate_size(config: ModelConfig, *, training: bool = False, device: Any = None, shards: int = 1) -> None:
    """Refuse a config whose fp32 parameters (with gradients and AdamW moments when ``training``) cannot fit
    in memory, before anything is allocated; the error names the size. ``shards``: the processes that
    FSDP2 splits the training state over (the whole model is still built on one device first)."""
    n = estimated_parameters(config)
    need = n * 4 * (max(1.0, 4 / shards) if training else 1)
    have = _memory_bytes(device)
    if need > have:
        what = "parameters, gradients and AdamW moments" if training else "parameters"
        raise ConfigError(
            f"this model (dim={config.dim}, n_layers={config.n_layers}, vocab_size={config.vocab_size}, "
            f"ffn_dim={config.ffn_dim}) has about {n:,} parameters: its fp32 {what} take {need / 1e9:,.1f} GB, "
            f"more than this machine's {have / 1e9:,.1f} GB: choose a smaller model")
