"""Log-likelihood scoring of continuations, shared by the choice tasks (icl, hallucination, zero-shot).

``score_continuations(model, context, continuations)`` returns, for each continuation, the sum of its
tokens' log-probabilities after ``context`` (and whether it is the greedy continuation), computed in one
forward pass over a batch of ``context + continuation`` rows padded at the end (padding after a row's
last token cannot change its log-probabilities: the model is causal).

A long prompt prefix shared by many questions (the demonstrations of in-context learning) is run once
into a :class:`SharedPrefix`; its keys and values are then reused for every row of every batch, exactly
(the same function as running the whole sequence, up to the attention kernels' rounding).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..generation import stream


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when ``amp``, else nothing."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model) -> torch.device:
    return next(model.parameters()).device


class SharedPrefix:
    """Post-RoPE keys and values of a prompt prefix (batch 1), computed once, reused for any batch."""

    def __init__(self, model, ids: list[int], *, amp: bool = False):
        if not ids:
            raise ValueError("a shared prefix needs at least one token")
        device = model_device(model)
        with torch.no_grad(), autocast(device, amp):
            cache = model.new_cache(1, len(ids))  # in the dtype of the keys and values under this autocast
            model(torch.tensor([ids], dtype=torch.long, device=device), cache=cache)
        self.length = len(ids)
        self.k = [k[:, :, :self.length] for k in cache.k]  # per layer (1, H_k, P, d)
        self.v = [v[:, :, :self.length] for v in cache.v]  # per layer (1, H_v, P, dv)


class _PrefixExtension:
    """A KV cache (the duck type ``model.forward`` takes) that puts a batch of rows after a SharedPrefix.

    Every row sees the prefix's keys and values (broadcast, materialised one layer at a time) and then
    its own; positions continue from the prefix's length, so RoPE and the causal mask are those of the
    full sequence.
    """

    def __init__(self, prefix: SharedPrefix, batch: int):
        self.prefix, self.batch, self.length = prefix, batch, prefix.length

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        pk, pv = self.prefix.k[layer], self.prefix.v[layer]
        k_all = torch.cat([pk.expand(self.batch, -1, -1, -1).to(k.dtype), k], dim=2)  # (B, H_k, P + N, d)
        v_all = torch.cat([pv.expand(self.batch, -1, -1, -1).to(v.dtype), v], dim=2)  # (B, H_v, P + N, dv)
        return k_all, v_all

    def advance(self, n: int) -> None:
        self.length += n


@dataclass(frozen=True)
class Score:
    logprob: float  # sum of the continuation tokens' log-probabilities (nats)
    n_tokens: int
    greedy: bool  # every continuation token is the argmax of its step


def score_continuations(model, context: list[int], continuations: list[list[int]], *,
                        prefix: SharedPrefix | None = None, batch_size: int = 32, amp: bool = False) -> list[Score]:
    """Score each continuation after ``prefix`` (optional) + ``context``: one batched forward per
    ``batch_size`` continuations. ``context`` must be non-empty (its last token predicts the first
    continuation token) and every continuation non-empty; the input (all but the last continuation
    token) must fit ``max_seq_len``."""
    if not context:
        raise ValueError("score_continuations needs a non-empty context (e.g. [eos_id])")
    if any(len(c) == 0 for c in continuations):
        raise ValueError("every continuation needs at least one token")
    p = prefix.length if prefix is not None else 0
    longest = max((len(c) for c in continuations), default=0)
    limit = model.config.max_seq_len
    if p + len(context) + longest - 1 > limit:  # the last continuation token is scored, never fed
        raise ValueError(f"prefix {p} + context {len(context)} + continuation {longest} - 1 tokens exceed the "
                         f"model's max_seq_len {limit}")
    device = model_device(model)
    scores: list[Score] = []
    for start in range(0, len(continuations), batch_size):
        chunk = continuations[start:start + batch_size]
        width = len(context) + max(len(c) for c in chunk) - 1
        rows = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, c in enumerate(chunk):
            rows[i, :len(context) + len(c) - 1] = torch.tensor(context + c[:-1])  # the last token is only a target
        cache = _PrefixExtension(prefix, len(chunk)) if prefix is not None else None
        with torch.no_grad(), autocast(device, amp):
            logits = model(rows.to(device), cache=cache)  # (B, W, V)
        logp = F.log_softmax(logits.float(), dim=-1)  # (B, W, V)
        n0 = len(context)
        for i, c in enumerate(chunk):
            steps = logp[i, n0 - 1:n0 - 1 + len(c)]  # (len(c), V): position t predicts token t + 1
            target = torch.tensor(c, device=device)
            token_lp = steps.gather(-1, target[:, None]).squeeze(-1)
            greedy = bool((steps.argmax(-1) == target).all())
            scores.append(Score(float(token_lp.sum()), len(c), greedy))
    return scores


@torch.no_grad()
def greedy_generate(model, context: list[int], max_new_tokens: int, *, stop_ids: set[int] = frozenset(),
                    amp: bool = False) -> list[int]:
    """Greedy continuation of ``context`` with the KV cache, without the stop token, at most
    ``max_new_tokens`` (fewer when the context leaves no room)."""
    device = model_device(model)
    room = model.config.max_seq_len - len(context)
    out: list[int] = []
    with autocast(device, amp):
        ids = torch.tensor([context], dtype=torch.long, device=device)
        for token in stream(model, ids, max(0, min(max_new_tokens, room)), temperature=0):
            t = int(token[0])
            if t in stop_ids:
                break
            out.append(t)
    return out
