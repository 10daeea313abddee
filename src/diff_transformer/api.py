"""The Python API: ``diff_transformer.load(path) -> (model, tokenizer)``.

``path`` may be a model folder (``config.json`` + ``model.safetensors`` + tokenizer files), a
checkpoint folder (``checkpoints/step_*``: verified against its manifest first) or a run directory
(its newest complete checkpoint that verifies). Nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError


def resolve_model_dir(path) -> Path:
    """The folder holding config.json + model.safetensors for ``path`` (see the module docstring)."""
    from .train import checkpoint as ckpt

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist: give a run directory, a checkpoint folder or a model folder")
    if not path.is_dir():
        raise UserError(f"{path} is a file: give a run directory, a checkpoint folder or a model folder")
    if ckpt.is_checkpoint_dir(path):
        ckpt.verify(path)
        return path
    if (path / "checkpoints").is_dir():
        found = ckpt.latest_valid(path, warn=None)
        if found is None:
            raise UserError(f"run directory {path} holds no complete checkpoint that verifies: train it first "
                            "(diff-transformer train --out ...) or point at a checkpoint folder")
        return found
    if (path / "config.json").is_file():
        return path
    raise UserError(f"{path} is not a run directory, a checkpoint folder or a model folder "
                    "(it has no checkpoints/, manifest.json or config.json)")


def tokenizer_dir(model_dir: Path) -> Path:
    """Where the tokenizer of ``model_dir`` lives: beside the weights, or the run's ``tokenizer/``."""
    from .data.tokenizer import META_FILE

    if not (model_dir / META_FILE).is_file() and (model_dir.parent.parent / "tokenizer").is_dir():
        return model_dir.parent.parent / "tokenizer"  # a checkpoint without its own tokenizer copy
    return model_dir


def load(path, device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` from a run directory, checkpoint or model folder; the model in eval mode."""
    return load_model_dir(resolve_model_dir(path), device)


def load_model_dir(model_dir: Path, device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` from a folder :func:`resolve_model_dir` returned (already verified)."""
    from . import serialization
    from .data import load_tokenizer

    from safetensors import SafetensorError

    try:
        model = serialization.from_pretrained(model_dir, device=device)
    except (FileNotFoundError, ValueError, SafetensorError) as e:
        raise UserError(f"cannot load the model in {model_dir}: {e}") from None
    tok_dir = tokenizer_dir(model_dir)
    tokenizer = load_tokenizer(tok_dir)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise UserError(f"the tokenizer in {tok_dir} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                        f"{model.config.vocab_size}: they come from different runs; put the matching tokenizer beside the model")
    return model.eval(), tokenizer
