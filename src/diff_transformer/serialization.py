"""This project's own model format: ``config.json`` + ``model.safetensors``.

Loading never unpickles: tensors come from safetensors and metadata from JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig, validate_size
from .fileio import write_atomically, write_bytes_atomically

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "diff-transformer"


def model_state(model) -> dict[str, torch.Tensor]:
    """The state dict without the tied output head (stored once, as the embedding)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def config_bytes(config: ModelConfig) -> bytes:
    """The ``config.json`` of a model folder (checkpoints write the same bytes)."""
    return json.dumps({"format": FORMAT, **config.to_dict()}, indent=2).encode()


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path), metadata={"format": FORMAT})


def save_pretrained(model, directory) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / WEIGHTS_NAME, lambda tmp: save_weights(model_state(model), tmp))
    write_bytes_atomically(directory / CONFIG_NAME, config_bytes(model.config))


def load_config(directory) -> ModelConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: point at a folder written by save_pretrained")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): the folder is damaged; save the model again") from None
    if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} config (a Hugging Face folder? use `diff-transformer import`)")
    config = ModelConfig.from_dict(data)
    validate_size(config)  # before anything is allocated
    return config


def load_state(model, state: dict[str, torch.Tensor], source: str = "state") -> None:
    """Load ``state`` into ``model`` strictly, with one message naming every mismatch."""
    expected = model_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    kinds = sorted(k for k in set(expected) & set(state) if expected[k].is_floating_point() != state[k].is_floating_point())
    if missing or unexpected or wrong or kinds:
        details = []
        if missing:
            details.append(f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
        if wrong:
            k = wrong[0]
            details.append(f"shape of {k}: {tuple(state[k].shape)} in {source}, {tuple(expected[k].shape)} in the model")
        if kinds:
            k = kinds[0]
            details.append(f"dtype of {k}: {state[k].dtype} in {source}, {expected[k].dtype} in the model")
        raise ValueError(f"{source} does not match the model config ({'; '.join(details)})")
    check_finite(state, source)
    cast = sorted({str(v.dtype).removeprefix("torch.") for k, v in state.items()
                   if k in expected and v.is_floating_point() and v.dtype != expected[k].dtype})
    if cast:
        import warnings

        warnings.warn(f"{source} stores {', '.join(cast)} weights: they are converted to "
                      f"{str(next(iter(expected.values())).dtype).removeprefix('torch.')} on loading", stacklevel=2)
    model.load_state_dict(state, strict=not model.config.tie_embeddings)


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse NaN or infinite weights: a damaged file (or a diverged run) is never loaded silently."""
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise ValueError(f"{source} holds NaN or infinite values in {bad[:3]}{'...' if len(bad) > 3 else ''}: "
                         "the file is damaged or the model diverged")


def model_from_state(config: ModelConfig, state: dict[str, torch.Tensor], *, device="cpu", source: str = "state"):
    """A model of ``config`` holding exactly ``state`` (no random init is computed first)."""
    from .model import DiffTransformerLM

    with torch.device("meta"):
        model = DiffTransformerLM(config)
    model = model.to_empty(device=device)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    load_state(model, state, source=source)
    return model


def from_pretrained(directory, *, device="cpu"):
    directory = Path(directory)
    config = load_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: the folder holds a config but no weights")
    try:
        state = load_file(str(weights), device=str(device))
    except SafetensorError as e:
        raise ValueError(f"{weights} is not a safetensors file ({e}): weights are read from safetensors only, "
                         "never unpickled") from None
    return model_from_state(config, state, device=device, source=str(weights))
