"""Hugging Face interop: exports load in transformers with the same logits and greedy tokens, imports
are exact, export -> import -> export is bit-identical, and everything inexact is refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from diff_transformer import DiffTransformerLM, ModelConfig  # noqa: E402
from diff_transformer import hf  # noqa: E402
from diff_transformer.errors import UserError  # noqa: E402

TOL = 1e-4  # SPEC.md: fp32 logits max abs diff

# (n_heads, n_kv_heads, head_dim, n_layers, tie, extra): MHA and GQA, tied and untied, 1 and 3 layers,
# head_dim 16/32 (also != dim / n_heads), a non-default RoPE base and norm eps.
SHAPES = [
    pytest.param(4, None, 16, 1, False, {}, id="mha-d16-L1-untied"),
    pytest.param(4, 2, 32, 3, True, {"rope_theta": 500.0}, id="gqa2-d32-L3-tied-theta500"),
    pytest.param(8, 2, 16, 3, False, {"norm_eps": 1e-6}, id="gqa4-d16-L3-untied-eps1e-6"),
    pytest.param(8, 4, 32, 1, True, {}, id="gqa2-d32-L1-tied"),
]


def make_config(attention, n_heads, n_kv_heads, head_dim, n_layers, tie, extra) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=101, dim=64, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                 head_dim=head_dim, ffn_dim=96, max_seq_len=64, tie_embeddings=tie,
                                 attention=attention), **extra})


def random_model(config: ModelConfig, seed: int = 0) -> DiffTransformerLM:
    """A model whose every parameter is random: norm weights, head-norm weights and λ vectors too, so
    that the o_proj folding and λ mapping are really exercised."""
    model = DiffTransformerLM(config, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * noise)
            elif ".lambda_" in name:
                p.copy_(0.3 * noise)
            else:
                p.copy_(0.08 * noise)
    return model


def tokens(batch=2, n=17, vocab=101, seed=0):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def load_hf(path, impl):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl, dtype=torch.float32).eval()


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# Export -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["diff", "baseline"])
@pytest.mark.parametrize("n_heads,n_kv_heads,head_dim,n_layers,tie,extra", SHAPES)
def test_export_loads_in_transformers_with_same_logits_and_greedy_tokens(
        tmp_path, attention, n_heads, n_kv_heads, head_dim, n_layers, tie, extra):
    config = make_config(attention, n_heads, n_kv_heads, head_dim, n_layers, tie, extra)
    model = random_model(config)
    result = hf.export_hf(model, None, tmp_path / "out")
    assert result.architecture == {"diff": "DiffLlamaForCausalLM", "baseline": "LlamaForCausalLM"}[attention]
    assert {"config.json", "model.safetensors", "generation_config.json"} <= set(result.files)

    ids = tokens()
    with torch.no_grad():
        ours = model(ids)
        prompt = ids[:, :6]
        ours_gen = model.generate(prompt, 10, temperature=0)
    for impl in ("eager", "sdpa"):
        hf_model = load_hf(tmp_path / "out", impl)
        assert type(hf_model).__name__ == result.architecture
        assert hf_model.config.tie_word_embeddings == tie
        with torch.no_grad():
            theirs = hf_model(ids).logits
            theirs_gen = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                                           do_sample=False)
        diff = max_diff(ours, theirs)
        print(f"[hf export] {attention} {impl} {config.n_heads}/{config.n_kv_heads} heads d={head_dim} "
              f"L={n_layers} tie={tie}: max |Δlogits| = {diff:.2e}")
        assert diff <= TOL
        assert torch.equal(ours_gen, theirs_gen)


def test_layout_mapping_is_load_bearing():
    """Without the q/k/v permutation or the norm-weight fold the logits differ: the test above can fail."""
    config = make_config("diff", 4, 2, 16, 2, False, {})
    model = random_model(config)
    ids = tokens()
    hf_model = hf.to_transformers(model, attn_implementation="eager")
    with torch.no_grad():
        ours, exact = model(ids), hf_model(ids).logits
        assert max_diff(ours, exact) <= TOL
        attn = hf_model.model.layers[0].self_attn
        q = attn.q_proj.weight.clone()
        attn.q_proj.weight.copy_(model.layers[0].self_attn.q_proj.weight)  # our pair layout, unpermuted
        assert max_diff(ours, hf_model(ids).logits) > 1e-2
        attn.q_proj.weight.copy_(q)
        attn.o_proj.weight.copy_(model.layers[0].self_attn.o_proj.weight)  # norm weight not folded
        assert max_diff(ours, hf_model(ids).logits) > 1e-2


# Import -------------------------------------------------------------------------------------------
def random_hf_model(attention: str, *, tie: bool, n_kv: int, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=89, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=n_kv, head_dim=24, max_position_embeddings=64, rms_norm_eps=1e-6,
                  tie_word_embeddings=tie, rope_parameters={"rope_type": "default", "rope_theta": 1234.0},
                  bos_token_id=None, eos_token_id=None)
    if attention == "diff":
        cfg = transformers.DiffLlamaConfig(**common, lambda_std_dev=0.2)
        model = transformers.DiffLlamaForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    else:
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
            elif ".lambda_" in name:
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("attention", ["diff", "baseline"])
@pytest.mark.parametrize("tie,n_kv", [(False, 4), (True, 2)], ids=["mha-untied", "gqa-tied"])
def test_import_from_random_transformers_model(tmp_path, attention, tie, n_kv):
    hf_model = random_hf_model(attention, tie=tie, n_kv=n_kv)
    hf_model.save_pretrained(tmp_path / "src")
    ids = tokens(vocab=89)
    model, tok = hf.import_hf(tmp_path / "src")
    direct = hf.from_transformers(hf_model)
    assert tok is None
    assert model.config.attention == attention and model.config.tie_embeddings == tie
    assert model.config.rope_theta == 1234.0 and model.config.norm_eps == 1e-6
    with torch.no_grad():
        theirs = hf_model(ids).logits
        diff_folder, diff_direct = max_diff(model(ids), theirs), max_diff(direct(ids), theirs)
    print(f"[hf import] {attention} tie={tie} kv={n_kv}: max |Δlogits| folder {diff_folder:.2e}, "
          f"from_transformers {diff_direct:.2e}")
    assert diff_folder <= TOL and diff_direct <= TOL
    if tie:
        assert model.lm_head.weight is model.embed_tokens.weight


def test_import_sharded_bf16_folder(tmp_path):
    """bf16 shards import losslessly into fp32 (compared with transformers loading the same folder in fp32)."""
    hf_model = random_hf_model("diff", tie=True, n_kv=2).to(torch.bfloat16)
    hf_model.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    model, _ = hf.import_hf(tmp_path / "src")
    assert model.embed_tokens.weight.dtype == torch.float32
    ids = tokens(vocab=89)
    with torch.no_grad():
        assert max_diff(model(ids), load_hf(tmp_path / "src", "eager")(ids).logits) <= TOL


@pytest.mark.parametrize("attention", ["diff", "baseline"])
@pytest.mark.parametrize("tie", [False, True])
def test_export_import_export_is_bit_identical(tmp_path, attention, tie):
    config = make_config(attention, 8, 4, 16, 3, tie, {"rope_theta": 20000})
    hf.export_hf(random_model(config, seed=3), None, tmp_path / "a")
    model, _ = hf.import_hf(tmp_path / "a")
    hf.export_hf(model, None, tmp_path / "b")
    assert (tmp_path / "a" / "config.json").read_bytes() == (tmp_path / "b" / "config.json").read_bytes()
    assert (tmp_path / "a" / "generation_config.json").read_bytes() == \
        (tmp_path / "b" / "generation_config.json").read_bytes()
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert ("lm_head.weight" in a) != tie  # the tied head is stored once


def test_import_maps_config_back(tmp_path):
    config = make_config("diff", 8, 4, 16, 3, True, {"rope_theta": 20000.0, "norm_eps": 1e-6, "lambda_std": 0.05})
    hf.export_hf(random_model(config), None, tmp_path / "a")
    model, _ = hf.import_hf(tmp_path / "a")
    back = model.config
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_seq_len",
                 "rope_theta", "norm_eps", "tie_embeddings", "attention", "lambda_init", "head_norm", "lambda_std"):
        assert getattr(back, name) == getattr(config, name), name
    assert json.loads((tmp_path / "a" / "config.json").read_text())["rope_theta"] == 20000.0  # for transformers 4.x


# Tokenizer ----------------------------------------------------------------------------------------
def train_bpe(path, vocab_size=300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    return tok


def test_export_with_bpe_tokenizer(tmp_path):
    tok = train_bpe(tmp_path / "tok")
    eos = tok.token_to_id("<|endoftext|>")
    config = make_config("diff", 4, 2, 16, 1, False, {}).replace(vocab_size=320)
    result = hf.export_hf(random_model(config), tmp_path / "tok", tmp_path / "out")
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(result.files) and not result.notes
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "tok" / "tokenizer.json").read_bytes()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "the lazy fox jumps"
    assert hf_tok(text).input_ids == tok.encode(text).ids
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == eos
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == eos
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == eos
    _, tok_path = hf.import_hf(out)
    assert tok_path == out / "tokenizer.json"


def test_export_with_this_projects_saved_bpe_tokenizer(tmp_path):
    from diff_transformer.data.tokenizer import BPETokenizer

    backend = train_bpe(tmp_path / "trained")
    BPETokenizer(backend).save(tmp_path / "run")  # tokenizer_meta.json + tokenizer.json, as a run folder holds
    config = make_config("baseline", 4, None, 16, 1, False, {}).replace(vocab_size=300)
    result = hf.export_hf(random_model(config), tmp_path / "run", tmp_path / "out")
    assert "tokenizer.json" in result.files and not result.notes
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf_tok("over the dog").input_ids == backend.encode("over the dog").ids
    assert hf_tok.eos_token_id == backend.token_to_id("<|endoftext|>")


def test_export_with_byte_tokenizer_sets_eos_and_notes_it(tmp_path):
    from diff_transformer.data.tokenizer import ByteTokenizer

    ByteTokenizer().save(tmp_path / "bytetok")
    config = make_config("baseline", 4, None, 16, 1, False, {}).replace(vocab_size=257)
    result = hf.export_hf(random_model(config), tmp_path / "bytetok", tmp_path / "out")
    assert "tokenizer.json" not in result.files and any("byte tokenizer" in n for n in result.notes)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == 256
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id == 256
    with pytest.raises(UserError, match="does not belong"):  # 257 tokens > 101
        hf.export_hf(random_model(make_config("baseline", 4, None, 16, 1, False, {})), tmp_path / "bytetok",
                     tmp_path / "out2")


def test_export_without_any_tokenizer_notes_it(tmp_path):
    (tmp_path / "empty").mkdir()
    model = random_model(make_config("diff", 4, None, 16, 1, False, {}))
    for tok in (None, tmp_path / "empty"):
        result = hf.export_hf(model, tok, tmp_path / f"out-{tok is None}")
        assert "tokenizer.json" not in result.files and any("tokenizer" in n for n in result.notes)


def test_export_refuses_a_tokenizer_larger_than_the_vocab(tmp_path):
    train_bpe(tmp_path / "tok")  # 300 tokens > 101
    with pytest.raises(UserError, match="does not belong"):
        hf.export_hf(random_model(make_config("diff", 4, None, 16, 1, False, {})), tmp_path / "tok", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# Refusals -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes,match", [
    ({"attention": "diff_v2"}, "DIFF V2"),
    ({"attention": "diff", "head_norm": False}, "per-head norm"),
    ({"attention": "baseline", "head_norm": True}, "per-head norm"),
    ({"attention": "diff", "lambda_init": 0.5}, "λ_init"),
    ({"attention": "baseline", "dim": 70, "head_dim": 16}, "divisible"),
])
def test_export_refuses_what_transformers_cannot_represent(tmp_path, changes, match):
    changes = dict(changes)
    config = make_config(changes.pop("attention"), 4, None, 16, 2, False, changes)
    model = random_model(config)
    with pytest.raises(UserError, match=match):
        hf.export_hf(model, None, tmp_path / "out")
    with pytest.raises(UserError, match=match):
        hf.to_transformers(model)
    assert not (tmp_path / "out").exists()


def test_constant_lambda_init_equal_to_the_schedule_exports():
    config = make_config("diff", 4, None, 16, 1, False, {"lambda_init": 0.8 - 0.6})  # the schedule at layer 0
    model = random_model(config)
    ids = tokens()
    with torch.no_grad():
        assert max_diff(model(ids), hf.to_transformers(model)(ids).logits) <= TOL


def test_export_never_overwrites(tmp_path):
    model = random_model(make_config("diff", 4, None, 16, 1, False, {}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        hf.export_hf(model, None, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="already exists"):
        hf.export_hf(model, None, tmp_path / "file")
    (out / "keep.txt").unlink()
    hf.export_hf(model, None, out)  # an empty folder is fine
    assert (out / "model.safetensors").is_file()


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    def boom(path):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hf, "_add_legacy_rope_theta", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        hf.export_hf(random_model(make_config("diff", 4, None, 16, 1, False, {})), None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def save_hf_config(path, attention="diff", **changes):
    cls = transformers.DiffLlamaConfig if attention == "diff" else transformers.LlamaConfig
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8)
    cls(**{**base, **changes}).save_pretrained(path)
    return path


@pytest.mark.parametrize("attention,changes,match", [
    ("diff", {"attention_bias": True}, "attention_bias"),
    ("baseline", {"mlp_bias": True}, "mlp_bias"),
    ("diff", {"hidden_act": "gelu"}, "hidden_act"),
    ("baseline", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "RoPE 'linear'"),
    ("baseline", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                      "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
])
def test_import_refuses_configs_it_cannot_map(tmp_path, attention, changes, match):
    src = save_hf_config(tmp_path / "src", attention, **changes)
    with pytest.raises(UserError, match=match):
        hf.import_hf(src)


def test_import_refuses_other_architectures(tmp_path):
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UserError, match="model_type 'gpt2'"):
        hf.import_hf(tmp_path / "gpt2")


def test_import_refuses_pickled_weights(tmp_path):
    src = save_hf_config(tmp_path / "src")
    (src / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match="pickled"):
        hf.import_hf(src)


def test_import_refuses_missing_folder_or_weights(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        hf.import_hf(tmp_path)
    with pytest.raises(UserError, match="no model.safetensors"):
        hf.import_hf(save_hf_config(tmp_path / "src"))


def test_import_refuses_mismatched_weights(tmp_path):
    hf_model = random_hf_model("diff", tie=False, n_kv=2)
    hf_model.save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(UserError, match="mlp"):
        hf.import_hf(tmp_path / "src")


def test_from_transformers_refuses_the_bare_decoder():
    hf_model = random_hf_model("baseline", tie=False, n_kv=2)
    with pytest.raises(UserError, match="lm_head"):
        hf.from_transformers(hf_model.model)


def test_missing_transformers_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'diff-transformer\[hf\]'"):
        hf.to_transformers(random_model(make_config("diff", 4, None, 16, 1, False, {})))


def test_core_package_does_not_import_transformers():
    code = "import sys, diff_transformer, diff_transformer.hf; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
