"""Single-softmax alternatives to differential attention, in plain PyTorch (eager, fp32 inside).

The ablations of the public discussion around DIFF: can one softmax map, changed a little, do what the
difference of two does? Each function follows the conventions of the other backends: q (B, H, N, d),
k (B, H_kv, M, d), v (B, H_kv, M, dv), GQA by kv head ``i // (H / H_kv)``, a bottom-right causal mask
when N < M (KV-cache decoding), an optional additive float ``bias`` on the scaled scores broadcastable
to (B, H, N, M) (ALiBi), and an output (B, H, N, dv) in v's dtype. Scores, normalisation and the
product with v are fp32 with explicit N×M matrices, also inside a bf16 autocast region (which is
switched off here): these are ablation paths, not fast ones (no fused kernel covers them).

- :func:`softmax_plus_one_attention`: exp(s_ij) / (1 + Σ_j exp(s_ij)), a row may attend to nothing.
- :func:`sigmoid_attention`: Σ_j σ(s_ij + b) v_j (Ramapuram et al. 2024), no normalisation over keys.
- :func:`gated_attention`: softmax(α·s1 + log σ(β·s2)) on DIFF V1's layout.

The learned-temperature baseline needs no function here: it scales q and calls the softmax op.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import _expand_kv, causal_mask


def _fp32(fn):
    """Run ``fn`` with autocast off, so its fp32 matmuls stay fp32 under bf16 autocast."""

    @functools.wraps(fn)
    def wrapper(q: Tensor, *args, **kwargs) -> Tensor:
        with torch.autocast(device_type=q.device.type, enabled=False):
            return fn(q, *args, **kwargs)

    return wrapper


def _scores(q: Tensor, k: Tensor, scale: float | None, bias: Tensor | None) -> Tensor:
    """fp32 scaled scores plus bias (B, H, N, M), unmasked."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = scale * torch.matmul(q.float(), _expand_kv(k, q.shape[1]).float().transpose(-1, -2))
    return s if bias is None else s + bias.float()


def _visible(q: Tensor, k: Tensor, causal: bool) -> Tensor | None:
    """(N, M) bool of the keys each query may see, None when all are visible."""
    return causal_mask(q.shape[-2], k.shape[-2], q.device) if causal else None


def _apply(weights: Tensor, v: Tensor, h: int) -> Tensor:
    return torch.matmul(weights, _expand_kv(v, h).float()).to(v.dtype)  # (B, H, N, dv)


@_fp32
def softmax_plus_one_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None,
                               bias: Tensor | None = None) -> Tensor:
    """Σ_j exp(s_ij) / (1 + Σ_j' exp(s_ij')) v_j: softmax with a phantom key of score 0 and value 0.

    Computed as exactly that softmax over the visible keys plus one zero logit (stable: the max
    subtracted includes the phantom's 0), whose column is then dropped.
    """
    s = _scores(q, k, scale, bias)
    visible = _visible(q, k, causal)
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    m = s.amax(-1, keepdim=True).clamp_min(0.0).detach()  # the phantom key's logit 0 takes part in the max
    e = torch.exp(s - m)  # (B, H, N, M), 0 where masked
    weights = e / (torch.exp(-m) + e.sum(-1, keepdim=True))
    return _apply(weights, v, q.shape[1])


@_fp32
def sigmoid_attention(q: Tensor, k: Tensor, v: Tensor, *, offset: float, causal: bool = True,
                      scale: float | None = None, bias: Tensor | None = None) -> Tensor:
    """Σ_{j visible} σ(s_ij + offset) v_j (Ramapuram et al. 2024, "Theory, Analysis, and Best Practices
    for Sigmoid Self-Attention").

    The paper takes offset b = −log n with n the sequence length, so that the weights of a row sum to
    about one at init. The model passes b = −log(max_seq_len), a constant: with b depending on the
    current length, a token decoded with a KV cache (one query, length growing) would see another b
    than in the full forward, and cached decoding would not equal the forward.
    """
    s = _scores(q, k, scale, bias)
    weights = torch.sigmoid(s + offset)
    visible = _visible(q, k, causal)
    if visible is not None:
        weights = weights.masked_fill(~visible, 0.0)
    return _apply(weights, v, q.shape[1])


@_fp32
def gated_attention(q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, v: Tensor, alpha: Tensor, beta: Tensor, *,
                    causal: bool = True, scale: float | None = None, bias: Tensor | None = None) -> Tensor:
    """softmax(α_h·s1 + log σ(β_h·s2)) v, per head h, on DIFF V1's layout.

    Args:
        q1, q2: (B, H, N, d); k1, k2: (B, H_kv, M, d); v (B, H_kv, M, dv) as for differential attention.
        alpha, beta: (H,) learned per-head factors (init 1).
        bias: added to both branches' scaled scores (s1 and s2), as DIFF V1's branches share ALiBi.

    The second map gates the first: weight_ij ∝ exp(α s1_ij) · σ(β s2_ij), i.e. each key's softmax
    weight is multiplied by a gate in (0, 1) before normalising, so a head can shut keys off. The issue
    that proposed it wrote "− log σ(β s2)"; with the minus the factor is 1/σ ∈ (1, ∞), unbounded and
    no gate, so this is the gate (+ log σ). Masked keys are filled after combining (α may turn negative).
    """
    h = q1.shape[1]
    s1 = _scores(q1, k1, scale, bias)
    s2 = _scores(q2, k2, scale, bias)
    logits = alpha.float()[:, None, None] * s1 + F.logsigmoid(beta.float()[:, None, None] * s2)  # (B, H, N, M)
    visible = _visible(q1, k1, causal)
    if visible is not None:
        logits = logits.masked_fill(~visible, float("-inf"))
    return _apply(logits.softmax(-1), v, h)
