"""The decoder: LLaMA-style blocks whose attention is DIFF V1, DIFF V2 or the softmax baseline.

Single-device code. It knows nothing of training, checkpoints or parallelism.

Parameter names follow Hugging Face's Llama/DiffLlama (``embed_tokens``, ``layers.{i}.self_attn.q_proj``,
``mlp.gate_proj``, ``input_layernorm`` ...), so the interop adapter only permutes rows.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .attention import differential_attention, softmax_attention
from .config import ModelConfig, ParameterReport, matched_pair


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and returned in the input dtype (as HF's LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


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


# KV cache --------------------------------------------------------------------------------------
class KVCache:
    """Preallocated post-RoPE keys and values of every layer, for incremental decoding.

    Keys are (B, H_k, T, d) and values (B, H_v, T, dv) with H_k·d = H_v·dv = n_kv_heads·d for every
    attention kind: a DIFF model's cache is exactly the size of its baseline's.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        q_heads, k_heads, v_heads, v_dim = Attention.layout(config)
        d = config.head_dim
        self.max_len = max_len
        self.length = 0
        self.k = [torch.empty(batch, k_heads, max_len, d, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.empty(batch, v_heads, max_len, v_dim, dtype=dtype, device=device) for _ in range(config.n_layers)]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k``, ``v`` of the new positions; return every position's so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested. Allocate a longer cache.")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


# Attention -------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Baseline softmax attention. The DIFF variants change only ``layout`` and ``attend``."""

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
        self.head_norm_scale = 1.0

    @staticmethod
    def layout(config: ModelConfig) -> tuple[int, int, int, int]:
        """(query heads, key heads, value heads, value width) of the projections, all of width d."""
        h, h_kv, d = config.n_heads, config.n_kv_heads, config.head_dim
        if config.attention == "diff":
            return h, h_kv, h_kv // 2, 2 * d  # q/k as sub-heads, pairs (2i, 2i+1); values 2d wide
        if config.attention == "diff_v2":
            return 2 * h, h_kv, h_kv, d
        return h, h_kv, h_kv, d

    @staticmethod
    def out_heads(config: ModelConfig) -> int:
        return config.n_heads // 2 if config.attention == "diff" else config.n_heads

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache | None = None) -> Tensor:
        """x (B, N, D), rope = (cos, sin) each (N, d) for the new positions -> (B, N, D)."""
        b, n, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(b, n, self.q_heads, d).transpose(1, 2)  # (B, Hq, N, d)
        k = self.k_proj(x).view(b, n, self.k_heads, d).transpose(1, 2)  # (B, Hk, N, d)
        v = self.v_proj(x).view(b, n, self.v_heads, self.v_dim).transpose(1, 2)  # (B, Hv, N, dv)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hk, M, d), (B, Hv, M, dv)
        o = self.attend(x, q, k, v)  # (B, H_out, N, d_out)
        if self.head_norm is not None:
            o = self.head_norm(o) * self.head_norm_scale
        return self.o_proj(o.transpose(1, 2).reshape(b, n, -1))  # (B, N, D)

    def attend(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return softmax_attention(q, k, v, causal=True, backend=self.backend)


class DiffAttention(Attention):
    """DIFF V1: (softmax(Q1K1ᵀ) − λ softmax(Q2K2ᵀ)) V, then a per-head RMSNorm times (1 − λ_init)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        d = config.head_dim
        self.lambda_init = config.layer_lambda_init(layer_idx)
        self.lambda_q1 = nn.Parameter(torch.zeros(d))
        self.lambda_k1 = nn.Parameter(torch.zeros(d))
        self.lambda_q2 = nn.Parameter(torch.zeros(d))
        self.lambda_k2 = nn.Parameter(torch.zeros(d))
        self.head_norm_scale = 1.0 - self.lambda_init

    @staticmethod
    def combine_lambda(q1: Tensor, k1: Tensor, q2: Tensor, k2: Tensor, lambda_init: float) -> Tensor:
        """λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init from the four (d,) vectors, a 0-d fp32 tensor."""
        l1 = torch.exp(torch.dot(q1.float(), k1.float()))
        l2 = torch.exp(torch.dot(q2.float(), k2.float()))
        return l1 - l2 + lambda_init

    def lambda_full(self) -> Tensor:
        return self.combine_lambda(self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2, self.lambda_init)

    def attend(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # Sub-heads 2i and 2i+1 are branches 1 and 2 of differential head i; kv sub-heads likewise.
        q1, q2 = q[:, 0::2], q[:, 1::2]  # (B, H, N, d) each
        k1, k2 = k[:, 0::2], k[:, 1::2]  # (B, H_kv, M, d) each
        return differential_attention(q1, q2, k1, k2, v, self.lambda_full(), causal=True, backend=self.backend)


class DiffAttentionV2(Attention):
    """DIFF V2: 2h query heads over the baseline's kv heads; O_i = A_2i V − sigmoid(λ_i(x)) A_2i+1 V."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.lambda_proj = nn.Linear(config.dim, config.n_heads, bias=False)

    def attend(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        lam = torch.sigmoid(self.lambda_proj(x).float()).transpose(1, 2)  # (B, h, N) fp32
        return differential_attention(q[:, 0::2], q[:, 1::2], k, k, v, lam, causal=True, backend=self.backend)


ATTENTION_CLASSES: dict[str, type[Attention]] = {
    "baseline": Attention,
    "diff": DiffAttention,
    "diff_v2": DiffAttentionV2,
}


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

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DiffTransformerLM(nn.Module):
    """Decoder-only LM. ``model(input_ids)`` returns logits (B, N, vocab_size).

    Weights are initialised deterministically from ``seed``, each parameter from its own generator
    keyed by its name, so a DIFF model and its matched baseline built with one seed start from the
    same values in every parameter they share (embeddings, projections, MLPs, norms).
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
    def init_std(self, name: str) -> float | None:
        """The normal-init std of parameter ``name``; None for parameters initialised to ones."""
        cfg = self.config
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            return None
        if ".lambda_q" in name or ".lambda_k" in name:
            return cfg.lambda_std
        if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
            return cfg.init_std / math.sqrt(2 * cfg.n_layers)  # residual branches (GPT-2 scaling)
        return cfg.init_std

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        for name, p in self.named_parameters():  # tied weights appear once, as embed_tokens
            if p.is_meta:
                continue
            std = self.init_std(name)
            if std is None:
                p.fill_(1.0)
                continue
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)

    # Forward -------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, cache: KVCache | None = None) -> Tensor:
        """input_ids (B, N) int64 -> logits (B, N, vocab) in the activations' dtype."""
        n = input_ids.shape[1]
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + n, device=input_ids.device)
        rope = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        x = self.embed_tokens(input_ids)  # (B, N, D)
        for layer in self.layers:
            x = layer(x, rope, cache)
        if cache is not None:
            cache.advance(n)
        return self.lm_head(self.norm(x))

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache(self.config, batch, max_len, dtype or p.dtype, p.device)

    # Introspection -------------------------------------------------------------------------
    def lambdas(self) -> list[float] | None:
        """Each layer's λ (DIFF V1), or None for models without a learned scalar λ."""
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
    ) -> Tensor:
        """(B, N) prompt -> (B, N + new) tokens, decoding with the KV cache. temperature 0 is greedy."""
        new = list(self.stream(input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               eos_token_id=eos_token_id, generator=generator))
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
