"""Differential attention on ``torch.nn.functional.scaled_dot_product_attention``.

Differential attention is linear in its two softmax maps, so it is the difference of two ordinary
attention calls: ``softmax(l1) v - λ softmax(l2) v``. How to cut it into SDPA calls is a speed
choice (the result is the same):

- ``"stacked"``: one call over both branches' 2H query heads, when the branches share keys
  (DIFF V2 passes ``k1 is k2``) and the value is as wide as the keys.
- ``"two"``: one call per branch with the full value width dv.
- ``"four"``: the value split into halves of width d, four calls with equal q/k/v widths. CUDA's
  flash kernels need equal widths; on an H200 this was the fastest DIFF V1 path at N >= 4K
  (see benchmarks/NOTES.md).

``"auto"`` takes ``stacked`` where legal, ``four`` on CUDA when dv = 2d and a backward follows,
else ``two``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import causal_mask

Pattern = Literal["auto", "stacked", "two", "four"]

# SDPA takes enable_gqa from torch 2.5 on; older versions get the kv heads expanded.
_HAS_ENABLE_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None,
              bias: Tensor | None = None) -> Tensor:
    """Softmax attention with GQA and a bottom-right causal mask when N < M.

    q (B, H, N, d), k (B, H_kv, M, d), v (B, H_kv, M, dv) -> (B, H, N, dv). ``bias`` (broadcastable
    to (B, H, N, M)) is added to the scaled scores: SDPA's float ``attn_mask`` with the causal mask
    folded in as -inf, in q's dtype (SDPA requires it; under bf16 the bias is rounded to bf16). On an
    H200 (torch 2.11) the cuDNN and memory-efficient kernels take such a 4-d mask; flash takes none.
    """
    n, m = q.shape[-2], k.shape[-2]
    mask, is_causal = None, False
    if bias is not None:
        mask = bias.to(q.dtype)
        mask = mask[(None,) * (4 - mask.dim())]  # 4-d: cuDNN refuses 3-d masks (seen on an H200)
        if causal and n > 1:  # n == 1 sees every cached key
            mask = mask.masked_fill(~causal_mask(n, m, q.device), float("-inf"))
    elif causal and n == m:
        is_causal = True
    elif causal and n > 1:  # n == 1 sees every cached key: no mask needed
        mask = causal_mask(n, m, q.device)
    kwargs = {}
    if k.shape[1] != q.shape[1]:
        if _HAS_ENABLE_GQA and mask is None:
            kwargs["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, **kwargs)


def _lam_rows(lam: Tensor) -> Tensor:
    """λ in fp32, broadcastable against (B, H, N, dv): 0-d (V1) as is, (B, H, N) (V2) as (B, H, N, 1)."""
    lam = lam.float()
    return lam[..., None] if lam.dim() == 3 else lam


def _combine_plain(o1: Tensor, o2: Tensor, lam: Tensor) -> Tensor:
    """o1 - λ o2 in fp32, returned in o1's dtype, as plain ops. λ is 0-d or (B, H, N)."""
    return (o1.float() - _lam_rows(lam) * o2.float()).to(o1.dtype)


class _Combine(torch.autograd.Function):
    """:func:`_combine_plain` keeping o2 as it is for the backward, not autograd's fp32 copy of it.

    o2 is an SDPA output, which its call keeps anyway, so a half-precision DIFF through SDPA keeps 4 bytes
    an element less. The backward is autograd's arithmetic for the plain ops, op for op (o1, o2 and λ each
    have this one use), so the gradients are the same bits.
    """

    @staticmethod
    def forward(ctx, o1: Tensor, o2: Tensor, lam: Tensor) -> Tensor:
        lam_b = _lam_rows(lam)
        ctx.save_for_backward(o2, lam_b)
        ctx.o1_dtype, ctx.lam_dtype = o1.dtype, lam.dtype
        return (o1.float() - lam_b * o2.float()).to(o1.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        o2, lam_b = ctx.saved_tensors
        g = grad.float()
        neg = -g  # sub's backward for the subtrahend
        g_o1 = g.to(ctx.o1_dtype) if ctx.needs_input_grad[0] else None
        g_o2 = (neg * lam_b).to(o2.dtype) if ctx.needs_input_grad[1] else None
        g_lam = None
        if ctx.needs_input_grad[2]:
            g_lam = (neg * o2.float()).sum_to_size(lam_b.shape)
            g_lam = (g_lam.squeeze(-1) if lam_b.dim() == 4 else g_lam).to(ctx.lam_dtype)
        return g_o1, g_o2, g_lam


def _combine(o1: Tensor, o2: Tensor, lam: Tensor) -> Tensor:
    """o1 - λ o2 in fp32, returned in o1's dtype. λ is 0-d or (B, H, N)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (o1, o2, lam)):
        return _Combine.apply(o1, o2, lam)
    return _combine_plain(o1, o2, lam)


def choose_pattern(q1: Tensor, k1: Tensor, k2: Tensor, v: Tensor) -> Pattern:
    """The fastest legal pattern, from the H200 measurements in benchmarks/results/attention-h200.json.

    dv = 2d on CUDA: four calls when a backward follows (10.3 vs 10.6 ms at 4K, 30.5 vs 34.9 at 16K),
    two calls for inference (1.74 vs 2.04 ms forward at 2K, 7.42 vs 8.66 at 16K).
    """
    d, dv = q1.shape[-1], v.shape[-1]
    if k1 is k2 and dv == d:
        return "stacked"
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q1, k1, k2, v))
    if q1.is_cuda and dv == 2 * d and needs_grad:
        return "four"
    return "two"


def differential_attention(
    q1: Tensor,
    q2: Tensor,
    k1: Tensor,
    k2: Tensor,
    v: Tensor,
    lam: Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    pattern: Pattern = "auto",
    bias: Tensor | None = None,
) -> Tensor:
    """(B, H, N, dv) = softmax(s q1 k1ᵀ + bias) v - λ softmax(s q2 k2ᵀ + bias) v, through SDPA calls.

    ``bias`` (optional, broadcastable to (B, H, N, M)) is shared by the two branches of a head.
    """
    scale = q1.shape[-1] ** -0.5 if scale is None else scale
    if pattern == "auto":
        pattern = choose_pattern(q1, k1, k2, v)
    if pattern == "stacked":
        if k1 is not k2 or v.shape[-1] != q1.shape[-1]:
            raise ValueError("pattern='stacked' needs k1 is k2 and a value as wide as the keys")
        b, h, n, d = q1.shape
        # Interleave the branches: query head 2i+b keeps kv head i // (H/H_kv) under SDPA's GQA rule.
        q = torch.stack((q1, q2), dim=2).reshape(b, 2 * h, n, d)  # (B, 2H, N, d)
        if bias is not None and bias.dim() >= 3 and bias.shape[-3] > 1:
            bias = bias.repeat_interleave(2, dim=-3)  # (…, 2H, N, M): both branches of head i get its bias
        o = attention(q, k1, v, causal=causal, scale=scale, bias=bias).view(b, h, 2, n, -1)  # (B, H, 2, N, dv)
        return _combine(o[:, :, 0], o[:, :, 1], lam)
    if pattern == "two":
        o1 = attention(q1, k1, v, causal=causal, scale=scale, bias=bias)
        o2 = attention(q2, k2, v, causal=causal, scale=scale, bias=bias)
        return _combine(o1, o2, lam)
    if pattern == "four":
        if v.shape[-1] % 2:
            raise ValueError(f"pattern='four' splits the value width in halves; got odd width {v.shape[-1]}")
        va, vb = v.chunk(2, dim=-1)  # (B, H_kv, M, dv/2) each
        o1 = torch.cat([attention(q1, k1, va, causal=causal, scale=scale, bias=bias),
                        attention(q1, k1, vb, causal=causal, scale=scale, bias=bias)], dim=-1)
        o2 = torch.cat([attention(q2, k2, va, causal=causal, scale=scale, bias=bias),
                        attention(q2, k2, vb, causal=causal, scale=scale, bias=bias)], dim=-1)
        return _combine(o1, o2, lam)
    raise ValueError(f"unknown SDPA pattern {pattern!r}; choose auto, stacked, two or four")
