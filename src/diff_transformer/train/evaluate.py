"""Validation loss of a trained run (``diff-transformer eval``)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError
from . import checkpoint as ckpt
from .config import RunConfig


@torch.no_grad()
def validation_loss(model, tokens, batch_size: int, seq_len: int, max_batches: int | None,
                    device: torch.device, amp: bool = False) -> tuple[float, int]:
    """(mean cross-entropy in nats/token, tokens scored) over the fixed validation batches."""
    from ..data import eval_batches

    total, count = 0.0, 0
    for x, y in eval_batches(tokens, batch_size, seq_len, max_batches):
        x, y = x.to(device), y.to(device)  # (b, N) each
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)  # (b, N, V)
        total += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum"))
        count += y.numel()
    return total / count, count


def evaluate_run(path, *, max_batches: int | None = None, data_cache=None, device: str = "cpu") -> dict:
    """Evaluate a run directory's newest good checkpoint (or a given checkpoint) on its validation split."""
    from ..data import prepare_dataset
    from ..serialization import load_state
    from ..model import DiffTransformerLM
    from .trainer import default_cache_dir

    path = Path(path)
    if ckpt.is_checkpoint_dir(path):
        ckpt.verify(path)
        run_dir, checkpoint = path.parent.parent, path
    else:
        run_dir = path
        checkpoint = ckpt.latest_valid(run_dir) if (run_dir / "checkpoints").is_dir() else None
    run_file = run_dir / "run.json"
    if not run_file.is_file() and (path / "config.json").is_file() and not (path / "checkpoints").exists():
        raise UserError(f"{path} is a model folder, which holds no data settings: score it on your text with "
                        f"`diff-transformer eval {path} --task perplexity --opt data=FILE_OR_FOLDER`")
    if not run_file.is_file():
        raise UserError(f"{path} is not a run directory (no run.json): eval needs a run trained with `diff-transformer train`")
    if checkpoint is None:
        raise UserError(f"{run_dir} holds no complete checkpoint that verifies: train it first")
    if max_batches is not None and max_batches <= 0:
        raise UserError(f"--batches must be positive, got {max_batches}")
    run = RunConfig.from_json(run_file)
    loaded = ckpt.load_checkpoint(checkpoint, verified=True)
    dataset = prepare_dataset(run.data, Path(data_cache) if data_cache else default_cache_dir())
    if dataset.vocab_size != loaded.model_config.vocab_size:
        raise UserError(f"the data's tokenizer has {dataset.vocab_size} tokens, the checkpoint's model "
                        f"{loaded.model_config.vocab_size}: the data changed since training; evaluate with the run's data")
    dev = torch.device(device)
    model = DiffTransformerLM(loaded.model_config).to(dev)
    load_state(model, {k: v.to(dev) for k, v in loaded.model_state.items()}, source=str(checkpoint))
    model.eval()
    amp = run.train.dtype == "bf16" or (run.train.dtype == "auto" and dev.type == "cuda")
    loss, tokens = validation_loss(model, dataset.val, run.train.batch_size, run.train.seq_len,
                                   max_batches or run.train.eval_batches, dev, amp)
    return {"checkpoint": str(checkpoint), "step": loaded.step, "val_loss": loss,
            "val_ppl": math.exp(min(loss, 700.0)), "tokens": tokens}
