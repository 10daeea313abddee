"""Training batches (random windows, a pure function of the step) and fixed evaluation batches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import UserError

if TYPE_CHECKING:
    from .mix import NeedleMix


class Batches:
    """Random windows over a token array; batch ``step`` depends only on ``(seed, step, rank, world_size)``.

    The global batch of ``step`` is ``batch_size`` window starts drawn uniformly from a generator seeded
    with ``(seed, step)``; rank ``r`` of ``W`` takes rows ``[r*B/W, (r+1)*B/W)``. So resuming at any step
    needs no saved data state, and ``W`` processes together see exactly the one-process batch. Windows
    may cross document boundaries (the EOS between documents is a token like any other). With a
    ``mix`` (``data.mix``), some rows then become synthetic examples, also a pure function of
    ``(seed, step, row)`` (see ``data/mix.py``); without one the batches are as they always were.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
                 mix: NeedleMix | None = None) -> None:
        if batch_size <= 0 or seq_len <= 0:
            raise UserError(f"batch_size={batch_size} and seq_len={seq_len} must be positive")
        if seed < 0:
            raise UserError(f"data seed {seed} must be a non-negative integer")
        if len(tokens) < seq_len + 1:
            raise UserError(
                f"the training tokens ({len(tokens)}) are fewer than seq_len + 1 = {seq_len + 1}: "
                "use more data or a shorter seq_len"
            )
        self.tokens = tokens  # (n,) token ids
        self.batch_size = batch_size  # global rows per step, over all ranks
        self.seq_len = seq_len  # tokens per row
        self.seed = seed  # with the step, fixes every batch
        self.mix = mix  # turns some training rows into synthetic examples; None = plain windows

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``, both int64 ``(batch_size // world_size, seq_len)``; ``y[:, t] = x[:, t + 1]`` in the text."""
        if world_size <= 0 or self.batch_size % world_size:
            raise UserError(
                f"batch_size={self.batch_size} is not divisible by world_size={world_size}: "
                "choose a batch size that is a multiple of the number of processes"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        if step < 0:
            raise ValueError(f"step {step} must be non-negative")
        rng = np.random.default_rng((self.seed, step))
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)  # (B,)
        rows = self.batch_size // world_size
        first = rank * rows
        windows = _rows(self.tokens, starts[first : first + rows], self.seq_len)  # (R, L+1)
        if self.mix is not None:
            mixed = self.mix.mixed_rows(self.seed, step, self.batch_size)[first : first + rows]  # (R,)
            for i in np.flatnonzero(mixed):
                windows[i] = self.mix.example(windows[i], self.seed, step, first + int(i))
        return _split(windows)


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed evaluation batches: consecutive non-overlapping windows from the start of ``tokens``.

    Window ``i`` covers ``tokens[i*seq_len : (i+1)*seq_len + 1]``; windows are grouped ``batch_size``
    at a time in order, so every model sees the same batches. Yields ``(x, y)``, int64
    ``(rows, seq_len)``; ``rows`` is ``batch_size`` except possibly in the last batch, so weight each
    batch's mean loss by its rows for the exact mean. ``max_batches`` (None = all) stops early.
    """
    if batch_size <= 0 or seq_len <= 0:
        raise UserError(f"batch_size={batch_size} and seq_len={seq_len} must be positive")
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows == 0:
        raise UserError(
            f"the validation tokens ({len(tokens)}) are fewer than seq_len + 1 = {seq_len + 1}: "
            "use more validation data (a larger val_fraction) or a shorter seq_len"
        )
    n_batches = -(-n_windows // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    return _eval_iter(tokens, batch_size, seq_len, n_windows, n_batches)


def _eval_iter(
    tokens: np.ndarray, batch_size: int, seq_len: int, n_windows: int, n_batches: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for b in range(n_batches):
        starts = np.arange(b * batch_size, min((b + 1) * batch_size, n_windows)) * seq_len
        yield _split(_rows(tokens, starts, seq_len))


def _rows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
    return np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)  # (R, L+1)


def _split(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of ``rows`` ``(R, L+1)``: two int64 tensors ``(R, L)``."""
    t = torch.from_numpy(rows)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()  # (R, L), (R, L)
