"""The public differential attention op and its backend choice.

``differential_attention(q1, q2, k1, k2, v, lam)`` has one signature for every backend:

- ``reference``: eager fp32 (see reference.py); the oracle, slow, O(N²) memory.
- ``sdpa``: PyTorch's fused attention, two or four calls (see sdpa.py).
- ``triton``: the fused single-pass kernel (see triton/), CUDA only.
- ``auto``: ``triton`` on CUDA when it is installed, supports the inputs and was measured faster
  there (the table read by auto_table.py), else ``sdpa``.

An optional additive ``bias`` on the scaled scores (ALiBi), broadcastable to (B, H, N, M), is taken
by ``reference`` and ``sdpa``; the Triton kernel has none, so ``auto`` uses SDPA when one is given.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from . import reference, sdpa
from .probe import probed

Backend = Literal["auto", "reference", "sdpa", "triton"]
BACKENDS = ("auto", "reference", "sdpa", "triton")


_TRITON_UNSET = object()
_triton = _TRITON_UNSET  # the Triton backend module once looked up; None when unavailable


def _triton_module():
    """The Triton backend module, or None when Triton (or the kernel package) is unavailable.

    Imported on first use (Triton is optional and slow to import); a plain global rather than
    functools.cache, which torch.compile would trace through with a warning.
    """
    global _triton
    if _triton is _TRITON_UNSET:
        try:
            from . import triton as triton_backend  # noqa: PLC0415 - optional dependency
        except ImportError:
            triton_backend = None
        _triton = triton_backend
    return _triton


def triton_available() -> bool:
    return _triton_module() is not None


def check_bias(bias: Tensor | None, b: int, h: int, n: int, m: int) -> None:
    """``bias`` must broadcast to (B, H, N, M) without changing that shape."""
    if bias is None:
        return
    shape = tuple(bias.shape)
    full = (b, h, n, m)[-len(shape):] if 2 <= len(shape) <= 4 else None
    if full is None or shape[-2:] != (n, m) or any(s not in (1, f) for s, f in zip(shape, full)):
        raise ValueError(f"bias must broadcast to (B, H, N, M) = {(b, h, n, m)}; got {shape}")
    if bias.is_complex() or not bias.is_floating_point():
        raise ValueError(f"bias must be a float tensor (an additive score term); got {bias.dtype}")


def _check_inputs(q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, v: Tensor, lam: Tensor) -> None:
    if q1.dim() != 4 or q1.shape != q2.shape:
        raise ValueError(f"q1 and q2 must both be (B, H, N, d); got {tuple(q1.shape)} and {tuple(q2.shape)}")
    b, h, n, d = q1.shape
    for name, k in (("k1", k1), ("k2", k2)):
        if k.dim() != 4 or k.shape[0] != b or k.shape[-1] != d:
            raise ValueError(f"{name} must be (B={b}, H_kv, M, d={d}); got {tuple(k.shape)}")
    if k1.shape != k2.shape:
        raise ValueError(f"k1 and k2 must have one shape; got {tuple(k1.shape)} and {tuple(k2.shape)}")
    h_kv, m = k1.shape[1], k1.shape[2]
    if h % h_kv:
        raise ValueError(f"query heads H={h} must be a multiple of kv heads H_kv={h_kv}")
    if v.dim() != 4 or v.shape[:3] != (b, h_kv, m):
        raise ValueError(f"v must be (B={b}, H_kv={h_kv}, M={m}, dv); got {tuple(v.shape)}")
    if lam.dim() not in (0, 3) or (lam.dim() == 3 and lam.shape != (b, h, n)):
        raise ValueError(f"lam must be 0-d (V1) or (B, H, N) = {(b, h, n)} (V2); got {tuple(lam.shape)}")
    dtypes = {t.dtype for t in (q1, q2, k1, k2, v)}
    if len(dtypes) != 1:
        raise ValueError(f"q, k and v must share one dtype; got {sorted(map(str, dtypes))}")
    devices = {t.device for t in (q1, q2, k1, k2, v, lam)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device; got {sorted(map(str, devices))}")


def resolve_backend(backend: str, q1: Tensor, k1: Tensor, k2: Tensor, v: Tensor, bias: Tensor | None = None) -> str:
    """The concrete backend ``backend`` means for these inputs."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "auto":
        mod = _triton_module()
        if bias is None and q1.is_cuda and mod is not None and mod.supports(q1, k1, k2, v):
            return "triton"
        return "sdpa"
    if backend == "triton" and bias is not None:
        raise ValueError("backend='triton' takes no score bias (ALiBi); use backend='sdpa' or 'auto'")
    if backend == "triton" and _triton_module() is None:
        raise RuntimeError("backend='triton' needs the triton package and a CUDA device; use backend='sdpa'")
    return backend


@probed("differential")  # an active attention probe (probe.py) takes the call; else one global check
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
    backend: Backend = "auto",
    bias: Tensor | None = None,
) -> Tensor:
    """softmax(s·q1k1ᵀ + bias)·v − λ·softmax(s·q2k2ᵀ + bias)·v, per differential head.

    Args:
        q1, q2: (B, H, N, d) queries of the two branches.
        k1, k2: (B, H_kv, M, d) keys; head ``i`` uses kv head ``i // (H / H_kv)`` in both branches.
            DIFF V2 passes the same tensor twice (``k1 is k2``).
        v: (B, H_kv, M, dv) values (dv = 2d for V1, d for V2).
        lam: 0-d λ (V1) or (B, H, N) per-token λ (V2); fp32 is recommended.
        causal: mask future keys; when N < M the queries are the last N positions.
        scale: score scale, default 1/sqrt(d).
        backend: "auto", "reference", "sdpa" or "triton".
        bias: optional float term added to both branches' scaled scores, broadcastable to
            (B, H, N, M) (ALiBi). Not taken by "triton"; "auto" then uses "sdpa".

    Returns:
        (B, H, N, dv) in the dtype of ``v``. No normalisation is applied here.
    """
    _check_inputs(q1, q2, k1, k2, v, lam)
    check_bias(bias, q1.shape[0], q1.shape[1], q1.shape[2], k1.shape[2])
    which = resolve_backend(backend, q1, k1, k2, v, bias)
    if which == "reference":
        return reference.differential_attention(q1, q2, k1, k2, v, lam, causal=causal, scale=scale, bias=bias)
    if which == "sdpa":
        return sdpa.differential_attention(q1, q2, k1, k2, v, lam, causal=causal, scale=scale, bias=bias)
    return _triton_module().differential_attention(q1, q2, k1, k2, v, lam, causal=causal, scale=scale)


@probed("softmax")
def softmax_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None, backend: Backend = "auto",
    bias: Tensor | None = None,
) -> Tensor:
    """The baseline's attention with the same conventions: q (B, H, N, d), k/v (B, H_kv, M, ·);
    ``bias`` as in :func:`differential_attention`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {list(BACKENDS)}")
    check_bias(bias, q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if backend == "reference":
        return reference.attention(q, k, v, causal=causal, scale=scale, bias=bias)
    return sdpa.attention(q, k, v, causal=causal, scale=scale, bias=bias)  # SDPA picks cuDNN/flash itself
