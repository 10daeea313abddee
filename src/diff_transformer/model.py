"""The decoder: LLaMA-style blocks whose attention is DIFF V1, DIFF V2, the softmax baseline or one
of the single-softmax ablations (softmax+1, learned temperature, sigmoid, gated).

Single-device code. It knows nothing of training, checkpoints or parallelism. Every attention kind is
a small subclass of the baseline's :class:`Attention` that overrides ``layout``/``attend`` (and adds its
own parameters); every ablation is a configuration of these modules (config.py, variants.py).

Parameter names follow Hugging Face's Llama/DiffLlama (``embed_tokens``, ``layers.{i}.self_attn.q_proj``,
``mlp.gate_proj``, ``input_layernorm`` ...), so the interop adapter only permutes rows.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .attention import differential_attention, softmax_attention
from .attention.variants import gated_attention, sigmoid_attention, softmax_plus_one_attention
from .config import ModelConfig, ParameterReport, matched_pair


def _rms_normalize(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x / rms(x) in x's dtype, 1 / rms(x) in fp32 (…, 1)): HF LlamaRMSNorm's arithmetic, op for op."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd).to(x.dtype), rstd


class _RMSNormFunction(torch.autograd.Function):
    """``weight * normalize(x)`` for a non-fp32 x, keeping only x and the per-row 1/rms for the backward.

    Autograd through the plain ops keeps an fp32 copy of x and the normalised x as well: for a bf16 input
    6 bytes an element more than this (DIFF's per-head norm sees dim elements a token: 1.9 GiB of the
    `base` preset's 4K-token training step). The backward recomputes x̂ and replays autograd's own
    arithmetic for the plain ops, op for op (mul, rsqrt, mean and pow backward formulas, the casts
    included), so forward and gradients are the same bits as autograd's. Only for a non-fp32 x: there
    ``x.float()`` is a node of its own, so the norm hands x one gradient either way. An fp32 x is used by
    the plain ops directly, twice, and autograd adds those two gradients into x's together with x's other
    uses (the residual stream) in an order one Function cannot reproduce; a rounding apart there moved
    a `tiny` run's final loss by 0.07, so fp32 inputs keep the plain ops.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        xn, rstd = _rms_normalize(x, eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * xn

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, rstd = ctx.saved_tensors
        xf = x.float()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            g = (dy * weight).to(x.dtype).to(xf.dtype)  # mul, then the two casts' backward
            g_rstd = (g * xf).sum(-1, keepdim=True)  # mul backward, reduced to rstd's shape
            g_mean = (-0.5 * g_rstd) * rstd.pow(3)  # rsqrt backward
            g_sq = g_mean.expand_as(xf) / x.shape[-1]  # mean backward
            dx = (g * rstd + g_sq * (2 * xf)).to(x.dtype)  # x·rstd and pow(2) backward, summed
        if ctx.needs_input_grad[1]:
            dw = (dy * (xf * rstd).to(x.dtype)).sum_to_size(weight.shape).to(weight.dtype)
        return dx, dw, None


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and returned in the input dtype (as HF's LlamaRMSNorm).

    Training on a half-precision (or fp64) input keeps only x and 1/rms for the backward
    (:class:`_RMSNormFunction`); otherwise it is the plain ops. Same bits either way, forward and backward.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32 and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        return self.weight * _rms_normalize(x, self.eps)[0]


# RoPE ------------------------------------------------------------------------------------------
def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (N, head_dim) in fp32, rotate-half layout (frequencies repeated twice)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (N, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (N, d)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, N, d) by position; each d-wide head separately (DIFF sub-heads included)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ALiBi -----------------------------------------------------------------------------------------
def alibi_slopes(n_heads: int) -> list[float]:
    """Press et al.'s head slopes (their ``get_slopes``): for n = 2^k the geometric sequence
    2^(-8/n), 2^(-16/n), ..., 2^-8; otherwise the slopes of the largest power of two below n, then
    every other slope of the next power of two, as many as are missing."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return power_of_2(n_heads)
    closest = 2 ** math.floor(math.log2(n_heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: n_heads - closest]


def alibi_bias(slopes: Tensor, n: int, m: int) -> Tensor:
    """(H, N, M) fp32 bias −slope_h · (i − j) of the query at position i = M − N + row on key j.

    Absolute positions, so a cached decoding step gets exactly the rows of the full forward's bias;
    entries of future keys (j > i) are positive and hidden by the op's causal mask.
    """
    q_pos = torch.arange(m - n, m, device=slopes.device)
    k_pos = torch.arange(m, device=slopes.device)
    dist = (q_pos[:, None] - k_pos[None, :]).float()  # (N, M)
    return -slopes.float()[:, None, None] * dist[None]  # (H, N, M)


# KV cache --------------------------------------------------------------------------------------
class KVCache:
    """Preallocated post-RoPE keys and values of every layer, for incremental decoding.

    Keys are (B, H_k, T, d) and values (B, H_v, T, dv) with H_k·d = H_v·dv = n_kv_heads·d for every
    attention kind: a DIFF model's cache is exactly the size of its baseline's.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        q_heads, k_heads, v_heads, v_dim = ATTENTION_CLASSES[config.attention].layout(config)
        d = config.head_dim
        self.max_len = max_len
        self.length = 0
        # Zeros, not empty: the static path (StaticSlots) attends over unwritten slots with weight 0, and
        # 0 · NaN garbage would be NaN.
        self.k = [torch.zeros(batch, k_heads, max_len, d, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(batch, v_heads, max_len, v_dim, dtype=dtype, device=device) for _ in range(config.n_layers)]

    def _check_dtype(self, layer: int, k: Tensor) -> None:
        if k.dtype != self.k[layer].dtype:  # storing would cast silently; the op would then refuse q and k
            raise ValueError(f"KV cache holds {self.k[layer].dtype} but this forward makes {k.dtype} keys: build the "
                             "cache with model.new_cache inside the same autocast region as the forward")

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k``, ``v`` of the new positions; return every position's so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested. Allocate a longer cache.")
        self._check_dtype(layer, k)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def at(self, positions: Tensor) -> StaticSlots:
        """This cache seen with fixed shapes: writes land at ``positions`` (a device tensor), reads return
        every slot (see :class:`StaticSlots`)."""
        return StaticSlots(self, positions)

    def advance(self, n: int) -> None:
        self.length += n

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class StaticSlots:
    """A :class:`KVCache` whose shapes never depend on the position (gpt-fast's static cache).

    ``update`` writes the new keys and values at ``positions`` ((N,) int64 on the cache's device) in
    place and returns all ``max_len`` slots; the forward masks the slots after each query's position
    (see ``DiffTransformerLM.forward(positions=...)``). Every shape is then the same at every step, so
    a decode step compiles once and replays as one CUDA graph. ``cache.length`` is left to the caller.
    """

    def __init__(self, cache: KVCache, positions: Tensor):
        self.cache, self.positions = cache, positions

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        c = self.cache
        c._check_dtype(layer, k)
        c.k[layer].index_copy_(2, self.positions, k)  # (B, Hk, T, d)
        c.v[layer].index_copy_(2, self.positions, v)  # (B, Hv, T, dv)
        return c.k[layer], c.v[layer]


def activation_dtype(weight: Tensor) -> torch.dtype:
    """The dtype of a linear layer's output for ``weight`` here: autocast's when autocast is on for the
    weight's device type (fp64 weights excepted: autocast leaves them alone), else the weight's."""
    device = weight.device.type
    if (weight.dtype != torch.float64 and torch.amp.is_autocast_available(device)
            and torch.is_autocast_enabled(device)):
        return torch.get_autocast_dtype(device)
    return weight.dtype


# Attention -------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Baseline softmax attention. Every other kind changes only ``layout``, ``attend`` and its parameters."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = d = config.head_dim
        self.backend = config.attn_backend
        self.q_heads, self.k_heads, self.v_heads, self.v_dim = self.layout(config)
        self.q_proj = nn.Linear(config.dim, self.q_heads * d, bias=False)
        self.k_proj = nn.Linear(config.dim, self.k_heads * d, bias=False)
        self.v_proj = nn.Linear(config.dim, self.v_heads * self.v_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * d, config.dim, bias=False)
        out_head_dim = config.n_heads * d // self.out_heads(config)
        self.head_norm = RMSNorm(out_head_dim, config.norm_eps) if config.head_norm else None
        self.head_norm_scale = config.layer_head_norm_scale(layer_idx)  # (1 − λ_init) for DIFF V1, else 1

    @staticmethod
    def layout(config: ModelConfig) -> tuple[int, int, int, int]:
        """(query heads, key heads, value heads, value width) of the projections, all of width d."""
        return config.n_heads, config.n_kv_heads, config.n_kv_heads, config.head_dim

    @staticmethod
    def out_heads(config: ModelConfig) -> int:
        """Heads of the attention output (and of the op: ALiBi has one slope per output head)."""
        return config.n_heads

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, cache: KVCache | StaticSlots | None = None,
                alibi: Tensor | None = None) -> Tensor:
        """x (B, N, D), rope = (cos, sin) each (N, d) for the new positions or None (ALiBi, NoPE),
        alibi (H_out, N, M) additive score bias or None -> (B, N, D)."""
        b, n, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(b, n, self.q_heads, d).transpose(1, 2)  # (B, Hq, N, d)
        k = self.k_proj(x).view(b, n, self.k_heads, d).transpose(1, 2)  # (B, Hk, N, d)
        v = self.v_proj(x).view(b, n, self.v_heads, self.v_dim).transpose(1, 2)  # (B, Hv, N, dv)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hk, M, d), (B, Hv, M, dv)
        o = self.attend(x, q, k, v, alibi)  # (B, H_out, N, d_out)
        if self.head_norm is not None:
            o = self.head_norm(o) * self.head_norm_scale
        return self.o_proj(o.transpose(1, 2).reshape(b, n, -1))  # (B, N, D)

    def attend(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
        return softmax_attention(q, k, v, causal=True, backend=self.backend, bias=bias)


class DiffAttention(Attention):
    """DIFF V1: (softmax(Q1K1ᵀ) − λ softmax(Q2K2ᵀ)) V, then a per-head RMSNorm times (1 − λ_init).

    ``lambda_mode``: learned (the paper's re-parametrisation by four d-vectors), fixed (λ = λ_init, no
    vectors) or zero (λ = 0: branch 1's softmax alone through this layout, norm and scale; the q2/k2
    rows of q_proj/k_proj stay, so shapes match DIFF's, but get no gradient).
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        d = config.head_dim
        self.lambda_init = config.layer_lambda_init(layer_idx)
        self.lambda_mode = config.lambda_mode
        if self.lambda_mode == "learned":
            self.lambda_q1 = nn.Parameter(torch.zeros(d))
            self.lambda_k1 = nn.Parameter(torch.zeros(d))
            self.lambda_q2 = nn.Parameter(torch.zeros(d))
            self.lambda_k2 = nn.Parameter(torch.zeros(d))

    @staticmethod
    def layout(config: ModelConfig) -> tuple[int, int, int, int]:
        # q/k as 2·(h/2) sub-heads, pairs (2i, 2i+1); values 2d wide
        return config.n_heads, config.n_kv_heads, config.n_kv_heads // 2, 2 * config.head_dim

    @staticmethod
    def out_heads(config: ModelConfig) -> int:
        return config.n_heads // 2

    @staticmethod
    def combine_lambda(q1: Tensor, k1: Tensor, q2: Tensor, k2: Tensor, lambda_init: float) -> Tensor:
        """λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init from the four (d,) vectors, a 0-d fp32 tensor."""
        l1 = torch.exp(torch.dot(q1.float(), k1.float()))
        l2 = torch.exp(torch.dot(q2.float(), k2.float()))
        return l1 - l2 + lambda_init

    def lambda_full(self) -> Tensor:
        """This layer's λ, a 0-d fp32 tensor on the weights' device."""
        if self.lambda_mode == "learned":
            return self.combine_lambda(self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2, self.lambda_init)
        value = self.lambda_init if self.lambda_mode == "fixed" else 0.0
        return torch.tensor(value, dtype=torch.float32, device=self.q_proj.weight.device)

    def attend(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
        # Sub-heads 2i and 2i+1 are branches 1 and 2 of differential head i; kv sub-heads likewise.
        q1, q2 = q[:, 0::2], q[:, 1::2]  # (B, H, N, d) each
        k1, k2 = k[:, 0::2], k[:, 1::2]  # (B, H_kv, M, d) each
        if self.lambda_mode == "zero":  # λ = 0: one softmax map, no second branch to compute
            return softmax_attention(q1, k1, v, causal=True, backend=self.backend, bias=bias)
        return differential_attention(q1, q2, k1, k2, v, self.lambda_full(), causal=True, backend=self.backend,
                                      bias=bias)


class DiffAttentionV2(Attention):
    """DIFF V2: 2h query heads over the baseline's kv heads; O_i = A_2i V − sigmoid(λ_i(x)) A_2i+1 V."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.lambda_proj = nn.Linear(config.dim, config.n_heads, bias=False)

    @staticmethod
    def layout(config: ModelConfig) -> tuple[int, int, int, int]:
        return 2 * config.n_heads, config.n_kv_heads, config.n_kv_heads, config.head_dim

    def attend(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
        lam = torch.sigmoid(self.lambda_proj(x).float()).transpose(1, 2)  # (B, h, N) fp32
        return differential_attention(q[:, 0::2], q[:, 1::2], k, k, v, lam, causal=True, backend=self.backend,
                                      bias=bias)


class SoftmaxPlusOneAttention(Attention):
    """The baseline with exp(s_ij) / (1 + Σ_j exp(s_ij)): a row may attend to nothing. Eager (fp32)."""

    def attend(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
        return softmax_plus_one_attention(q, k, v, causal=True, bias=bias)


class TemperatureAttention(Attention):
    """The baseline with a learned per-head temperature: scores × exp(τ_h), τ_h initialised 0.

    Applied to q (q·k is linear in q), so the fused softmax paths run unchanged; an ALiBi bias is
    added after, unscaled.
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.tau = nn.Parameter(torch.zeros(config.n_heads))

    def attend(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
        q = q * torch.exp(self.tau.float()).to(q.dtype)[:, None, None]  # (B, h, N, d)
        return softmax_attention(q, k, v, causal=True, backend=self.backend, bias=bias)


class SigmoidAttention(Attention):
    """Sigmoid attention: o_i = Σ_{j ≤ i} σ(s_ij + b) v_j with b = −log(max_seq_len). Eager (fp32).

    b is a constant rather than −log(current length) so that KV-cache decoding equals the full forward
    (see :func:`~diff_transformer.attention.variants.sigmoid_attention`).
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.offset = -math.log(config.max_seq_len)

    def attend(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
        return sigmoid_attention(q, k, v, offset=self.offset, causal=True, bias=bias)


class GatedAttention(Attention):
    """softmax(α_h·s1 + log σ(β_h·s2)) V on DIFF V1's layout: branch 2 gates branch 1's keys. Eager (fp32).

    α, β: one learned scalar per head (h/2 heads), init 1.
    """

    layout = staticmethod(DiffAttention.layout)
    out_heads = staticmethod(DiffAttention.out_heads)

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.alpha = nn.Parameter(torch.ones(config.n_heads // 2))
        self.beta = nn.Parameter(torch.ones(config.n_heads // 2))

    def attend(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
        q1, q2 = q[:, 0::2], q[:, 1::2]  # (B, H, N, d) each, as DIFF V1
        k1, k2 = k[:, 0::2], k[:, 1::2]  # (B, H_kv, M, d) each
        return gated_attention(q1, q2, k1, k2, v, self.alpha, self.beta, causal=True, bias=bias)


ATTENTION_CLASSES: dict[str, type[Attention]] = {
    "baseline": Attention,
    "diff": DiffAttention,
    "diff_v2": DiffAttentionV2,
    "softmax_plus_one": SoftmaxPlusOneAttention,
    "temperature": TemperatureAttention,
    "sigmoid": SigmoidAttention,
    "gated": GatedAttention,
}


# Initialisation --------------------------------------------------------------------------------
InitRule = tuple[str, float]  # ("normal", std), ("uniform", bound: U(−bound, bound)) or ("const", value)
_Rule = Callable[[ModelConfig, tuple[int, ...]], InitRule]

# Each parameter's role, from the name of its module (``….q_proj.weight``) or its own (``….tau``).
PARAM_ROLES: dict[str, str] = {
    "embed_tokens": "embedding",
    **dict.fromkeys(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head", "lambda_proj"), "linear"),
    **dict.fromkeys(("o_proj", "down_proj"), "residual"),  # the projections that write into the residual stream
    **dict.fromkeys(("input_layernorm", "post_attention_layernorm", "norm"), "norm"),
    "head_norm": "head_norm",
    **dict.fromkeys(("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"), "lambda"),
    "tau": "zero",  # temperature exp(0) = 1: starts as the baseline
    **dict.fromkeys(("alpha", "beta"), "one"),  # gated attention's per-head factors
}

# Scheme -> role -> rule. Roles not listed are initialised alike by every scheme (COMMON_INIT).
INIT_SCHEMES: dict[str, dict[str, _Rule]] = {
    # HF Llama/DiffLlama: N(0, init_std), residual outputs scaled by 1/sqrt(2L) (GPT-2).
    "hf": {
        "embedding": lambda c, shape: ("normal", c.init_std),
        "linear": lambda c, shape: ("normal", c.init_std),
        "residual": lambda c, shape: ("normal", c.init_std / math.sqrt(2 * c.n_layers)),
    },
    # microsoft/unilm Diff-Transformer (first release) and its YOCO training code: nn.Linear's default
    # kaiming_uniform_(a=√5) = U(±1/√fan_in) for every linear, no depth scaling; embeddings N(0, D^-½).
    "official": {
        "embedding": lambda c, shape: ("normal", c.dim**-0.5),
        "linear": lambda c, shape: ("uniform", shape[1] ** -0.5),
        "residual": lambda c, shape: ("uniform", shape[1] ** -0.5),
    },
}
COMMON_INIT: dict[str, _Rule] = {
    "norm": lambda c, shape: ("const", 1.0),
    "lambda": lambda c, shape: ("normal", c.lambda_std),  # the paper's N(0, 0.1) by default
    "zero": lambda c, shape: ("const", 0.0),
    "one": lambda c, shape: ("const", 1.0),
}


def head_norm_gain(config: ModelConfig, layer_idx: int) -> float:
    """Initial gain g_l of layer ``layer_idx``'s per-head RMSNorm weight.

    A number: that gain (the paper's is 1). ``"matched"``: the gain at which the normed head output
    starts as loud as the baseline's attention output, g_l = r / s_l, where

    - s_l is what the norm's output is multiplied by: (1 − λ_init(l)) with ``head_norm_lambda_scale``
      on DIFF V1, else 1;
    - r is the expected RMS of the baseline's attention output at init. Derivation: the block's
      pre-norm hands attention inputs x of unit RMS, so an entry of v = W_v x (fan_in D, independent
      weights of std σ_w) has std σ_v = σ_w·√D: hf init_std·√D, official (U(±1/√D), σ_w = 1/√(3D))
      1/√3. At init the scores are near 0, so attention is about uniform over the causal prefix:
      o_i = (1/i) Σ_{j ≤ i} v_j, and with independent values (random tokens) E[o_i²] = σ_v² / i.
      Averaged over positions i = 1..N (N = max_seq_len): σ_v² H_N / N, H_N the N-th harmonic number,
      so r = σ_v · sqrt(H_N / N). The RMSNorm output has unit RMS, times g_l · s_l = r.

    Measured on ``tiny`` (seq 256, random tokens; tests/test_variants.py): the baseline's first layer
    is within 10% of r; deeper layers are louder (hf up to 2.4x, official up to 4.7x in layer 4),
    because the residual stream carries earlier layers' prefix averages and the values of nearby
    positions correlate, which the independence above ignores. r is one number for every layer.
    """
    if config.head_norm_init != "matched":
        return float(config.head_norm_init)
    kind, value = {**COMMON_INIT, **INIT_SCHEMES[config.init]}["linear"](config, (0, config.dim))  # v_proj
    sigma_w = value if kind == "normal" else value / math.sqrt(3)
    sigma_v = sigma_w * math.sqrt(config.dim)
    n = config.max_seq_len
    harmonic = math.fsum(1.0 / i for i in range(1, n + 1))
    return sigma_v * math.sqrt(harmonic / n) / config.layer_head_norm_scale(layer_idx)


# Blocks and LM ---------------------------------------------------------------------------------
class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = ATTENTION_CLASSES[config.attention](config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, cache: KVCache | StaticSlots | None = None,
                alibi: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, alibi)
        return x + self.mlp(self.post_attention_layernorm(x))


class DiffTransformerLM(nn.Module):
    """Decoder-only LM. ``model(input_ids)`` returns logits (B, N, vocab_size).

    Weights are initialised deterministically from ``seed`` by the scheme ``config.init`` (the table
    INIT_SCHEMES), each parameter from its own generator keyed by (seed, name), so a DIFF model and its
    matched baseline built with one seed start from the same values in every parameter they share
    (embeddings, projections, MLPs, norms).
    """

    def __init__(self, config: ModelConfig, *, seed: int = 0):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.init_weights(seed)

    # Initialisation ------------------------------------------------------------------------
    def init_rule(self, name: str, shape: tuple[int, ...]) -> InitRule:
        """How parameter ``name`` of ``shape`` is initialised under ``config.init`` (see INIT_SCHEMES)."""
        parts = name.split(".")
        key = parts[-2] if parts[-1] == "weight" and len(parts) > 1 else parts[-1]
        if key not in PARAM_ROLES:
            raise KeyError(f"parameter {name!r} has no initialisation rule: add its role to PARAM_ROLES")
        role = PARAM_ROLES[key]
        if role == "head_norm":
            return ("const", head_norm_gain(self.config, int(parts[1])))  # layers.{l}.self_attn.head_norm.weight
        return {**COMMON_INIT, **INIT_SCHEMES[self.config.init]}[role](self.config, shape)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        for name, p in self.named_parameters():  # tied weights appear once, as embed_tokens
            if p.is_meta:
                continue
            kind, value = self.init_rule(name, tuple(p.shape))
            if kind == "const":
                p.fill_(value)
                continue
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            if kind == "normal":
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * value)
            else:  # uniform
                p.copy_((torch.rand(p.shape, generator=gen, dtype=torch.float32) * 2 - 1) * value)

    # Forward -------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, cache: KVCache | None = None, positions: Tensor | None = None) -> Tensor:
        """input_ids (B, N) int64 -> logits (B, N, vocab) in the activations' dtype.

        ``positions`` (N,) int64 on the device, with a ``cache``: the static path of the compiled decode
        step (generation.py). The new keys go to those slots, attention reads all ``cache.max_len``
        slots with the later ones masked, and ``cache.length`` is not advanced: no shape and no Python
        value depends on the position. Without it, the cache grows by N from ``cache.length``.
        """
        n = input_ids.shape[1]
        cfg = self.config
        rope = alibi = None
        heads = ATTENTION_CLASSES[cfg.attention].out_heads(cfg)
        if positions is not None:
            if cache is None:
                raise ValueError("positions= needs a cache (model.new_cache)")
            k_pos = torch.arange(cache.max_len, device=input_ids.device)
            dist = positions[:, None] - k_pos[None, :]  # (N, T): query position − key slot
            hidden = torch.where(dist >= 0, 0.0, float("-inf"))  # (N, T): unwritten and future slots
            if cfg.pos_encoding == "alibi":
                slopes = torch.tensor(alibi_slopes(heads), dtype=torch.float32, device=input_ids.device)
                alibi = -slopes[:, None, None] * dist.float()[None] + hidden  # (H_out, N, T), as alibi_bias
            else:
                alibi = hidden[None]  # (1, N, T)
            cache = cache.at(positions)
        else:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + n, device=input_ids.device)
            if cfg.pos_encoding == "alibi":
                slopes = torch.tensor(alibi_slopes(heads), dtype=torch.float32, device=input_ids.device)
                alibi = alibi_bias(slopes, n, start + n)  # (H_out, N, M)
        if cfg.pos_encoding == "rope":
            rope = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        x = self.embed_tokens(input_ids)  # (B, N, D)
        for layer in self.layers:
            x = layer(x, rope, cache, alibi)
        if isinstance(cache, KVCache):
            cache.advance(n)
        return self.lm_head(self.norm(x))

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for ``batch`` rows of up to ``max_len`` positions, on the weights' device.

        ``dtype`` defaults to that of the keys and values the forward will make: the autocast dtype when
        autocast is on for the weights' device (so build the cache inside the autocast region that runs
        the model), else the weights' dtype.
        """
        p = self.embed_tokens.weight
        return KVCache(self.config, batch, max_len, dtype or activation_dtype(p), p.device)

    # Introspection -------------------------------------------------------------------------
    def lambdas(self) -> list[float] | None:
        """Each layer's λ (DIFF V1, also when fixed or zero), or None for models without a scalar λ."""
        if self.config.attention != "diff":
            return None
        with torch.no_grad():  # one host transfer for all layers
            return torch.stack([layer.self_attn.lambda_full() for layer in self.layers]).tolist()

    def num_parameters(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    # Generation ----------------------------------------------------------------------------
    def stream(self, input_ids: Tensor, max_new_tokens: int, **sampling) -> Iterator[Tensor]:
        """Yield (B,) next tokens one at a time (see :func:`generation.stream`)."""
        from .generation import stream

        yield from stream(self, input_ids, max_new_tokens, **sampling)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        compile: bool = False,
    ) -> Tensor:
        """(B, N) prompt -> (B, N + new) tokens, decoding with the KV cache. temperature 0 is greedy.

        ``compile=True`` decodes with the compiled static-cache step (generation.py): the same tokens,
        faster per token once compiled (CUDA graphs on CUDA); the first call pays the compilation."""
        new = list(self.stream(input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               eos_token_id=eos_token_id, generator=generator, compile=compile))
        return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1) if new else input_ids

    # Serialisation (this project's own format: config.json + model.safetensors) ------------
    def save_pretrained(self, directory) -> None:
        from .serialization import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, *, device: str | torch.device = "cpu") -> "DiffTransformerLM":
        from .serialization import from_pretrained

        return from_pretrained(directory, device=device)


def parameter_report(config: ModelConfig) -> ParameterReport:
    """Parameter counts of ``config``'s matched DIFF and baseline models (built on the meta device)."""
    diff_cfg, base_cfg = matched_pair(config)
    with torch.device("meta"):
        diff, base = DiffTransformerLM(diff_cfg), DiffTransformerLM(base_cfg)
    return ParameterReport(diff.num_parameters(), base.num_parameters(),
                           diff.num_parameters(True), base.num_parameters(True))
