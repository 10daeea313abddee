"""The named variants on CUDA: bf16 autocast training steps, cached decoding, and the kernel paths.

Skipped without a GPU. The CPU file (test_variants.py) holds the exact references; this one checks
that every variant runs where the fast paths do (SDPA's CUDA kernels with a float mask, the Triton
kernel for DIFF V1, the eager fp32 paths with autocast switched off) and agrees with fp32.
Last run: an H200, torch 2.11.0+cu130, triton 3.6.0: 27 passed in 37 s.
"""

import math

import pytest
import torch

from diff_transformer import DiffTransformerLM
from diff_transformer.attention import triton_available
from diff_transformer.train.compare import default_run
from diff_transformer.variants import VARIANTS, apply_variant

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def variant_config(name, **kw):
    return apply_variant(default_run("tiny"), name).model.replace(vocab_size=256, **kw)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_bf16_autocast_matches_fp32_and_trains(name):
    cfg = variant_config(name)
    model = DiffTransformerLM(cfg, seed=0).cuda()
    ids = torch.randint(0, cfg.vocab_size, (4, 129), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        ref = model(ids[:, :-1])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(ids[:, :-1])
    assert rel(low, ref) < 3e-2, rel(low, ref)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    model.eval()
    with torch.no_grad():
        full = model(ids[:, :40])
        cache = model.new_cache(4, 48)
        parts = [model(ids[:, :16], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(16, 40)]
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-4


@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("name", ["diff", "diff-lambda-fixed", "diff-norm-matched", "diff-nope"])
def test_triton_backend_equals_sdpa(name):
    outs, grads = [], []
    for backend in ("sdpa", "triton"):
        cfg = variant_config(name, attn_backend=backend)
        model = DiffTransformerLM(cfg, seed=0).cuda()
        ids = torch.randint(0, cfg.vocab_size, (2, 256), generator=torch.Generator().manual_seed(2)).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids)
        out.float().pow(2).mean().backward()
        outs.append(out)
        grads.append(model.layers[1].self_attn.q_proj.weight.grad)
    assert rel(outs[1], outs[0]) < 2e-2
    assert rel(grads[1], grads[0]) < 5e-2
