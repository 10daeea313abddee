"""Plain-PyTorch differential attention: SPEC.md's equations in code.

Everything is computed in fp32 with explicit N×N score matrices, so it is slow and memory-hungry
but obviously right. It is the oracle every other backend is tested against, and the only backend
that can also return the attention maps and raw logits the evaluation suite inspects.

Shapes (all backends): q1, q2 (B, H, N, d); k1, k2 (B, H_kv, M, d); v (B, H_kv, M, dv);
``lam`` a 0-d tensor (V1) or (B, H, N) (V2). Differential head ``i`` uses kv head ``i // (H / H_kv)``
for both branches. With ``causal=True`` and N < M the queries are the last N positions (the
bottom-right alignment a KV cache needs). ``bias``, optional, is an additive float term on the
scaled scores, broadcastable to (B, H, N, M) (ALiBi); both branches of a differential head get it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class DiffAttentionMaps(NamedTuple):
    out: Tensor  # (B, H, N, dv) in the input dtype
    attn1: Tensor  # (B, H, N, M) fp32 softmax of branch 1
    attn2: Tensor  # (B, H, N, M) fp32 softmax of branch 2
    logits1: Tensor  # (B, H, N, M) fp32 scaled scores of branch 1, -inf where masked
    logits2: Tensor  # (B, H, N, M) fp32 scaled scores of branch 2, -inf where masked


def causal_mask(n_q: int, n_k: int, device: torch.device | None = None) -> Tensor:
    """(N, M) bool, True where query i (at position M - N + i) may see key j."""
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(diagonal=n_k - n_q)


def _expand_kv(x: Tensor, n_heads: int) -> Tensor:
    """(B, H_kv, M, e) -> (B, H, M, e): kv head g serves query heads g*r .. g*r + r - 1."""
    return x.repeat_interleave(n_heads // x.shape[1], dim=1)


def softmax_logits(q: Tensor, k: Tensor, *, causal: bool, scale: float, bias: Tensor | None = None) -> Tensor:
    """fp32 scaled scores (B, H, N, M) plus ``bias``, -inf where the causal mask hides a key."""
    logits = scale * torch.matmul(q.float(), _expand_kv(k, q.shape[1]).float().transpose(-1, -2))
    if bias is not None:
        logits = logits + bias.float()
    if causal:
        logits = logits.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    return logits


def attention_maps(q1, q2, k1, k2, v, lam, *, causal: bool = True, scale: float | None = None,
                   bias: Tensor | None = None) -> DiffAttentionMaps:
    """Differential attention with every intermediate: softmax(l1) v - λ softmax(l2) v."""
    scale = q1.shape[-1] ** -0.5 if scale is None else scale
    logits1 = softmax_logits(q1, k1, causal=causal, scale=scale, bias=bias)
    logits2 = softmax_logits(q2, k2, causal=causal, scale=scale, bias=bias)
    attn1, attn2 = logits1.softmax(-1), logits2.softmax(-1)  # (B, H, N, M) fp32
    lam = lam.float()
    if lam.dim() == 3:  # V2: one λ per query token and head
        lam = lam[..., None]  # (B, H, N, 1)
    vf = _expand_kv(v, q1.shape[1]).float()  # (B, H, M, dv)
    out = torch.matmul(attn1 - lam * attn2, vf)
    return DiffAttentionMaps(out.to(v.dtype), attn1, attn2, logits1, logits2)


def differential_attention(q1, q2, k1, k2, v, lam, *, causal: bool = True, scale: float | None = None,
                           bias: Tensor | None = None) -> Tensor:
    return attention_maps(q1, q2, k1, k2, v, lam, causal=causal, scale=scale, bias=bias).out


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None,
              bias: Tensor | None = None) -> Tensor:
    """Ordinary softmax attention (the baseline), fp32 inside, same GQA and mask rules."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = softmax_logits(q, k, causal=causal, scale=scale, bias=bias).softmax(-1)
    return torch.matmul(attn, _expand_kv(v, q.shape[1]).float()).to(v.dtype)
