"""The differential attention op: SDPA backend against the fp32 reference, forward and backward."""

import pytest
import torch

from diff_transformer.attention import attention_maps, differential_attention, softmax_attention
from diff_transformer.attention import sdpa

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def make_inputs(b, h, h_kv, n, m, d, dv, dtype, v2=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_()

    q1, q2 = r(b, h, n, d), r(b, h, n, d)
    k1 = r(b, h_kv, m, d)
    k2 = k1 if v2 else r(b, h_kv, m, d)
    v = r(b, h_kv, m, dv)
    if v2:
        lam = torch.sigmoid(torch.randn(b, h, n, generator=g)).requires_grad_()
    else:
        lam = torch.tensor(0.63).requires_grad_()
    return q1, q2, k1, k2, v, lam


def grads(out, inputs, seed=1, like=None):
    """Gradients of <out, g> for a fixed random g, rounded to ``like``'s dtype so fp32 truth sees the same g."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    g = g.to((like if like is not None else out).dtype).to(out.dtype)
    unique = list({id(t): t for t in inputs}.values())
    return torch.autograd.grad(out, unique, g)


def rel_err(a, b):
    """‖a − b‖ / ‖b‖, with ‖b‖ floored at 0.1·sqrt(numel) so exactly-zero gradients (N = 1) compare absolutely."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(0.1 * b.numel() ** 0.5)).item()


def fp32_truth(inputs, causal):
    """The reference on the same (possibly bf16) inputs upcast to fp32, with its gradients."""
    up = [t.detach().float().requires_grad_() for t in inputs]
    if inputs[2] is inputs[3]:
        up[3] = up[2]
    return up, differential_attention(*up, causal=causal, backend="reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [1, 7, 129])
@pytest.mark.parametrize("h,h_kv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("pattern", ["auto", "two", "four"])
def test_sdpa_matches_reference_v1(dtype, causal, n, h, h_kv, pattern):
    d = 16
    inputs = make_inputs(2, h, h_kv, n, n, d, 2 * d, dtype, seed=n + h_kv)
    up, ref = fp32_truth(inputs, causal)  # bf16 is judged against fp32 math on the same inputs
    out = sdpa.differential_attention(*inputs, causal=causal, pattern=pattern)
    assert out.shape == (2, h, n, 2 * d) and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, **TOL[dtype])
    else:
        assert rel_err(out, ref) < 1e-2
    for name, ga, gb in zip(["q1", "q2", "k1", "k2", "v", "lam"], grads(out, inputs), grads(ref, up, like=out)):
        if dtype == torch.float32:
            torch.testing.assert_close(ga, gb, **TOL[dtype], msg=lambda m: f"grad {name}: {m}")
        elif name == "lam":
            # dλ = -Σ g·o2 cancels heavily; bf16 rounding of o2 bounds its error by ε Σ|g·o2|.
            bound = 2 * 2**-8 * lam_grad_mass(inputs, causal)
            assert (ga - gb).abs().item() <= bound, (ga, gb, bound)
        else:
            # A shared kv head's gradient sums 2·H/H_kv bf16 partials (4·H/H_kv with the value split).
            tol = 1e-2 if name.startswith("q") or h == h_kv else 1.5e-2
            assert rel_err(ga, gb) < tol, name


def lam_grad_mass(inputs, causal, seed=1):
    """Σ |g · o2| with o2 = softmax(q2 k2ᵀ) v in fp32: the scale of dλ's rounding error."""
    q1, q2, k1, k2, v, lam = (t.detach().float() for t in inputs)
    maps = attention_maps(q1, q2, k1, k2, v, lam, causal=causal)
    o2 = torch.matmul(maps.attn2, v.repeat_interleave(q1.shape[1] // v.shape[1], dim=1))
    g = torch.randn(o2.shape, generator=torch.Generator().manual_seed(seed)).to(inputs[0].dtype).float()
    return (g * o2).abs().sum().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [1, 17, 129])
@pytest.mark.parametrize("h,h_kv", [(4, 4), (4, 2)])
def test_sdpa_matches_reference_v2(dtype, causal, n, h, h_kv):
    d = 16
    inputs = make_inputs(2, h, h_kv, n, n, d, d, dtype, v2=True, seed=n)
    assert sdpa.choose_pattern(inputs[0], inputs[2], inputs[3], inputs[4]) == "stacked"
    up, ref = fp32_truth(inputs, causal)
    out = differential_attention(*inputs, causal=causal, backend="sdpa")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(out, ref) < tol
    for name, ga, gb in zip(["q1", "q2", "k", "v", "lam"], grads(out, inputs), grads(ref, up, like=out)):
        assert rel_err(ga, gb) < tol, name


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_kv_cache_alignment(backend):
    """N < M: queries are the last N positions (bottom-right causal), as decoding with a cache needs."""
    q1, q2, k1, k2, v, lam = make_inputs(1, 2, 2, 9, 9, 8, 16, torch.float32)
    full = differential_attention(q1, q2, k1, k2, v, lam, backend=backend)
    tail = differential_attention(q1[:, :, 5:], q2[:, :, 5:], k1, k2, v, lam, backend=backend)
    torch.testing.assert_close(tail, full[:, :, 5:], rtol=1e-5, atol=1e-6)


def test_reference_equals_explicit_formula():
    """The reference against SPEC.md written out head by head, with GQA by explicit index."""
    b, h, h_kv, n, d = 1, 4, 2, 6, 8
    q1, q2, k1, k2, v, lam = (t.detach() for t in make_inputs(b, h, h_kv, n, n, d, 2 * d, torch.float64))
    maps = attention_maps(q1, q2, k1, k2, v, lam)
    mask = torch.ones(n, n).tril().bool()
    for i in range(h):
        g = i // (h // h_kv)
        s1 = (q1[0, i] @ k1[0, g].T / d**0.5).masked_fill(~mask, float("-inf"))
        s2 = (q2[0, i] @ k2[0, g].T / d**0.5).masked_fill(~mask, float("-inf"))
        expect = (s1.softmax(-1) - lam * s2.softmax(-1)) @ v[0, g]
        torch.testing.assert_close(maps.out[0, i], expect, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(maps.attn1[0, i].double(), s1.softmax(-1), rtol=1e-5, atol=1e-6)
    assert torch.isinf(maps.logits1[0, 0, 0, 1]) and maps.logits1[0, 0, 0, 1] < 0


def test_softmax_attention_backends_agree():
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 4, 11, 8, generator=g), torch.randn(2, 2, 11, 8, generator=g), torch.randn(2, 2, 11, 8, generator=g)
    torch.testing.assert_close(softmax_attention(q, k, v, backend="sdpa"), softmax_attention(q, k, v, backend="reference"),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: {**t, "q2": t["q2"][:, :, :-1]}, "q1 and q2"),
        (lambda t: {**t, "v": t["v"][:, :1]}, "v must be"),
        (lambda t: {**t, "lam": torch.ones(3)}, "lam must be"),
        (lambda t: {**t, "k1": t["k1"].double(), "k2": t["k2"].double()}, "dtype"),
    ],
)
def test_bad_inputs_are_named(change, message):
    names = ["q1", "q2", "k1", "k2", "v", "lam"]
    t = dict(zip(names, (x.detach() for x in make_inputs(1, 2, 2, 4, 4, 8, 16, torch.float32))))
    with pytest.raises(ValueError, match=message):
        differential_attention(**change(t))


def test_unknown_backend():
    t = [x.detach() for x in make_inputs(1, 2, 2, 4, 4, 8, 16, torch.float32)]
    with pytest.raises(ValueError, match="unknown attention backend"):
        differential_attention(*t, backend="flash")
