"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo): what ``parallelize`` does to
one forward and backward under FSDP2. Rank 0 writes JSON to ``argv[1]``.

The same weights (seed 0) and the same global batch of 8 rows (4 a rank) go through plain FSDP2, FSDP2
with activation checkpointing, and FSDP2 with bf16 mixed precision under bf16 autocast (as the trainer
runs it). Recorded: the global loss, every gradient (gathered to full tensors), the dtype of ``up_proj``'s
weight in the forward, of the residual stream entering block 1, and the stored dtypes.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from diff_transformer import preset
from diff_transformer.model import DiffTransformerLM
from diff_transformer.train.parallelize import destroy_distributed, init_distributed, parallelize

WRAPPER = "_checkpoint_wrapped_module."  # checkpoint_wrapper's prefix in named_parameters()


def step(info, **options) -> dict:
    model = DiffTransformerLM(preset("tiny").replace(dim=64, n_layers=2, vocab_size=256), seed=0)
    seen: list[str] = []  # up_proj's weight dtype, the residual stream's dtype
    model.layers[0].mlp.up_proj.register_forward_pre_hook(lambda m, args: seen.append(str(m.weight.dtype)))
    model.layers[1].register_forward_pre_hook(lambda m, args: seen.append(str(args[0].dtype)))
    parallelize(model, "fsdp", info, **options)
    x = torch.randint(0, 256, (8, 33), generator=torch.Generator().manual_seed(1))  # (B, N + 1), the global batch
    rows = x[4 * info.rank: 4 * (info.rank + 1)]  # (B / world, N + 1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=options.get("mixed_precision", False)):
        logits = model(rows[:, :-1])  # (B / world, N, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {n.replace(WRAPPER, ""): p.grad.full_tensor() for n, p in model.named_parameters()}
    return {"loss": total.item() / info.world_size, "grads": grads, "compute_dtype": seen[0], "residual_dtype": seen[1],
            "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
            "grad_dtypes": sorted({str(p.grad.dtype) for p in model.parameters()})}


def main() -> None:
    info = init_distributed("cpu")
    try:
        runs = {"plain": step(info), "checkpointed": step(info, activation_checkpointing=True),
                "bf16": step(info, mixed_precision=True)}
        ref = runs["plain"]["grads"]
        out = {}
        for name, r in runs.items():
            assert r["grads"].keys() == ref.keys(), name
            # Per tensor, |g - g_ref| / |g_ref| in the L2 norm: the largest, and over all gradients at once.
            worst = max(((r["grads"][k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30)).item() for k in ref)
            whole = (sum((r["grads"][k] - ref[k]).norm() ** 2 for k in ref) / sum(ref[k].norm() ** 2 for k in ref)).sqrt()
            out[name] = {"loss": r["loss"], "grad_rel_diff_worst_tensor": worst, "grad_rel_diff": whole.item(),
                         "compute_dtype": r["compute_dtype"], "residual_dtype": r["residual_dtype"],
                         "param_dtypes": r["param_dtypes"], "grad_dtypes": r["grad_dtypes"]}
        if info.is_main:
            with open(sys.argv[1], "w") as f:
                json.dump(out, f, indent=2)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
