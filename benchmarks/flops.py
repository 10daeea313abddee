"""Useful work of attention and of a whole model, by SPEC.md's "Work floor" (plain Python, no GPU).

Matrix products are counted in multiply-accumulates of an (N × N) by (N × width) product, N²·width
MACs, 2 FLOPs each. One softmax head of q/k width d and value width dv:
    forward  S = QKᵀ (d) + P·V (dv)                                       = N²(d + dv)
    backward S recomputed (d) + dV = Pᵀ·dO (dv) + dP = dO·Vᵀ (dv) + dQ, dK (2d) = N²(3d + 2dv)
One differential head (two softmax branches over one value of width dv):
    forward  S1, S2 (2d) + P1·V, P2·V (2dv)                               = N²(2d + 2dv)
    backward S1, S2 recomputed (2d) + dV = (P1 − λP2)ᵀ·dO (dv) + dP = dO·Vᵀ shared by both
             branches (dv) + dQ1, dQ2, dK1, dK2 (4d)                      = N²(6d + 2dv)
DIFF V1 (d, dv = 2d) against two baseline heads of d: forward 6N²d vs 4N²d, backward 10N²d vs 10N²d.
DIFF V2 (d, dv = d) against one SDPA call over its 2h heads: forward 4N²d vs 4N²d, backward 8N²d vs
10N²d. A causal mask halves every product (N²/2 query-key pairs, the diagonal ignored).
"""

from __future__ import annotations


def attention_flops(batch: int, heads: int, n: int, d: int, dv: int, *, branches: int = 1,
                    causal: bool = True, m: int | None = None) -> tuple[float, float]:
    """(forward, backward) useful FLOPs of ``heads`` attention heads over ``batch`` rows.

    ``branches`` 1: softmax heads; 2: differential heads (two q/k branches sharing one value).
    ``n`` queries over ``m`` keys (default n); causal halves the products when n == m.
    """
    if branches not in (1, 2):
        raise ValueError(f"branches must be 1 (softmax) or 2 (differential), got {branches}")
    m = n if m is None else m
    fwd, bwd = (d + dv, 3 * d + 2 * dv) if branches == 1 else (2 * d + 2 * dv, 6 * d + 2 * dv)
    pairs = n * m * (0.5 if causal and n == m else 1.0)  # query-key pairs scored
    scale = 2.0 * batch * heads * pairs  # 2 FLOPs per multiply-accumulate
    return fwd * scale, bwd * scale


def model_flops_per_token(*, non_embedding_params: int, vocab_size: int, dim: int, n_layers: int, seq: int,
                          head_dim: int, attention: str, n_heads: int, train: bool = True) -> float:
    """Useful FLOPs per token of one training step (forward + backward) or one forward (``train=False``).

    Matrices: 2 FLOPs per parameter and token forward, 4 backward, counting the LM head (vocab × dim)
    but not the embedding lookup. Attention (causal, sequence ``seq``) per layer from
    :func:`attention_flops`: ``n_heads`` baseline heads of ``head_dim``, or n_heads/2 DIFF V1 heads
    (d, 2d), or n_heads DIFF V2 heads (d, d).
    """
    matrix = non_embedding_params + vocab_size * dim
    per_token = (6 if train else 2) * matrix
    if attention == "baseline":
        f, b = attention_flops(1, n_heads, seq, head_dim, head_dim)
    elif attention == "diff":
        f, b = attention_flops(1, n_heads // 2, seq, head_dim, 2 * head_dim, branches=2)
    elif attention == "diff_v2":
        f, b = attention_flops(1, n_heads, seq, head_dim, head_dim, branches=2)
    else:
        raise ValueError(f"no work count for attention {attention!r}")
    return per_token + n_layers * (f + (b if train else 0.0)) / seq
