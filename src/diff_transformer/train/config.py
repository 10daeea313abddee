"""Training configuration: ``TrainConfig`` (how to train) and ``RunConfig`` (model + train + data).

``RunConfig`` is what a run directory's ``run.json`` holds; ``apply_overrides`` turns the CLI's
``--set key=value`` strings into typed field changes with errors that name the key and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

from ..config import PRESETS, ConfigError, ModelConfig, check_field_types, preset, type_name
from ..data import DataConfig

Schedule = Literal["cosine", "linear", "constant"]
Dtype = Literal["auto", "fp32", "bf16"]
Parallel = Literal["auto", "none", "ddp", "fsdp"]
FsdpReshard = Literal["auto", "always", "never"]
OnBadSteps = Literal["rollback", "stop"]


@dataclass
class TrainConfig:
    """How the model is trained. Defaults follow the paper's recipe where one applies."""

    batch_size: int = 32  # global batch in sequences, over all ranks and accumulation micro-steps
    seq_len: int = 256  # tokens per sequence; at most model.max_seq_len
    steps: int = 1000  # optimizer steps (ignored when `tokens` is set)
    tokens: int | None = None  # token budget; sets steps = tokens // (batch_size * seq_len)
    lr: float = 1.5e-3  # peak learning rate (paper: 1.5e-3 up to 2.8B parameters)
    min_lr_ratio: float = 0.1  # final lr as a fraction of the peak, for cosine/linear decay
    warmup_steps: int = 100  # linear warmup from 0 to lr (paper: 375 of 40K steps)
    schedule: Schedule = "cosine"  # decay after warmup
    beta1: float = 0.9  # AdamW beta1 (paper: 0.9)
    beta2: float = 0.98  # AdamW beta2 (paper: 0.98)
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.05  # decoupled decay on matrices only (paper: 0.05)
    grad_clip: float = 1.0  # max global gradient L2 norm; 0 disables clipping
    grad_accum: int = 1  # micro-steps per optimizer step; the global batch is unchanged
    eval_every: int = 100  # steps between validation passes (and λ logging); 0 = only at the end
    eval_batches: int = 20  # validation batches of `batch_size` sequences per pass
    ckpt_every: int = 500  # steps between checkpoints; 0 = only at the end (and on SIGTERM)
    keep_last: int = 2  # complete checkpoints kept; >= 2 so a corrupt newest one has a fallback
    seed: int = 0  # model init and data order; a DIFF model and its baseline share it
    dtype: Dtype = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    # torch.compile each block (train/parallelize.py, before FSDP2 wraps it); auto: on CUDA, off on the CPU.
    # The same for every model of a comparison: DIFF and its baseline are compiled alike.
    compile: bool | Literal["auto"] = "auto"
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~1/3 more compute
    log_every: int = 10  # steps between training-loss records in metrics.jsonl
    profile_steps: int = 0  # > 0: trace that many steps with torch.profiler into RUN/profile/ (train/profiling.py)
    max_bad_steps: int = 5  # consecutive non-finite steps tolerated before `on_bad_steps`
    on_bad_steps: OnBadSteps = "rollback"  # reload the last good checkpoint, or stop
    parallel: Parallel = "auto"  # under torchrun: auto = ddp; fsdp shards parameters (FSDP2)
    # FSDP2: free each block's gathered parameters after its forward (always), keep them for the backward
    # (never: one all-gather a block a step less, the blocks' bf16 weights whole on every GPU), or every
    # block but the last, whose backward comes right after its forward (auto)
    fsdp_reshard: FsdpReshard = "auto"
    # FSDP2: consecutive blocks that share one all-gather and one reduce-scatter (one unit). Fewer, larger
    # units hold more gathered weights at a time; whether they save host work depends on the host (half of
    # FSDP2's on the CPU, none on an H200's: README); n_layers or more puts every block in one unit
    fsdp_blocks_per_unit: int = 1
    device: str = "auto"  # auto: cuda if available else cpu
    init_from: str | None = None  # model folder whose weights start the run (fine-tuning); None = init from seed

    def __post_init__(self) -> None:
        check_field_types(TrainConfig, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "train")
        for name, tp in get_type_hints(TrainConfig).items():  # "beta1": 0 in a JSON file: torch wants floats
            if tp is float and isinstance(getattr(self, name), int):
                setattr(self, name, float(getattr(self, name)))
        _check_literals(self)
        for name in ("batch_size", "seq_len", "grad_accum", "eval_batches", "keep_last", "log_every", "max_bad_steps",
                     "fsdp_blocks_per_unit"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("eval_every", "ckpt_every", "warmup_steps", "profile_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.tokens is not None:
            if self.tokens <= 0:
                raise ConfigError(f"train.tokens must be a positive token budget, got {self.tokens}")
            if self.tokens < self.batch_size * self.seq_len:
                raise ConfigError(
                    f"train.tokens={self.tokens} is less than one batch ({self.batch_size}x{self.seq_len} tokens): "
                    "raise train.tokens or lower train.batch_size"
                )
        elif self.steps <= 0:
            raise ConfigError(f"train.steps must be a positive integer, got {self.steps}: set train.steps=N")
        if self.keep_last < 2:
            raise ConfigError(f"train.keep_last must be >= 2 (a fallback for a corrupt newest checkpoint), got {self.keep_last}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"train.batch_size={self.batch_size} is not divisible by train.grad_accum={self.grad_accum}"
            )
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"train.beta1/beta2 must lie in [0, 1), got {self.beta1}, {self.beta2}")
        if self.eps <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("train.eps must be positive; train.weight_decay and train.grad_clip must be >= 0")
        if self.device != "auto" and not self.device.split(":")[0] in ("cpu", "cuda", "mps"):
            raise ConfigError(f"train.device={self.device!r} is not 'auto', 'cpu', 'cuda[:N]' or 'mps'")

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the run: the token budget rounded down to whole batches, or `steps`."""
        if self.tokens is not None:
            return self.tokens // (self.batch_size * self.seq_len)
        return self.steps

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


def _check_literals(obj: Any) -> None:
    """A string for a Literal field, or for a union with one (``bool | Literal["auto"]``), is one of its choices."""
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        tp, value = hints[f.name], getattr(obj, f.name)
        members = get_args(tp) if get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        choices = [c for m in members if get_origin(m) is Literal for c in get_args(m)]
        if choices and (isinstance(value, str) or len(members) == 1) and value not in choices:
            shown = ([True, False] if bool in members else []) + choices
            raise ConfigError(f"train.{f.name}={value!r} is not one of {shown}")


# Keys that may change when a run is resumed: they do not change what is trained (grad_accum splits the
# same global batch into other micro-batches: e.g. twice the accumulation on half the GPUs).
RESUMABLE_CHANGES = frozenset(
    {"train.log_every", "train.ckpt_every", "train.keep_last", "train.compile", "train.parallel", "train.fsdp_reshard",
     "train.fsdp_blocks_per_unit", "train.profile_steps", "train.activation_checkpointing", "train.grad_accum",
     "train.max_bad_steps", "train.on_bad_steps", "train.eval_every", "train.device"}
)

SECTIONS = ("model", "train", "data")


@dataclass
class RunConfig:
    """Everything that defines a run: what is trained (model), how (train), on what (data)."""

    model: ModelConfig = field(default_factory=lambda: preset("tiny"))  # the network; vocab_size comes from the tokenizer
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation and bookkeeping
    data: DataConfig = field(default_factory=DataConfig)  # corpus, tokenizer and split
    preset: str | None = "tiny"  # the preset `model` started from, for the record

    def __post_init__(self) -> None:
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}: "
                "lower train.seq_len or raise model.max_seq_len"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "model": self.model.to_dict(),
            "train": dataclasses.asdict(self.train),
            "data": dataclasses.asdict(self.data),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "RunConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source} must hold a JSON object with 'model', 'train' and 'data' sections")
        unknown = sorted(set(d) - set(SECTIONS) - {"preset"})
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {unknown}; expected {list(SECTIONS)} and 'preset'")
        name = d.get("preset")
        not_objects = [s for s in SECTIONS if not isinstance(d.get(s, {}), dict)]
        if not_objects:
            raise ConfigError(f"{source}: section(s) {not_objects} must be JSON objects of field: value")
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"{source}: 'preset' must be a preset name or null, got {name!r}")
        model = dict(d.get("model", {}))
        base = dict(PRESETS[name]) if name and preset(name) else {}  # raw: derived fields follow the file's values
        try:
            return cls(
                model=ModelConfig.from_dict({**base, **model}) if (model or base) else preset("tiny"),
                train=_build(TrainConfig, d.get("train", {}), "train", source),
                data=_build(DataConfig, d.get("data", {}), "data", source),
                preset=name,
            )
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path) -> "RunConfig":
        from pathlib import Path

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found: pass an existing JSON file to --config")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid JSON ({e}): fix the file") from None
        return cls.from_dict(data, source=str(path))

    def replace(self, **sections: Any) -> "RunConfig":
        return RunConfig(**{"model": self.model, "train": self.train, "data": self.data, "preset": self.preset, **sections})

    def differences(self, other: "RunConfig") -> list[str]:
        """Dotted keys whose values differ between the two configs."""
        a, b = _flatten(self.to_dict()), _flatten(other.to_dict())
        return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _build(cls, values: dict[str, Any], section: str, source: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown {section} field(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# --set key=value ---------------------------------------------------------------------------------
_SECTION_TYPES = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}
# model.vocab_size is derived from the tokenizer; a bare `vocab_size` means the tokenizer's size.
_DERIVED = {"model.vocab_size": "it is set from the tokenizer; set data.vocab_size instead"}


def resolve_key(key: str) -> tuple[str, str]:
    """``"lr"`` -> ``("train", "lr")``; ``"model.dim"`` -> ``("model", "dim")``. Unknown/ambiguous keys raise."""
    if "." in key:
        section, name = key.split(".", 1)
        if section not in _SECTION_TYPES:
            raise ConfigError(f"--set {key}: unknown section {section!r}; use one of {list(SECTIONS)} (e.g. train.lr=1e-3)")
        if name not in {f.name for f in dataclasses.fields(_SECTION_TYPES[section])}:
            raise ConfigError(f"--set {key}: {section} has no field {name!r}; known: "
                              f"{sorted(f.name for f in dataclasses.fields(_SECTION_TYPES[section]))}")
        if key in _DERIVED:
            raise ConfigError(f"--set {key}: {_DERIVED[key]}")
        return section, name
    hits = [s for s, cls in _SECTION_TYPES.items()
            if key in {f.name for f in dataclasses.fields(cls)} and f"{s}.{key}" not in _DERIVED]
    if not hits:
        raise ConfigError(f"--set {key}: no model, train or data field is called {key!r}; "
                          "see `diff-transformer train --help` or qualify it as model.X, train.X or data.X")
    if len(hits) > 1:
        raise ConfigError(f"--set {key}: ambiguous, it is a field of {hits}; write {hits[0]}.{key}=...")
    return hits[0], key


def _coerce(raw: str, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if type(None) in args and raw.strip().lower() in ("none", "null"):
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(raw, inner[0], key)
        for member in inner:  # the first member the text fits, e.g. float | Literal["matched"]
            try:
                return _coerce(raw, member, key)
            except ConfigError:
                pass
        raise ConfigError(f"--set {key}={raw}: expected {type_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if raw not in choices:
            raise ConfigError(f"--set {key}={raw}: choose one of {list(choices)}")
        return raw
    try:
        if tp is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            f = float(raw)  # accepts 1e6 and 1_000
            if f != int(f):
                raise ValueError
            return int(f)
        if tp is float:
            return float(raw)
        if tp is str:
            return raw
    except ValueError:
        raise ConfigError(f"--set {key}={raw}: expected {getattr(tp, '__name__', tp)}") from None
    raise ConfigError(f"--set {key}: fields of type {tp} cannot be set from the command line; use --config")


_DERIVABLE = ("n_kv_heads", "head_dim", "ffn_dim", "head_norm")


def _underived(model: ModelConfig) -> dict[str, Any]:
    """``model`` as a dict with the fields it derived reset to None, so that they follow new values
    (``--set dim=64`` changes head_dim and ffn_dim too); values set on purpose stay."""
    d = model.to_dict()
    for name in _DERIVABLE:
        if getattr(ModelConfig(**{**d, name: None}), name) == d[name]:
            d[name] = None
    return d


def apply_overrides(run: RunConfig, assignments: list[str]) -> RunConfig:
    """Apply ``["lr=1e-3", "model.dim=64", ...]`` to ``run``; returns a new, validated RunConfig."""
    sections = {"model": _underived(run.model), "train": dataclasses.asdict(run.train), "data": dataclasses.asdict(run.data)}
    for item in assignments:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value (e.g. --set train.lr=1e-3)")
        key, raw = item.split("=", 1)
        key = key.strip()
        section, name = resolve_key(key)
        hints = get_type_hints(_SECTION_TYPES[section])
        sections[section][name] = _coerce(raw, hints[name], key)
    check_field_types(ModelConfig, sections["model"], "model")
    return RunConfig(
        model=ModelConfig(**sections["model"]),
        train=TrainConfig(**sections["train"]),
        data=DataConfig(**sections["data"]),
        preset=run.preset,
    )
