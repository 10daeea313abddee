"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedule.

No decay on: norm weights, biases, the λ re-parametrisation vectors (decaying them would pull λ
towards λ_init for a reason unrelated to the loss) and the token embedding (decaying it shrinks the
rarely-seen tokens' rows, which the paper's recipe does not ask for). The output head is a matrix and
is decayed. A tied head is the embedding and so is not decayed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def no_decay(name: str, param: torch.Tensor) -> bool:
    """True for parameters that weight decay must leave alone (see the module docstring)."""
    return (
        param.dim() < 2  # norms, biases, λ vectors, per-head scalars (temperature τ, gate α/β)
        or "norm" in name
        or ".lambda_" in name and "lambda_proj" not in name
        or name.endswith("embed_tokens.weight")
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (keep if no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; on CUDA its fused kernel (one launch a step rather than one a parameter group and operation,
    which under FSDP2 would each go through DTensor's dispatch on the host). On the CPU, PyTorch's default."""
    cuda = all(p.device.type == "cuda" for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=True if cuda else None)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then the decay to min_lr."""
    total = cfg.total_steps
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    min_lr = cfg.lr * cfg.min_lr_ratio
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - min_lr) * progress
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
