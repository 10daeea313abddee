"""The compiled decode path (static KV cache, torch.compile) against the eager one, and the benchmarks'
work counts against hand counts."""

import importlib.util
from pathlib import Path

import pytest
import torch

from diff_transformer import DiffTransformerLM, ModelConfig
from diff_transformer.generation import _COMPILED

from conftest import randomize_

ATTENTIONS = ["diff", "diff_v2", "baseline"]


def small_config(attention, **kw):
    base = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, max_seq_len=64, attention=attention)
    return ModelConfig(**{**base, **kw})


# The static cache without compile ----------------------------------------------------------------
@pytest.mark.parametrize("pos_encoding", ["rope", "alibi"])
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_static_slots_step_equals_the_growing_cache_step(attention, pos_encoding):
    """Prefill, then one token at a time: by the growing cache, and by positions= over all slots (the
    unwritten and future ones masked). The same logits at every step and cache contents after, to float
    rounding (SDPA's reduction over the longer, masked key range may round differently)."""
    cfg = small_config(attention, n_kv_heads=2, pos_encoding=pos_encoding)
    model = randomize_(DiffTransformerLM(cfg, seed=3)).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 14), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        grow, static = model.new_cache(2, 20), model.new_cache(2, 20)
        model(ids[:, :6], cache=grow)
        model(ids[:, :6], cache=static)
        for t in range(6, 14):
            a = model(ids[:, t:t + 1], cache=grow)
            b = model(ids[:, t:t + 1], static, positions=torch.tensor([t]))
            assert (a - b).abs().max().item() < 1e-5, t
    assert static.length == 6  # positions= leaves the length to the caller
    for x, y in zip(grow.k + grow.v, static.k + static.v):
        assert (x[:, :, :14] - y[:, :, :14]).abs().max().item() < 1e-5 and not y[:, :, 14:].any()


def test_static_slots_mask_garbage_in_later_slots():
    """Later slots are masked, not merely zero: filling them with large values changes nothing."""
    cfg = small_config("diff")
    model = randomize_(DiffTransformerLM(cfg, seed=1)).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        outs = []
        for fill in (0.0, 1e4):
            cache = model.new_cache(1, 16)
            for t in cache.k + cache.v:
                t.fill_(fill)
            model(ids[:, :4], cache=cache)
            outs.append(model(ids[:, 4:], cache, positions=torch.tensor([4])))
    assert torch.equal(outs[0], outs[1])


def test_positions_without_a_cache_is_refused():
    model = DiffTransformerLM(small_config("baseline")).eval()
    with pytest.raises(ValueError, match="needs a cache"):
        model(torch.zeros(1, 1, dtype=torch.long), positions=torch.tensor([0]))


# The compiled path -------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_compiled_generate_gives_the_eager_tokens(attention):
    """torch.compile (inductor on the CPU) of the static decode step: greedy tokens equal to eager,
    and sampled ones too with one seeded generator (sampling stays eager: the same random stream)."""
    torch._dynamo.reset()
    cfg = small_config(attention, n_kv_heads=2)
    model = randomize_(DiffTransformerLM(cfg, seed=5)).eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(6))
    eager = model.generate(prompt, 12, temperature=0)
    compiled = model.generate(prompt, 12, temperature=0, compile=True)
    assert torch.equal(eager, compiled)
    kw = dict(temperature=0.9, top_k=20, top_p=0.9)
    a = model.generate(prompt, 12, generator=torch.Generator().manual_seed(7), **kw)
    b = model.generate(prompt, 12, generator=torch.Generator().manual_seed(7), compile=True, **kw)
    assert torch.equal(a, b)
    # A second call of another prompt length reuses the compiled step and its cache (same rounded length).
    state = _COMPILED[model]
    cache = state["cache"]
    c = model.generate(prompt[:, :3], 9, temperature=0, compile=True)
    assert state["cache"] is cache and torch.equal(c, model.generate(prompt[:, :3], 9, temperature=0))


def test_compiled_path_refuses_the_triton_backend_by_name():
    model = DiffTransformerLM(small_config("diff", attn_backend="triton")).eval()
    with pytest.raises(ValueError, match="attn_backend"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 2, temperature=0, compile=True)


# Work counts (benchmarks/flops.py) ---------------------------------------------------------------
def _flops_module():
    path = Path(__file__).parents[1] / "benchmarks" / "flops.py"
    spec = importlib.util.spec_from_file_location("bench_flops", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_attention_work_by_hand_counts():
    f = _flops_module().attention_flops
    b, n, d = 3, 8, 4
    # One baseline head, not causal: QKᵀ and PV are N·N·d MACs each = 2·64·4 = 512 MACs = 1024 FLOPs
    # forward; backward S, dV, dP, dQ, dK = 5·256 MACs = 2560 FLOPs.
    assert f(1, 1, n, d, d, causal=False) == (1024.0, 2560.0)
    # Causal halves; B and H multiply.
    assert f(b, 2, n, d, d) == (b * 2 * 512.0, b * 2 * 1280.0)
    # One DIFF V1 head (v = 2d), not causal: S1, S2 (2·256) + P1V, P2V (2·512) = 1536 MACs forward;
    # S1, S2 (512) + dV (512) + dP (512) + dQ1, dQ2, dK1, dK2 (1024) = 2560 MACs backward.
    assert f(1, 1, n, d, 2 * d, branches=2, causal=False) == (3072.0, 5120.0)
    # SPEC's floor: DIFF V1 head vs two baseline heads: forward 6:4, backward 10:10, total 16:14.
    fd, bd = f(b, 1, n, d, 2 * d, branches=2)
    fb, bb = f(b, 2, n, d, d)
    assert fd / fb == 1.5 and bd / bb == 1.0 and (fd + bd) / (fb + bb) == 16 / 14
    # DIFF V2 head (v = d) vs two baseline heads: forward 4:4, backward 8:10.
    fv, bv = f(b, 1, n, d, d, branches=2)
    assert fv == fb and bv / bb == 0.8
    # Decoding (N < M queries over cached keys): no causal halving.
    assert f(1, 1, 1, d, d, m=n) == (2 * (n * d + n * d), 2 * (3 * n * d + 2 * n * d))
    with pytest.raises(ValueError):
        f(1, 1, n, d, d, branches=3)


def test_model_work_per_token_by_hand():
    m = _flops_module().model_flops_per_token
    kw = dict(non_embedding_params=1000, vocab_size=10, dim=4, n_layers=2, seq=8, head_dim=4, n_heads=2)
    # Matrices: 6·(1000 + 40) = 6240. Baseline attention per layer (2 heads, causal): forward
    # 2·2·32·(4 + 4) = 1024, backward 2·2·32·(12 + 8) = 2560, per token / 8 → 448; 2 layers → 896.
    assert m(attention="baseline", **kw) == 6240 + 896
    # DIFF V1 (1 head of d, 2d): forward 2·32·(8 + 16) = 1536, backward 2·32·(24 + 16) = 2560 → 512/token.
    assert m(attention="diff", **kw) == 6240 + 1024
    assert m(attention="baseline", train=False, **kw) == 2 * 1040 + 2 * 1024 / 8


def test_decode_benchmark_tells_a_near_tie_from_a_wrong_token():
    """benchmarks/decode.py's diagnostic at the first differing token: the compiled token's rank among
    the logits both paths chose from, and the top-2 gap in ulps of the top logit."""
    from diff_transformer.config import preset

    spec = importlib.util.spec_from_file_location(
        "decode_bench", Path(__file__).parents[1] / "benchmarks" / "decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.manual_seed(0)
    model = DiffTransformerLM(preset("tiny", vocab_size=64)).to(torch.bfloat16).eval()
    prompt = torch.randint(0, 64, (3, 8))
    eager = model.generate(prompt, 6, temperature=0)
    with torch.no_grad():
        ranked = model(eager[:, :10])[:, -1].float().topk(10).indices  # the choices at new token 2
    for rank in (1, 9):
        compiled = eager.clone()
        compiled[1, 10] = ranked[1, rank]
        seen = bench.agreement(eager, compiled, 8)
        assert seen["first_mismatch"] == 2 and not seen["same_tokens"]
        margin = bench.mismatch_margin(model, eager, compiled, 8, seen["first_mismatch"])
        assert margin["rows_differing"] == 1 and margin["first_rows"][0]["row"] == 1
        assert margin["first_rows"][0]["compiled_token_rank"] == rank
        assert margin["first_rows"][0]["gap_in_rounding_steps"] > 0
        if rank == 9:
            assert not margin["all_runner_up_within_2_steps"]
