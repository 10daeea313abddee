"""The fused Triton kernel against the fp32 reference: outputs and every gradient.

On a machine without a GPU the kernels run under Triton's CPU interpreter (``TRITON_INTERPRET=1``,
set here before Triton is imported, and by scripts/test.sh); with a GPU they run compiled.
Every kernel output buffer is poisoned with NaN before each run, so an element the kernel forgets to
write fails the comparison.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from diff_transformer.attention import differential_attention, resolve_backend  # noqa: E402
from diff_transformer.attention.triton import kernels, op  # noqa: E402
from diff_transformer.config import preset  # noqa: E402
from diff_transformer.model import DiffTransformerLM  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Norm-wise relative error allowed against fp32 math on the same inputs (the kernel rounds P to the
# input dtype before P·V, as flash attention does; fp32 runs as TF32 on a GPU).
REL_TOL = {torch.float16: 4e-3, torch.bfloat16: 2e-2, torch.float32: 2e-3 if DEVICE.type == "cuda" else 1e-5}
GRAD_NAMES = ["q1", "q2", "k1", "k2", "v", "lam"]


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Kernel outputs start as NaN: an unwritten element cannot pass for a right one."""
    if DEVICE.type == "cpu" and not isinstance(kernels._fwd_kernel, _interpreted_type()):
        pytest.fail("the Triton kernels were compiled for a GPU on a CPU-only machine: run with TRITON_INTERPRET=1")

    def nan_buffer(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(op, "new_buffer", nan_buffer)


def _interpreted_type():
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction


def make_inputs(b, h, h_kv, n, m, d, dv, dtype, v2=False, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return (scale * torch.randn(*shape, generator=g)).to(dtype).to(DEVICE).requires_grad_()

    q1, q2 = r(b, h, n, d), r(b, h, n, d)
    k1 = r(b, h_kv, m, d)
    k2 = k1 if v2 else r(b, h_kv, m, d)
    v = torch.randn(b, h_kv, m, dv, generator=g).to(dtype).to(DEVICE).requires_grad_()
    if v2:
        lam = torch.sigmoid(torch.randn(b, h, n, generator=g)).to(DEVICE).requires_grad_()
    else:
        lam = torch.tensor(0.63, device=DEVICE).requires_grad_()
    return q1, q2, k1, k2, v, lam


def unique(inputs):
    return list({id(t): t for t in inputs}.values())


def fp32_truth(inputs, causal, g_out):
    """The reference on the same inputs upcast to fp32: (output, gradients) for output gradient g_out."""
    up = [t.detach().float().requires_grad_() for t in inputs]
    if inputs[2] is inputs[3]:
        up[3] = up[2]
    out = differential_attention(*up, causal=causal, backend="reference")
    return out, torch.autograd.grad(out, unique(up), g_out.float()), up


def rel_err(a, b):
    """‖a − b‖ / ‖b‖, with ‖b‖ floored at 0.1·sqrt(numel) so near-zero gradients compare absolutely."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(0.1 * b.numel() ** 0.5)).item()


def lam_grad_mass(up, g_out, causal):
    """Σ |g · o2| in fp32: the scale of dλ's rounding error (dλ = −Σ g·o2 cancels heavily)."""
    q1, q2, k1, k2, v, lam = up
    o2 = differential_attention(q2, q2, k2, k2, v, torch.zeros_like(lam), causal=causal, backend="reference")
    return (g_out.float() * o2.detach()).abs().sum().item()


def check_against_reference(inputs, causal, dtype, run=None):
    """Compare the kernel's output and gradients with the fp32 reference; ``run`` replaces the public op."""
    run = run or (lambda *t: differential_attention(*t, causal=causal, backend="triton"))
    out = run(*inputs)
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    ref, ref_grads, up = fp32_truth(inputs, causal, g_out)
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite output elements"
    assert rel_err(out, ref) < REL_TOL[dtype], rel_err(out, ref)
    got = torch.autograd.grad(out, unique(inputs), g_out)
    names = [n for n in GRAD_NAMES if not (n == "k2" and inputs[2] is inputs[3])]
    for name, ga, gb in zip(names, got, ref_grads):
        assert ga.shape == gb.shape, name
        assert torch.isfinite(ga).all(), f"grad {name} has unwritten or non-finite elements"
        if name == "lam" and ga.dim() == 0:
            bound = 4 * REL_TOL[dtype] * lam_grad_mass(up, g_out, causal) + 1e-4
            assert (ga.double() - gb.double()).abs().item() <= bound, (ga, gb, bound)
        else:
            # kv heads sum the partials of every query head of their group (and of both branches).
            tol = REL_TOL[dtype] * (1.5 if name in ("k1", "k2", "v") else 1.0)
            assert rel_err(ga, gb) < tol, (name, rel_err(ga, gb))


CASES = [
    # (h, h_kv, n, m, d, variant)
    (2, 2, 1, 1, 16, "v1"),
    (2, 2, 17, 17, 16, "v1"),
    (4, 2, 130, 130, 16, "v1"),  # GQA, a ragged tail
    (2, 1, 17, 40, 16, "v1"),  # GQA, fewer queries than keys (the KV-cache alignment)
    (2, 2, 1, 1, 16, "v2"),
    (4, 2, 17, 17, 32, "v2"),
    (4, 2, 130, 130, 16, "v2"),
    (2, 1, 1, 33, 16, "v2"),  # one decoding step against a cache
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("h,h_kv,n,m,d,variant", CASES)
def test_kernel_matches_reference(h, h_kv, n, m, d, variant, causal):
    dtype = torch.bfloat16 if (n + h_kv) % 2 else torch.float16  # both half types across the cases
    dv = 2 * d if variant == "v1" else d
    batch = 1 if n > 64 else 2  # the interpreter's time grows with the grid
    inputs = make_inputs(batch, h, h_kv, n, m, d, dv, dtype, v2=variant == "v2", seed=n + m + h_kv)
    check_against_reference(inputs, causal, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_dtypes(dtype):
    inputs = make_inputs(1, 2, 2, 33, 33, 32, 64, dtype, seed=5)
    check_against_reference(inputs, True, dtype)


@pytest.mark.parametrize(
    "fwd,bwd",
    [
        # The value width split across programs, dQ by atomics, unequal query/key blocks.
        (op.FwdConfig(16, 32, 16, 1, 1), op.BwdConfig((32, 1), (16, 32, 1, 1), (16, 16, 1, 1), True)),
        (op.FwdConfig(32, 16, None, 1, 1), op.BwdConfig((16, 1), (32, 16, 1, 1), (32, 16, 1, 1), False)),
        # dK and dV in separate launches (with and without atomic dQ).
        (op.FwdConfig(16, 16, None, 1, 1), op.BwdConfig((16, 1), (16, 32, 1, 1), (16, 16, 1, 1), False,
                                                        (32, 16, 1, 1))),
        (op.FwdConfig(16, 16, None, 1, 1), op.BwdConfig((16, 1), (16, 16, 1, 1), (16, 16, 1, 1), True,
                                                        (16, 32, 1, 1))),
    ],
)
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_launch_configs(fwd, bwd, variant):
    """The tuned GPU shapes use paths the default CPU shape does not: each must be right."""
    d = 16
    dv = 2 * d if variant == "v1" else d
    inputs = make_inputs(1, 4, 2, 75, 90, d, dv, torch.float16, v2=variant == "v2", seed=11)

    class Run(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q1, q2, k1, k2, v, lam):
            shared = inputs[2] is inputs[3]
            o, lse1, lse2, o2 = op.forward(q1, q2, k1, None if shared else k2, v, lam, causal=True,
                                           scale=d**-0.5, config=fwd)
            ctx.save_for_backward(q1, q2, k1, k2, v, lam, o, o2, lse1, lse2)
            ctx.shared = shared
            return o

        @staticmethod
        def backward(ctx, do):
            q1, q2, k1, k2, v, lam, o, o2, lse1, lse2 = ctx.saved_tensors
            g = op.backward(do, q1, q2, k1, None if ctx.shared else k2, v, lam, o, o2, lse1, lse2, causal=True,
                            scale=d**-0.5, config=bwd)
            if ctx.shared:
                return g[0], g[1], g[2], None, g[3], g[4]
            return tuple(g)

    check_against_reference(inputs, True, torch.float16, run=Run.apply)


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_extreme_logits_stay_finite(variant):
    """Scores of about ±1e4 saturate both softmaxes; nothing may overflow into Inf or NaN."""
    d = 16
    dv = 2 * d if variant == "v1" else d
    inputs = make_inputs(1, 2, 2, 40, 40, d, dv, torch.float32, v2=variant == "v2", seed=3, scale=50.0)
    scores = d**-0.5 * inputs[0] @ inputs[2].transpose(-1, -2)
    assert scores.abs().max() > 5e3  # the test does reach extreme logits
    out = differential_attention(*inputs, causal=True, backend="triton")
    grads = torch.autograd.grad(out, unique(inputs), torch.ones_like(out))
    assert all(torch.isfinite(t).all() for t in (out, *grads))
    ref = differential_attention(*inputs, causal=True, backend="reference")
    # On a GPU fp32 products run as tf32 (10-bit mantissa): on scores of 1e4 that is ~4e-3 (measured on an H200).
    assert rel_err(out, ref) < (1e-2 if DEVICE.type == "cuda" else 1e-3)


def test_lambda_gradient_stays_on_device():
    """V1's 0-d dλ is a device tensor summed there (no .item(), so no host sync in the backward)."""
    inputs = make_inputs(1, 2, 2, 17, 17, 16, 32, torch.float16)
    out = differential_attention(*inputs, causal=True, backend="triton")
    (dlam,) = torch.autograd.grad(out.float().sum(), [inputs[5]])
    assert dlam.dim() == 0 and dlam.device.type == DEVICE.type and dlam.dtype == torch.float32


def test_custom_op_registration():
    """Schema, fake (meta) implementation and autograd registration agree with the real kernel."""
    inputs = make_inputs(1, 2, 1, 17, 17, 16, 32, torch.float16)
    q1, q2, k1, k2, v, lam = inputs
    torch.library.opcheck(torch.ops.diff_transformer.diff_attn_fwd.default, (q1, q2, k1, k2, v, lam, True, 0.25, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_inference_skips_branch_two_output():
    """Without gradients the forward writes no O2 (the backward's only extra buffer) and gives the same O."""
    inputs = make_inputs(1, 2, 2, 17, 17, 16, 32, torch.float16)
    with torch.no_grad():
        out = differential_attention(*inputs, causal=True, backend="triton")
        o, _, _, o2 = torch.ops.diff_transformer.diff_attn_fwd(*inputs[:5], inputs[5], True, 0.25, False)
    assert o2.numel() == 0
    torch.testing.assert_close(out, o, rtol=0, atol=0)
    ref = differential_attention(*inputs, causal=True, backend="reference")
    assert rel_err(out, ref) < REL_TOL[torch.float16]


def test_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) traces the op, forward and backward, and matches eager."""
    inputs = make_inputs(1, 2, 2, 17, 17, 16, 32, torch.float16)

    def f(q1, q2, k1, k2, v, lam):
        return differential_attention(q1, q2, k1, k2, v, lam, causal=True, backend="triton").float().square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_grads = torch.autograd.grad(f(*inputs), inputs)
    comp_grads = torch.autograd.grad(compiled(*inputs), inputs)
    for a, b in zip(comp_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("attention", ["diff", "diff_v2"])
def test_model_with_triton_backend(attention):
    """The tiny model gives the reference backend's logits and gradients through the kernel."""
    cfg = preset("tiny", attention=attention, n_layers=2, vocab_size=64)
    ids = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    results = []
    for backend in ("triton", "reference"):
        model = DiffTransformerLM(cfg.replace(attn_backend=backend), seed=0).to(DEVICE)
        logits = model(ids)
        logits.float().square().mean().backward()
        results.append((logits.detach(), model.layers[0].self_attn.q_proj.weight.grad))
    (lt, gt), (lr, gr) = results
    tol = 1e-3 if DEVICE.type == "cuda" else 1e-4  # tf32 products on a GPU (2.3e-4 and 2.7e-4 seen on an H200)
    assert rel_err(lt, lr) < tol and rel_err(gt, gr) < tol


def test_unsupported_inputs_name_the_fix():
    inputs = make_inputs(1, 2, 2, 8, 8, 24, 48, torch.float16)
    with pytest.raises(ValueError, match="head dim 24.*backend='sdpa'"):
        differential_attention(*inputs, causal=True, backend="triton")
    q = make_inputs(1, 2, 2, 9, 8, 16, 32, torch.float16)
    with pytest.raises(ValueError, match="N <= M"):
        differential_attention(*q, causal=True, backend="triton")


def test_auto_backend_choice():
    """``auto`` takes the kernel for CUDA half-precision inputs and SDPA elsewhere."""
    inputs = make_inputs(1, 2, 2, 64, 64, 16, 32, torch.float16)
    expected = "triton" if DEVICE.type == "cuda" else "sdpa"
    assert resolve_backend("auto", inputs[0], inputs[2], inputs[3], inputs[4]) == expected
    fp32 = make_inputs(1, 2, 2, 8, 8, 16, 32, torch.float32)
    assert resolve_backend("auto", fp32[0], fp32[2], fp32[3], fp32[4]) == "sdpa"
