"""Host side of the fused kernels: checks, launch configurations, and the ``torch.library`` ops.

Layers (as in Triton's fused-attention tutorial): kernels.py holds the ``@triton.jit`` code;
``forward``/``backward`` here check inputs, pick block shapes and launch; the custom ops
``diff_transformer::diff_attn_fwd`` / ``diff_attn_bwd`` wrap them with fake (meta) implementations
and autograd, so ``torch.compile`` traces through without graph breaks; ``differential_attention``
is the function the public op calls.

Limits: q/k head dim d a power of two in [16, 128]; value width d or 2d; fp16, bf16, or fp32 (fp32
products run as TF32 on GPUs); causal needs N ≤ M. Anything else raises ValueError; ``supports``
tells the ``auto`` backend whether to choose this one (only where the table in attention/auto_table.py
holds it faster than SDPA).

Memory: when a backward will follow, the forward also keeps branch 2's output O2 (one more tensor of
O's size) so the backward's E1/E2 are row dot products rather than another pass over the keys.
Launch shapes were tuned on an H200 for d = 128 (benchmarks/NOTES.md); other GPUs get the same ones.
"""

import contextlib
import dataclasses
import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import auto_table
from . import kernels

_LOG2E = 1.4426950408889634
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@dataclasses.dataclass(frozen=True)
class FwdConfig:
    """Launch shape of the forward kernel."""

    block_m: int  # query rows per program
    block_n: int  # keys per inner step
    block_dv: int | None  # value columns per program; None = the whole value width (no split)
    num_warps: int  # warps per program (4 = one Hopper warp group)
    num_stages: int  # software-pipelining depth of the key loop


@dataclasses.dataclass(frozen=True)
class BwdConfig:
    """Launch shapes of the three backward kernels."""

    pre: tuple[int, int]  # E1/E2 kernel (row dot products): (block_m, num_warps)
    dkdv: tuple[int, int, int, int]  # dK/dV kernel: (block_m queries per step, block_n keys per program, warps, stages)
    dq: tuple[int, int, int, int]  # dQ kernel: (block_m, block_n, warps, stages); unused when atomic_dq
    atomic_dq: bool  # add dQ from the dK/dV kernel with fp32 atomics instead of a second pass over the keys
    dv_pass: tuple[int, int, int, int] | None = None  # dV in its own launch with this shape; None = with dK


def fwd_config(d: int, dv: int, dtype: torch.dtype, device: torch.device) -> FwdConfig:
    """The forward's block shapes for these widths (measured on an H200, see benchmarks/NOTES.md)."""
    if device.type != "cuda":  # Triton's CPU interpreter: small blocks so short tests cross many blocks
        return FwdConfig(16, 16, None, 1, 1)
    if dtype == torch.float32:
        return FwdConfig(32, 32, None, 4, 2)
    if dv > 128:  # two fp32 accumulators of width 2d do not fit: split the value width in two programs
        return FwdConfig(128, 64, dv // 2, 8, 3)
    return FwdConfig(128, 64, None, 8, 3)


def bwd_config(d: int, dv: int, dtype: torch.dtype, device: torch.device) -> BwdConfig:
    """The backward's block shapes for these widths (measured on an H200, see benchmarks/NOTES.md)."""
    if device.type != "cuda":
        return BwdConfig((16, 1), (16, 16, 1, 1), (16, 16, 1, 1), atomic_dq=False)
    if dtype == torch.float32:
        return BwdConfig((32, 4), (32, 32, 4, 1), (32, 32, 4, 1), atomic_dq=False)
    if dv > 128:  # dK1/dK2 and the 2d-wide dV in separate launches: half the accumulators each
        return BwdConfig((16, 4), (32, 128, 8, 2), (128, 32, 8, 3), atomic_dq=False, dv_pass=(32, 64, 4, 2))
    return BwdConfig((16, 4), (32, 128, 8, 2), (128, 32, 8, 3), atomic_dq=False)


def new_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every output buffer the kernels write in full (tests replace this to poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


# Checks ----------------------------------------------------------------------------------------
def unsupported_reason(q1: Tensor, k1: Tensor, k2: Tensor | None, v: Tensor) -> str | None:
    """Why the fused kernel cannot take these inputs, or None when it can."""
    d, dv = q1.shape[-1], v.shape[-1]
    if q1.dtype not in _TL_DTYPES:
        return f"dtype {q1.dtype} (the kernel takes float16, bfloat16 or float32)"
    if d < 16 or d > 128 or d & (d - 1):
        return f"q/k head dim {d} (the kernel takes a power of two in [16, 128])"
    if dv not in (d, 2 * d):
        return f"value width {dv} (the kernel takes d={d} or 2d={2 * d})"
    if q1.device.type != "cuda" and not _interpreting():
        return f"device {q1.device} (the kernel runs on CUDA, or on the CPU under TRITON_INTERPRET=1)"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(q1: Tensor, k1: Tensor, k2: Tensor, v: Tensor) -> bool:
    """Whether ``auto`` should take this backend: CUDA half-precision inputs the kernel covers, at
    shapes where the auto table (attention/auto_table.json) holds it faster than SDPA."""
    if not q1.is_cuda or q1.dtype not in (torch.float16, torch.bfloat16):
        return False
    return unsupported_reason(q1, k1, k2, v) is None and auto_table.choose_for(q1, k1, k2, v) == "triton"


def _check(q1: Tensor, k1: Tensor, k2: Tensor | None, v: Tensor, causal: bool) -> None:
    reason = unsupported_reason(q1, k1, k2, v)
    if reason is not None:
        raise ValueError(f"backend='triton' does not support {reason}; use backend='sdpa'")
    if causal and q1.shape[-2] > k1.shape[-2]:
        raise ValueError(f"causal attention needs N <= M queries; got N={q1.shape[-2]} > M={k1.shape[-2]}")


def _rows(t: Tensor) -> Tensor:
    """Unit stride along the last dim, which every kernel load assumes."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides3(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _lam_strides(lam: Tensor) -> tuple[int, int, int]:
    return _strides3(lam) if lam.dim() == 3 else (0, 0, 0)


def _dot_dtype(dtype: torch.dtype, device: torch.device):
    # Triton's CPU interpreter has no bf16 arithmetic: its products run on fp32 copies instead.
    if dtype == torch.bfloat16 and device.type != "cuda":
        return tl.float32
    return _TL_DTYPES[dtype]


def _on_device(device: torch.device):
    """Launch on the inputs' GPU, whatever the current device is."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# Launchers -------------------------------------------------------------------------------------
def forward(q1, q2, k1, k2, v, lam, *, causal: bool, scale: float, save_o2: bool = True,
            config: FwdConfig | None = None):
    """(O (B, H, N, dv) in v's dtype, LSE1, LSE2 (B, H, N) fp32 base-2, O2 = P2 V like O or None).

    ``k2=None``: k2 is k1. ``save_o2``: also write branch 2's output, which the backward needs.
    """
    _check(q1, k1, k2, v, causal)
    q1, q2, k1, v = _rows(q1), _rows(q2), _rows(k1), _rows(v)
    shared = k2 is None
    k2 = k1 if shared else _rows(k2)
    b, h, n, d = q1.shape
    h_kv, m, dv = k1.shape[1], k1.shape[2], v.shape[-1]
    cfg = config or fwd_config(d, dv, q1.dtype, q1.device)
    block_dv = cfg.block_dv or dv
    if dv % block_dv:
        raise ValueError(f"block_dv={block_dv} must divide the value width {dv}")
    o = new_buffer((b, h, n, dv), v.dtype, q1.device)
    o2 = new_buffer((b, h, n, dv), v.dtype, q1.device) if save_o2 else None
    lse1 = new_buffer((b, h, n), torch.float32, q1.device)
    lse2 = new_buffer((b, h, n), torch.float32, q1.device)
    grid = (b * h, triton.cdiv(n, cfg.block_m), dv // block_dv)
    with _on_device(q1.device):
        kernels._fwd_kernel[grid](
            q1, q2, k1, k2, v, lam, o, o if o2 is None else o2, lse1, lse2,
            *_strides3(q1), *_strides3(q2), *_strides3(k1), *_strides3(k2), *_strides3(v), *_strides3(o),
            *_lam_strides(lam),
            h, h // h_kv, n, m, scale * _LOG2E,
            D=d, BLOCK_DV=block_dv, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal,
            LAM_ROWS=lam.dim() == 3, SHARED_K=shared, STORE_O2=o2 is not None,
            DOT_DTYPE=_dot_dtype(q1.dtype, q1.device), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return o, lse1, lse2, o2


def backward(do, q1, q2, k1, k2, v, lam, o, o2, lse1, lse2, *, causal: bool, scale: float,
             config: BwdConfig | None = None) -> list[Tensor]:
    """[dq1, dq2, dk1, dk2, dv, dlam] from ``forward``'s outputs (O2 saved), without dk2 when ``k2 is None``
    (dk1 is then k1's whole gradient).

    dlam has lam's shape: 0-d (summed on the device, no host sync) or (B, H, N).
    """
    q1, q2, k1, v, do = _rows(q1), _rows(q2), _rows(k1), _rows(v), _rows(do)
    if o.stride() != o2.stride():
        raise ValueError("O and O2 must share strides (both come from forward)")
    shared = k2 is None
    k2 = k1 if shared else _rows(k2)
    b, h, n, d = q1.shape
    h_kv, m, dv = k1.shape[1], k1.shape[2], v.shape[-1]
    cfg = config or bwd_config(d, dv, q1.dtype, q1.device)
    dev, dot_dtype, lam_rows = q1.device, _dot_dtype(q1.dtype, q1.device), lam.dim() == 3
    qk_scale = scale * _LOG2E
    e1 = new_buffer((b, h, n), torch.float32, dev)
    e2 = new_buffer((b, h, n), torch.float32, dev)
    dk1 = new_buffer((b, h_kv, m, d), k1.dtype, dev)
    dk2 = dk1 if shared else new_buffer((b, h_kv, m, d), k2.dtype, dev)
    dvt = new_buffer((b, h_kv, m, dv), v.dtype, dev)
    if cfg.atomic_dq:
        dq1 = torch.zeros((b, h, n, d), dtype=torch.float32, device=dev)  # (B, H, N, d) atomics target
        dq2 = torch.zeros((b, h, n, d), dtype=torch.float32, device=dev)
    else:
        dq1 = new_buffer((b, h, n, d), q1.dtype, dev)
        dq2 = new_buffer((b, h, n, d), q2.dtype, dev)
    common = (*_strides3(q1), *_strides3(q2), *_strides3(k1), *_strides3(k2), *_strides3(v), *_strides3(do),
              *_lam_strides(lam), h, h // h_kv, n, m, qk_scale, scale)
    with _on_device(dev):
        pm, pw = cfg.pre
        kernels._bwd_pre_kernel[(b * h, triton.cdiv(n, pm))](
            o, o2, do, lam, e1, e2, *_strides3(o), *_strides3(do), *_lam_strides(lam), h, n,
            DV=dv, BLOCK_M=pm, LAM_ROWS=lam_rows, num_warps=pw, num_stages=1,
        )
        if cfg.dv_pass is None:
            passes = [(cfg.dkdv, True, True)]
        else:
            passes = [(cfg.dkdv, True, False), (cfg.dv_pass, False, True)]
        for (km, kn, kw, ks), do_dk, do_dv in passes:
            kernels._bwd_dkdv_kernel[(b * h_kv, triton.cdiv(m, kn))](
                q1, q2, k1, k2, v, lam, do, lse1, lse2, e1, e2, dq1, dq2, dk1, dk2, dvt, *common,
                D=d, DV_=dv, BLOCK_M=km, BLOCK_N=kn, CAUSAL=causal, LAM_ROWS=lam_rows, SHARED_K=shared,
                ATOMIC_DQ=cfg.atomic_dq and do_dk, DO_DK=do_dk, DO_DV=do_dv, DOT_DTYPE=dot_dtype,
                num_warps=kw, num_stages=ks,
            )
        if not cfg.atomic_dq:
            qm, qn, qw, qs = cfg.dq
            kernels._bwd_dq_kernel[(b * h, triton.cdiv(n, qm))](
                q1, q2, k1, k2, v, lam, do, lse1, lse2, e1, e2, dq1, dq2, *common,
                D=d, DV_=dv, BLOCK_M=qm, BLOCK_N=qn, CAUSAL=causal, LAM_ROWS=lam_rows, SHARED_K=shared,
                DOT_DTYPE=dot_dtype, num_warps=qw, num_stages=qs,
            )
    if cfg.atomic_dq:
        dq1, dq2 = dq1.to(q1.dtype), dq2.to(q2.dtype)
    dlam = -(e2.sum() if lam.dim() == 0 else e2)  # dλ = −dO·O2
    grads = [dq1, dq2, dk1, dvt, dlam.to(lam.dtype)] if shared else [dq1, dq2, dk1, dk2, dvt, dlam.to(lam.dtype)]
    return grads


# torch.library ops -----------------------------------------------------------------------------
@torch.library.custom_op(
    "diff_transformer::diff_attn_fwd", mutates_args=(),
    schema="(Tensor q1, Tensor q2, Tensor k1, Tensor? k2, Tensor v, Tensor lam, bool causal, float scale,"
           " bool save_o2) -> (Tensor, Tensor, Tensor, Tensor)",
)
def _fwd_op(q1, q2, k1, k2, v, lam, causal, scale, save_o2):
    o, lse1, lse2, o2 = forward(q1, q2, k1, k2, v, lam, causal=causal, scale=scale, save_o2=save_o2)
    return o, lse1, lse2, o.new_empty(0) if o2 is None else o2  # (0,) when no backward will follow


@_fwd_op.register_fake
def _fwd_fake(q1, q2, k1, k2, v, lam, causal, scale, save_o2):
    b, h, n, _ = q1.shape
    o = q1.new_empty((b, h, n, v.shape[-1]), dtype=v.dtype)
    return (o, q1.new_empty((b, h, n), dtype=torch.float32), q1.new_empty((b, h, n), dtype=torch.float32),
            torch.empty_like(o) if save_o2 else o.new_empty(0))


@torch.library.custom_op(
    "diff_transformer::diff_attn_bwd", mutates_args=(),
    schema="(Tensor do, Tensor q1, Tensor q2, Tensor k1, Tensor? k2, Tensor v, Tensor lam, Tensor o,"
           " Tensor o2, Tensor lse1, Tensor lse2, bool causal, float scale) -> Tensor[]",
)
def _bwd_op(do, q1, q2, k1, k2, v, lam, o, o2, lse1, lse2, causal, scale):
    return backward(do, q1, q2, k1, k2, v, lam, o, o2, lse1, lse2, causal=causal, scale=scale)


@_bwd_op.register_fake
def _bwd_fake(do, q1, q2, k1, k2, v, lam, o, o2, lse1, lse2, causal, scale):
    grads = [torch.empty_like(q1, memory_format=torch.contiguous_format),
             torch.empty_like(q2, memory_format=torch.contiguous_format),
             torch.empty_like(k1, memory_format=torch.contiguous_format)]
    if k2 is not None:
        grads.append(torch.empty_like(k2, memory_format=torch.contiguous_format))
    return grads + [torch.empty_like(v, memory_format=torch.contiguous_format), torch.empty_like(lam)]


def _setup_context(ctx, inputs, output):
    q1, q2, k1, k2, v, lam, causal, scale, save_o2 = inputs
    o, lse1, lse2, o2 = output
    ctx.save_for_backward(q1, q2, k1, k2, v, lam, o, o2, lse1, lse2)
    ctx.causal, ctx.scale, ctx.shared, ctx.save_o2 = causal, scale, k2 is None, save_o2


def _backward(ctx, do, _dlse1, _dlse2, _do2):
    if not ctx.save_o2:
        raise RuntimeError("differential attention ran without O2 (no input needed a gradient then); "
                           "run the forward with gradients enabled to call backward")
    q1, q2, k1, k2, v, lam, o, o2, lse1, lse2 = ctx.saved_tensors
    grads = _bwd_op(do, q1, q2, k1, k2, v, lam, o, o2, lse1, lse2, ctx.causal, ctx.scale)
    if ctx.shared:
        dq1, dq2, dk1, dv, dlam = grads
        dk2 = None
    else:
        dq1, dq2, dk1, dk2, dv, dlam = grads
    return dq1, dq2, dk1, dk2, dv, dlam, None, None, None


torch.library.register_autograd("diff_transformer::diff_attn_fwd", _backward, setup_context=_setup_context)


def differential_attention(q1, q2, k1, k2, v, lam, *, causal: bool = True, scale: float | None = None) -> Tensor:
    """The fused kernel behind ``differential_attention(..., backend="triton")`` (same shapes, see ops.py).

    ``k1 is k2`` (DIFF V2) takes the shared-key path: one key load for both branches, one dK.
    """
    scale = 1.0 / math.sqrt(q1.shape[-1]) if scale is None else float(scale)
    shared = k1 is k2  # the op's forward checks the inputs
    save_o2 = torch.is_grad_enabled() and any(t.requires_grad for t in (q1, q2, k1, k2, v, lam))
    return torch.ops.diff_transformer.diff_attn_fwd(q1, q2, k1, None if shared else k2, v, lam, causal, scale,
                                                    save_o2)[0]
