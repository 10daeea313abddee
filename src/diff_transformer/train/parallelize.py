"""Distributed training through PyTorch's own engine: torchrun + DDP, or FSDP2 (``fully_shard``).

Launch with ``torchrun --nproc_per_node N -m diff_transformer.cli train ...``; the same command runs
on one process without torchrun. Backends: nccl on CUDA, gloo on the CPU. The global batch is fixed
by ``train.batch_size``: each rank takes ``batch_size / world_size`` rows of every step's batch, so
the data order does not depend on the number of processes, and a checkpoint resumes on any number of
them (rank ``r`` of ``W`` reads rows ``r·B/W .. (r+1)·B/W - 1`` of step ``s``'s batch, a pure function of
(seed, ``s``)). Multi-node: ``torchrun --nnodes N --nproc_per_node G --rdzv-backend c10d --rdzv-endpoint
HOST:PORT``.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError
from .config import Parallel


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but no CUDA device is available: use train.device=auto or cpu")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the process group that torchrun describes in the environment (none without torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


# A finished collective's Work holds its tensors; freeing a tensor takes the GIL. If a gloo worker
# thread frees the last reference while the main thread, holding the GIL, destroys the process group
# and joins that thread (DDP's reducer frees the group at exit), the process deadlocks: seen with
# torch 2.13 and 2 CPU ranks in about one exit in four. Holding the newest Works here means the worker
# never frees the last reference: the main thread does, later, when they leave this queue.
_RECENT_WORK: collections.deque = collections.deque(maxlen=8)


def all_reduce(t: torch.Tensor, info: DistInfo, op=None) -> torch.Tensor:
    """In-place all-reduce (sum by default); a no-op on one process."""
    if info.distributed:
        work = dist.all_reduce(t, op=op or dist.ReduceOp.SUM, async_op=True)
        work.wait()
        _RECENT_WORK.append(work)
    return t


def choose(mode: Parallel, info: DistInfo) -> str:
    """The parallelism actually used: 'none' on one process; 'auto' means DDP."""
    if not info.distributed:
        return "none"
    return "ddp" if mode in ("auto", "none") else mode


def parallelize(model: nn.Module, mode: str, info: DistInfo, *, mixed_precision: bool = False,
                activation_checkpointing: bool = False, compile: bool = False, reshard: str = "auto",
                blocks_per_unit: int = 1) -> nn.Module:
    """Wrap ``model`` (already on ``info.device``) for ``mode``; returns the module the trainer calls.

    Per block, in this order (torchtitan's): activation checkpointing (the block's activations are
    recomputed in the backward pass), ``torch.compile`` (in place: parameter names do not change), then
    under FSDP2 ``fully_shard`` (one all-gather / reduce-scatter unit per block), and last the root
    (embedding, final norm and head). ``mixed_precision`` (FSDP2 only; the trainer sets it when it runs
    under bf16 autocast, which it needs): the blocks' parameters are all-gathered and used in bf16,
    gradients reduced in fp32, fp32 master weights and AdamW moments in the shards. DDP and one process
    use fp32 parameters under the same autocast. ``reshard`` (FSDP2 only, ``train.fsdp_reshard``): which
    blocks free their gathered parameters after the forward and gather them again for the backward:
    ``always``; ``never`` (ZeRO-2's trade: one all-gather a block a step less, the blocks' bf16 weights held
    whole between forward and backward); ``auto``, every block but the last, whose backward starts right
    after its forward (torchtitan's default). ``blocks_per_unit`` (FSDP2 only): consecutive blocks sharded
    as one unit, one all-gather and one reduce-scatter for all of them (``reshard`` then applies per unit).
    FSDP2 shards in place and returns ``model``; DDP returns its wrapper. The model itself knows nothing
    of any of this.
    """
    if mode not in ("none", "ddp", "fsdp"):
        raise UserError(f"train.parallel={mode!r} is not one of ['auto', 'none', 'ddp', 'fsdp']")
    if reshard not in ("auto", "always", "never"):
        raise UserError(f"train.fsdp_reshard={reshard!r} is not one of ['auto', 'always', 'never']")
    for i, block in enumerate(model.layers):
        if activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            # Non-reentrant checkpointing; the wrapper's state-dict hooks keep the parameter names.
            block = checkpoint_wrapper(block)
        if compile:
            block.compile()
        model.layers[i] = block
    if mode == "none":
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        if compile:
            # Inside DDP's forward, dynamo splits each graph it compiles at DDP's bucket boundaries (its
            # "DDPOptimizer", meant for one compiled graph of the whole model). Our graphs are single blocks,
            # each already a unit whose gradients DDP all-reduces as its backward ends; split, they lose
            # fusion: on two H200s, DIFF at `base` compiled scaled 1.36x under DDP against 1.89x under FSDP2.
            torch._dynamo.config.optimize_ddp = False

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Blocks: bf16 all-gathers (half the bytes), fp32 gradient reductions. Their inputs are not cast, so
    # the residual stream stays fp32 as on one GPU under autocast (which runs the matmuls in bf16); the
    # root (embedding, final norm, head) keeps fp32 parameters, also as on one GPU.
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
              if mixed_precision else MixedPrecisionPolicy())
    if not isinstance(blocks_per_unit, int) or blocks_per_unit < 1:
        raise UserError(f"train.fsdp_blocks_per_unit={blocks_per_unit!r} must be a positive integer")
    blocks = list(model.layers)
    units = [blocks[i:i + blocks_per_unit] for i in range(0, len(blocks), blocks_per_unit)]
    for i, unit in enumerate(units):
        fully_shard(unit if len(unit) > 1 else unit[0], mp_policy=policy,
                    reshard_after_forward=reshard == "always" or (reshard == "auto" and i < len(units) - 1))
    fully_shard(model)  # the root keeps its parameters gathered from forward to backward (FSDP2's rule)
    return model


def reshard_all(model: nn.Module) -> None:
    """Free the gathered parameters a forward without a backward left behind (an evaluation under
    ``train.fsdp_reshard`` auto or never): every parameter is a shard again, as after a training step."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextlib.contextmanager
def gradient_sync(model: nn.Module, mode: str, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-steps that are not the last."""
    if sync or mode == "none":
        yield
    elif mode == "ddp":
        with model.no_sync():
            yield
    else:  # fsdp
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
