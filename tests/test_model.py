"""The decoder against SPEC.md's equations, written out here independently of the package's helpers."""

import math

import pytest
import torch

from diff_transformer import PRESETS, ConfigError, DiffTransformerLM, ModelConfig, matched_pair, parameter_report, preset
from diff_transformer.model import rope_cos_sin

from conftest import randomize_

ATTENTIONS = ["diff", "diff_v2", "baseline"]


def small_config(attention, **kw):
    base = dict(vocab_size=97, dim=32, n_layers=3, n_heads=4, n_kv_heads=4, max_seq_len=64, attention=attention)
    return ModelConfig(**{**base, **kw})


# --- SPEC.md, written out ---------------------------------------------------------------------
def spec_rope(x, positions, theta):
    """x (N, d) for one head: pair j with j + d/2 rotated by position * theta^(-2j/d)."""
    n, d = x.shape
    out = torch.empty_like(x)
    for j in range(d // 2):
        ang = positions.double() * theta ** (-2 * j / d)
        c, s = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
        out[:, j] = x[:, j] * c - x[:, j + d // 2] * s
        out[:, j + d // 2] = x[:, j + d // 2] * c + x[:, j] * s
    return out


def spec_softmax(q, k):
    n, d = q.shape[0], q.shape[1]
    s = q @ k.T / math.sqrt(d)
    s = s.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
    return torch.softmax(s, dim=-1)


def spec_attention(attn, x, cfg, layer_idx):
    """One attention layer's output for x (N, D), from SPEC.md, head by head."""
    n = x.shape[0]
    d, h, h_kv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    pos = torch.arange(n)
    q = (x @ attn.q_proj.weight.T).view(n, -1, d)
    k = (x @ attn.k_proj.weight.T).view(n, -1, d)
    q = torch.stack([spec_rope(q[:, i], pos, cfg.rope_theta) for i in range(q.shape[1])], 1)
    k = torch.stack([spec_rope(k[:, i], pos, cfg.rope_theta) for i in range(k.shape[1])], 1)
    outs = []
    if cfg.attention == "baseline":
        v = (x @ attn.v_proj.weight.T).view(n, h_kv, d)
        for i in range(h):
            g = i // (h // h_kv)
            outs.append(spec_softmax(q[:, i], k[:, g]) @ v[:, g])
    elif cfg.attention == "diff":
        H, H_kv = h // 2, h_kv // 2
        v = (x @ attn.v_proj.weight.T).view(n, H_kv, 2 * d)
        lam_init = 0.8 - 0.6 * math.exp(-0.3 * layer_idx)
        lam = (torch.exp(attn.lambda_q1 @ attn.lambda_k1) - torch.exp(attn.lambda_q2 @ attn.lambda_k2) + lam_init)
        for i in range(H):
            g = i // (H // H_kv)  # differential kv head: sub-heads 2g (k1) and 2g+1 (k2)
            a1 = spec_softmax(q[:, 2 * i], k[:, 2 * g])
            a2 = spec_softmax(q[:, 2 * i + 1], k[:, 2 * g + 1])
            o = (a1 - lam * a2) @ v[:, g]  # (N, 2d)
            o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * attn.head_norm.weight
            outs.append(o * (1 - lam_init))
    else:  # diff_v2
        v = (x @ attn.v_proj.weight.T).view(n, h_kv, d)
        lam = torch.sigmoid(x @ attn.lambda_proj.weight.T)  # (N, h)
        for i in range(h):
            g = i // (h // h_kv)
            a1, a2 = spec_softmax(q[:, 2 * i], k[:, g]), spec_softmax(q[:, 2 * i + 1], k[:, g])
            outs.append(a1 @ v[:, g] - lam[:, i : i + 1] * (a2 @ v[:, g]))
    return torch.cat(outs, dim=-1) @ attn.o_proj.weight.T


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("n_kv_heads", [4, 2])
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_attention_layer_matches_spec(attention, n_kv_heads, backend):
    cfg = small_config(attention, n_heads=8, n_kv_heads=n_kv_heads, dim=64, attn_backend=backend)
    model = randomize_(DiffTransformerLM(cfg, seed=1))
    x = torch.randn(1, 13, cfg.dim, generator=torch.Generator().manual_seed(2))
    rope = rope_cos_sin(torch.arange(13), cfg.head_dim, cfg.rope_theta)
    for layer_idx in (0, 2):
        attn = model.layers[layer_idx].self_attn
        with torch.no_grad():
            got = attn(x, rope)[0]
            want = spec_attention(attn, x[0], cfg, layer_idx)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_diff_gqa_uses_distinct_keys_per_branch():
    """The reference code's naive file used one key for both branches; SPEC.md takes k1 ≠ k2."""
    cfg = small_config("diff", n_heads=8, n_kv_heads=2, dim=64)
    model = randomize_(DiffTransformerLM(cfg, seed=1))
    attn = model.layers[1].self_attn
    x = torch.randn(1, 9, cfg.dim)
    rope = rope_cos_sin(torch.arange(9), cfg.head_dim, cfg.rope_theta)
    with torch.no_grad():
        before = attn(x, rope)
        k = attn.k_proj.weight.view(2, cfg.head_dim, cfg.dim)  # (2 sub-heads of kv head 0, d, D)
        k[1] += 1.0  # change only k2 of kv head 0
        after = attn(x, rope)
    assert (before - after).abs().max() > 1e-3


def test_lambda_init_schedule_and_constant():
    cfg = small_config("diff", n_layers=4)
    m = DiffTransformerLM(cfg)
    assert [layer.self_attn.lambda_init for layer in m.layers] == pytest.approx(
        [0.8 - 0.6 * math.exp(-0.3 * l) for l in range(4)])
    m = DiffTransformerLM(small_config("diff", lambda_init=0.5))
    assert all(layer.self_attn.lambda_init == 0.5 for layer in m.layers)
    assert all(layer.self_attn.head_norm_scale == 0.5 for layer in m.layers)


def test_lambda_vectors_initialised_as_paper():
    cfg = small_config("diff", dim=512, n_heads=2, n_kv_heads=2, n_layers=8)  # d = 256, 8 layers x 4 vectors
    m = DiffTransformerLM(cfg)
    vals = torch.cat([getattr(l.self_attn, f"lambda_{n}").detach() for l in m.layers for n in ("q1", "k1", "q2", "k2")])
    assert abs(vals.std().item() - 0.1) < 0.01 and abs(vals.mean().item()) < 0.01


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_kv_cache_decoding_equals_full_forward(attention, n_kv_heads):
    cfg = small_config(attention, n_kv_heads=n_kv_heads)
    model = randomize_(DiffTransformerLM(cfg, seed=3)).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 21), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 32)
        parts = [model(ids[:, :8], cache=cache)]  # prefill
        parts += [model(ids[:, t : t + 1], cache=cache) for t in range(8, 16)]  # one token at a time
        parts.append(model(ids[:, 16:], cache=cache))  # a chunk after the cache
    assert cache.length == 21
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_cache_is_the_baselines_size(attention):
    cfg = small_config(attention, n_kv_heads=2)
    base = DiffTransformerLM(matched_pair(cfg)[1]).new_cache(1, 16)
    assert DiffTransformerLM(cfg).new_cache(1, 16).nbytes() == base.nbytes()


def test_greedy_generation_matches_argmax_of_full_forward():
    cfg = small_config("diff")
    model = randomize_(DiffTransformerLM(cfg, seed=5)).eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(6))
    out = model.generate(prompt, max_new_tokens=6, temperature=0)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        for t in range(5, 11):  # each generated token is the argmax given everything before it
            assert torch.equal(out[:, t], model(out[:, :t])[:, -1].argmax(-1))


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_new_cache_takes_the_autocast_dtype(attention):
    model = DiffTransformerLM(small_config(attention)).eval()
    assert model.new_cache(1, 8).k[0].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.new_cache(1, 8)
        assert model.new_cache(1, 8, torch.float32).v[0].dtype == torch.float32  # an explicit dtype wins
    assert all(t.dtype == torch.bfloat16 for t in cache.k + cache.v)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert model.new_cache(1, 8).k[0].dtype == torch.float32


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_bf16_autocast_cached_greedy_decoding_equals_uncached(attention, backend):
    """Under bf16 autocast the cache holds bf16 keys and values (an fp32 one made DIFF's op refuse q and k),
    and decoding from it picks the tokens the uncached bf16 forward picks."""
    cfg = small_config(attention, attn_backend=backend)
    model = randomize_(DiffTransformerLM(cfg, seed=5)).eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(prompt, max_new_tokens=12, temperature=0)
        ref = prompt
        for _ in range(12):  # no cache: the whole sequence again at every step
            ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)


def test_a_cache_of_another_dtype_is_refused_by_name():
    model = DiffTransformerLM(small_config("baseline")).eval()
    cache = model.new_cache(1, 8)  # fp32, made outside the autocast region below
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="new_cache"):
        model(torch.tensor([[1, 2, 3]]), cache=cache)


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    cfg = small_config("diff_v2")
    model = DiffTransformerLM(cfg, seed=7).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, 4))
    a = model.generate(prompt, 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0))
    b = model.generate(prompt, 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert torch.equal(model.generate(prompt, 8, temperature=0.7, top_k=1), model.generate(prompt, 8, temperature=0))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_matched_pair_parameter_rule(name):
    report = parameter_report(preset(name))
    cfg = preset(name)
    assert 0 < report.diff - report.baseline == cfg.n_layers * 6 * cfg.head_dim  # 4 λ vectors + 2d norm weight
    assert abs(report.relative_difference) < 1e-3, str(report)


def test_matched_pair_differs_only_in_attention():
    diff, base = matched_pair(preset("small", n_kv_heads=4, tie_embeddings=True))
    d, b = diff.to_dict(), base.to_dict()
    assert {k for k in d if d[k] != b[k]} == {"attention", "head_norm"}
    assert (diff.attention, diff.head_norm, base.attention, base.head_norm) == ("diff", True, "baseline", False)


def test_replace_attention_rederives_head_norm():
    cfg = small_config("diff")
    assert cfg.replace(attention="baseline").head_norm is False
    assert cfg.replace(attention="baseline", head_norm=True).head_norm is True


def test_matched_models_share_initial_weights():
    diff_cfg, base_cfg = matched_pair(small_config("diff"))
    diff, base = DiffTransformerLM(diff_cfg, seed=11), DiffTransformerLM(base_cfg, seed=11)
    bs = base.state_dict()
    shared = [k for k in diff.state_dict() if k in bs]
    assert len(shared) == len(bs)
    for k in shared:
        assert torch.equal(diff.state_dict()[k], bs[k]), k
    assert not torch.equal(DiffTransformerLM(diff_cfg, seed=12).embed_tokens.weight, diff.embed_tokens.weight)


def test_init_stds_documented():
    cfg = small_config("baseline", dim=256, n_heads=4, n_layers=8, vocab_size=4096)
    m = DiffTransformerLM(cfg)
    assert abs(m.embed_tokens.weight.std().item() - 0.02) < 1e-3
    assert abs(m.layers[0].self_attn.o_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 3e-4
    assert torch.all(m.norm.weight == 1)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_gradients_reach_lambda_and_norm_and_loss_drops(attention):
    torch.manual_seed(0)
    cfg = small_config(attention, tie_embeddings=attention == "diff")
    model = DiffTransformerLM(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(8):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        if step == 0:
            attn = model.layers[1].self_attn
            names = {"diff": ["lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"], "diff_v2": ["lambda_proj"]}
            for n in names.get(attention, []):
                grad = getattr(attn, n).grad if n.startswith("lambda_") and n != "lambda_proj" else attn.lambda_proj.weight.grad
                assert grad is not None and grad.abs().sum() > 0, n
            if attention == "diff":
                assert attn.head_norm.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_lambdas_reported_per_layer():
    m = DiffTransformerLM(small_config("diff"), seed=0)
    lams = m.lambdas()
    assert len(lams) == 3 and all(abs(l - m.layers[i].self_attn.lambda_init) < 0.1 for i, l in enumerate(lams))
    assert DiffTransformerLM(small_config("baseline")).lambdas() is None


def test_deterministic_on_cpu():
    cfg = small_config("diff")
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    a, b = DiffTransformerLM(cfg, seed=3)(ids), DiffTransformerLM(cfg, seed=3)(ids)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n_heads=3, dim=48), "n_heads"),  # diff needs an even head count
        (dict(n_kv_heads=3), "n_kv_heads"),
        (dict(attention="softmax"), "attention"),
        (dict(dim=30, n_heads=4), "dim"),
        (dict(lambda_init=1.5), "lambda_init"),
        (dict(attn_backend="cuda"), "attn_backend"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        small_config(kwargs.pop("attention", "diff"), **kwargs)


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="tiny"):
        preset("huge")


@pytest.mark.parametrize("tie", [False, True])
def test_save_and_load_pretrained_roundtrip(tmp_path, tie):
    cfg = small_config("diff", tie_embeddings=tie)
    model = randomize_(DiffTransformerLM(cfg, seed=2))
    model.save_pretrained(tmp_path)
    loaded = DiffTransformerLM.from_pretrained(tmp_path)
    assert loaded.config == cfg
    ids = torch.randint(0, cfg.vocab_size, (1, 7))
    assert torch.equal(model(ids), loaded(ids))
    if tie:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_from_pretrained_refuses_other_config(tmp_path):
    DiffTransformerLM(small_config("diff")).save_pretrained(tmp_path)
    import json

    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["dim"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match the model config"):
        DiffTransformerLM.from_pretrained(tmp_path)


def _plain_rms_norm(x, weight, eps):
    """The plain ops (HF's LlamaRMSNorm), differentiated by autograd: the reference for RMSNorm."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float64)])
def test_rms_norm_function_matches_autograd_of_the_plain_ops(x_dtype, w_dtype):
    """RMSNorm trains a non-fp32 input through a Function that keeps only x and 1/rms: the same bits as
    autograd through the plain ops, forward and both gradients, in every dtype."""
    from diff_transformer.model import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(64).to(w_dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x = (torch.randn(3, 5, 7, 64) * 3).to(x_dtype).requires_grad_()
    x_ref, w_ref = x.detach().clone().requires_grad_(), norm.weight.detach().clone().requires_grad_()
    y, y_ref = norm(x), _plain_rms_norm(x_ref, w_ref, norm.eps)
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert torch.equal(x.grad, x_ref.grad) and torch.equal(norm.weight.grad, w_ref.grad)
    with torch.no_grad():  # inference: the plain ops, the same bits
        assert torch.equal(norm(x), y_ref)


def test_rms_norm_keeps_only_its_input_and_the_row_scale_for_backward():
    """What training saves: x (shared with the caller) and 1/rms, no fp32 or normalised copy of x."""
    from diff_transformer.model import RMSNorm

    norm = RMSNorm(256)
    x = torch.randn(4, 32, 256, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        norm(x)
    assert sum(t.numel() * t.element_size() for t in saved if t.data_ptr() != x.data_ptr()
               and t.data_ptr() != norm.weight.data_ptr()) == 4 * 32 * 4  # fp32 1/rms per row


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("attention", ["diff", "diff_v2", "baseline"])
def test_training_with_the_memory_saving_functions_is_bit_equal_to_the_plain_ops(attention, amp, monkeypatch):
    """Five AdamW steps end with the same weights, bit for bit, as with RMSNorm and SDPA's o1 − λ·o2
    through autograd of their plain ops: the Functions change what is kept, never the arithmetic (fp32
    and bf16 autocast; the differential SDPA path, which the CPU takes)."""
    from diff_transformer import model as M
    from diff_transformer.attention import sdpa

    def train():
        torch.manual_seed(0)
        m = M.DiffTransformerLM(small_config(attention))
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            ids = torch.randint(0, 97, (4, 17), generator=g)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                logits = m(ids[:, :-1])
            torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in m.parameters()]

    ours = train()
    monkeypatch.setattr(M.RMSNorm, "forward", lambda self, x: self.weight * M._rms_normalize(x, self.eps)[0])
    monkeypatch.setattr(sdpa, "_combine", sdpa._combine_plain)
    plain = train()
    assert all(torch.equal(a, b) for a, b in zip(ours, plain))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_token", [False, True])
def test_sdpa_combine_function_matches_the_plain_ops_and_keeps_no_fp32_copy(dtype, per_token):
    """o1 − λ·o2 (V1: 0-d λ; V2: per-token λ): same bits forward and for every gradient, and for a
    half-precision o2 nothing is kept besides o2 itself and λ."""
    from diff_transformer.attention import sdpa

    torch.manual_seed(0)
    o1, o2 = (torch.randn(2, 3, 5, 8).to(dtype).requires_grad_() for _ in range(2))
    lam = (torch.rand(2, 3, 5) if per_token else torch.tensor(0.4)).requires_grad_()
    ref = [t.detach().clone().requires_grad_() for t in (o1, o2, lam)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = sdpa._combine(o1, o2, lam)
    y_ref = sdpa._combine_plain(*ref)
    assert y.dtype == dtype and torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for t, r in zip((o1, o2, lam), ref):
        assert torch.equal(t.grad, r.grad)
    if dtype == torch.bfloat16:
        assert sum(t.numel() * t.element_size() for t in saved if t.data_ptr() != o2.data_ptr()) == lam.numel() * 4
