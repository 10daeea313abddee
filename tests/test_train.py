"""Trainer, optimizer, schedule, checkpoints and compare, on the CPU with a tiny model and a byte tokenizer."""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diff_transformer import DiffTransformerLM, load, preset
from diff_transformer.config import ConfigError
from diff_transformer.data import DataConfig
from diff_transformer.errors import UserError
from diff_transformer.train import checkpoint as ckpt
from diff_transformer.train import rundir
from diff_transformer.train.compare import compare, matched_models
from diff_transformer.train.config import RunConfig, TrainConfig, apply_overrides
from diff_transformer.train.optim import build_optimizer, lr_at, no_decay
from diff_transformer.train.trainer import Preempted, Trainer, TrainingDiverged, run_training

from conftest import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), n_docs=12)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def small_run(corpus: Path, **train) -> RunConfig:
    settings = dict(batch_size=8, seq_len=32, steps=8, lr=3e-3, warmup_steps=2, eval_every=4, eval_batches=2,
                    ckpt_every=2, keep_last=2, log_every=1)
    settings.update(train)
    return RunConfig(model=preset("tiny", dim=64, n_layers=2, n_heads=4, max_seq_len=64),
                     train=TrainConfig(**settings), data=DataConfig(source=str(corpus), tokenizer="byte"),
                     preset="tiny")


def losses(metrics: list[dict]) -> list[tuple]:
    """Every loss-bearing record, without wall-clock figures."""
    out = []
    for m in metrics:
        if m["kind"] == "train":
            out.append(("train", m["step"], m["loss"], m["grad_norm"], m["lr"]))
        elif m["kind"] == "eval":
            out.append(("eval", m["step"], m["val_loss"], tuple(m["lambdas"] or ())))
    return out


def tensors_equal(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def quiet(*a, **k):
    return None


# Configuration ------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,needle", [
    ("batch_size", 0, "train.batch_size"),
    ("keep_last", 1, "keep_last must be >= 2"),
    ("schedule", "exp", "train.schedule"),
    ("grad_accum", 3, "not divisible by train.grad_accum"),
    ("steps", 0, "train.steps"),
    ("lr", -1.0, "train.lr"),
    ("dtype", "fp16", "train.dtype"),
    ("compile", "maybe", "train.compile='maybe' is not one of"),
    ("compile", 1.5, "train.compile"),
    ("fsdp_reshard", "sometimes", "train.fsdp_reshard"),
    ("fsdp_reshard", True, "train.fsdp_reshard"),
    ("fsdp_blocks_per_unit", 0, "train.fsdp_blocks_per_unit must be a positive integer"),
    ("fsdp_blocks_per_unit", 2.5, "train.fsdp_blocks_per_unit"),
    ("fsdp_blocks_per_unit", 2**70, "train.fsdp_blocks_per_unit"),
])
def test_train_config_rejects_bad_values(field, value, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        TrainConfig(**{field: value})


def test_overrides_coerce_resolve_and_rederive():
    run = RunConfig()
    new = apply_overrides(run, ["lr=1e-3", "model.dim=64", "train.compile=true", "tokens=1e6", "schedule=linear",
                                "data.tokenizer=byte", "vocab_size=300", "model.n_kv_heads=2"])
    assert new.train.lr == 1e-3 and new.train.compile is True and new.train.tokens == 1_000_000
    assert new.train.schedule == "linear" and new.data.tokenizer == "byte" and new.data.vocab_size == 300
    assert new.model.dim == 64 and new.model.head_dim == 16 and new.model.ffn_dim == 192  # derived again
    assert new.model.n_kv_heads == 2
    assert apply_overrides(new, ["tokens=none"]).train.tokens is None
    assert run.train.lr != 1e-3  # the original is untouched


@pytest.mark.parametrize("item,needle", [
    ("nope=1", "no model, train or data field"),
    ("lr=fast", "expected float"),
    ("steps=1.5", "expected int"),
    ("schedule=exp", "choose one of"),
    ("compile=maybe", "expected bool"),
    ("fsdp_reshard=sometimes", "choose one of"),
    ("fsdp_blocks_per_unit=x", "expected int"),
    ("model.vocab_size=10", "set from the tokenizer"),
    ("optim.lr=1", "unknown section"),
    ("lr", "expected key=value"),
    ("seq_len=4096", "exceeds model.max_seq_len"),
])
def test_overrides_reject_bad_input(item, needle):
    with pytest.raises(UserError, match=needle):
        apply_overrides(RunConfig(), [item])


def test_run_config_json_round_trip(tmp_path):
    run = apply_overrides(RunConfig(), ["model.n_layers=3", "lr=2e-3", "data.source=x.txt"])
    path = tmp_path / "run.json"
    path.write_text(run.to_json())
    back = RunConfig.from_json(path)
    assert back == run and back.differences(run) == []
    assert back.differences(apply_overrides(run, ["lr=1e-3"])) == ["train.lr"]
    path.write_text(json.dumps({"model": {"dim": 64}, "optim": {}}))
    with pytest.raises(UserError, match="unknown section"):
        RunConfig.from_json(path)


def test_compile_defaults_to_auto_which_is_off_on_the_cpu(corpus, cache, tmp_path):
    assert TrainConfig().compile == "auto"
    run = small_run(corpus, steps=2, eval_every=0, ckpt_every=0)
    run_training(run, tmp_path / "run", data_cache=cache, progress=False, log=quiet)
    summary = [m for m in rundir.read_metrics(tmp_path / "run") if m["kind"] == "summary"]
    assert summary[-1]["compiled"] is False
    with pytest.raises(ConfigError, match="train.compile='yes'"):
        TrainConfig(compile="yes")


def test_compiled_blocks_share_their_compiled_code(corpus, cache, tmp_path, monkeypatch):
    """`train.compile`: every layer's block runs the same compiled code, with the instrumentation on. The
    o_proj hook once held its layer index in a closure: each layer then compiled again, past
    torch.compile's limit of 8, and DIFF at `base` trained at 0.63x its eager speed on an H200."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    compile_block = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_block(self, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    run = small_run(corpus, steps=4, eval_every=2, ckpt_every=0, log_every=2, compile=True)
    run = run.replace(model=run.model.replace(n_layers=10))
    run_training(run, tmp_path / "run", data_cache=cache, progress=False, log=quiet)
    # One graph per (grad mode, instrumenting) and one after the attention backend's first lookup; ten
    # would be one per layer.
    assert 1 <= counters["stats"]["unique_graphs"] <= 5, dict(counters["stats"])
    records = [m for m in rundir.read_metrics(tmp_path / "run") if m["kind"] == "train"]
    assert all(len(m["o_proj_in_rms"]) == 10 and all(v is not None and v > 0 for v in m["o_proj_in_rms"])
               for m in records)
    torch._dynamo.reset()


# Optimizer and schedule ------------------------------------------------------------------------------
def test_schedule_warmup_then_decay():
    cfg = TrainConfig(steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # cosine midpoint between 1 and 0.1
    assert lr_at(110, cfg) == pytest.approx(0.1)
    lin = TrainConfig(steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.0, schedule="linear")
    assert lr_at(35, lin) == pytest.approx(0.75)
    assert lr_at(80, TrainConfig(steps=110, warmup_steps=10, lr=1.0, schedule="constant")) == 1.0


def test_weight_decay_skips_norms_lambdas_and_embeddings():
    model = DiffTransformerLM(preset("tiny", n_layers=1, vocab_size=64))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.05))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {n: id(p) in decayed for n, p in model.named_parameters()}
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[1]["weight_decay"] == 0.0
    assert names["layers.0.self_attn.q_proj.weight"] and names["layers.0.mlp.down_proj.weight"]
    assert names["lm_head.weight"]
    for n in ("embed_tokens.weight", "norm.weight", "layers.0.input_layernorm.weight",
              "layers.0.self_attn.lambda_q1", "layers.0.self_attn.head_norm.weight"):
        assert not names[n], n
    assert no_decay("x.lambda_k2", torch.zeros(4)) and not no_decay("x.lambda_proj.weight", torch.zeros(4, 4))


# Training ----------------------------------------------------------------------------------------------
def test_training_lowers_validation_loss_and_writes_a_run(tmp_path, corpus, cache):
    run = small_run(corpus, steps=30, eval_every=15, ckpt_every=15, seq_len=64, batch_size=8)
    res = run_training(run, tmp_path / "run", data_cache=cache, progress=False, log=quiet)
    evals = [m for m in res.metrics if m["kind"] == "eval"]
    assert [e["step"] for e in evals] == [0, 15, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0  # from ~ln(257) = 5.55 to well below
    assert len(evals[-1]["lambdas"]) == 2
    run_dir = tmp_path / "run"
    assert RunConfig.from_json(run_dir / "run.json").model.vocab_size == 257
    assert [p.name for p in ckpt.complete_checkpoints(run_dir)] == ["step_00000015", "step_00000030"]
    assert rundir.read_metrics(run_dir)[-1]["kind"] == "summary"
    # Nothing but safetensors and JSON in a checkpoint.
    for f in ckpt.checkpoint_path(run_dir, 30).iterdir():
        assert f.suffix in (".safetensors", ".json") or f.name == ckpt.MARKER, f.name
    model, tok = load(run_dir)
    assert tok.decode(tok.encode("State of the Union")) == "State of the Union"
    direct = DiffTransformerLM.from_pretrained(ckpt.checkpoint_path(run_dir, 30))
    x = torch.tensor([tok.encode("Fellow citizens")])
    assert torch.equal(model(x), direct(x))


def _sigterm_at(monkeypatch, step: int):
    """Deliver SIGTERM to this process during training step ``step`` (1-based)."""
    orig = Trainer.train_step

    def train_step(self):
        out = orig(self)
        if self.step + 1 == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_sigterm_saves_and_resume_is_bitwise_identical(tmp_path, corpus, cache, monkeypatch):
    run = small_run(corpus, steps=10, grad_accum=2, ckpt_every=4, eval_every=3)
    full = run_training(run, tmp_path / "full", data_cache=cache, progress=False, log=quiet)
    _sigterm_at(monkeypatch, 6)
    with pytest.raises(Preempted) as info:
        run_training(run, tmp_path / "cut", data_cache=cache, progress=False, log=quiet)
    assert info.value.step == 6 and info.value.exit_code == 75
    assert (ckpt.checkpoint_path(tmp_path / "cut", 6) / ckpt.MARKER).is_file()
    monkeypatch.undo()
    resumed = run_training(run, tmp_path / "cut", data_cache=cache, progress=False, log=quiet)
    assert resumed.status == "completed"
    assert losses(resumed.metrics) == losses(full.metrics)
    assert losses(rundir.read_metrics(tmp_path / "cut")) == losses(rundir.read_metrics(tmp_path / "full"))
    a, b = ckpt.checkpoint_path(tmp_path / "full", 10), ckpt.checkpoint_path(tmp_path / "cut", 10)
    assert tensors_equal(a / "model.safetensors", b / "model.safetensors")
    assert tensors_equal(a / "optimizer.safetensors", b / "optimizer.safetensors")
    again = run_training(run, tmp_path / "cut", data_cache=cache, progress=False, log=quiet)
    assert again.status == "already_complete"


def test_checkpoint_verification_fallback_and_retention(tmp_path, corpus, cache):
    run = small_run(corpus, steps=6, ckpt_every=2, keep_last=3)
    run_dir = tmp_path / "run"
    run_training(run, run_dir, data_cache=cache, progress=False, log=quiet)
    assert [ckpt.step_of(p) for p in ckpt.complete_checkpoints(run_dir)] == [2, 4, 6]
    newest = ckpt.checkpoint_path(run_dir, 6)
    manifest = json.loads((newest / ckpt.MANIFEST).read_text())
    assert set(manifest["files"]) >= {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "config.json"}
    ckpt.verify(newest)
    # Flip one byte of the newest checkpoint's weights.
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.verify(newest)
    msg = str(info.value)
    assert "model.safetensors" in msg and manifest["files"]["model.safetensors"]["sha256"] in msg
    assert ckpt.sha256(weights) in msg
    # Auto-resume falls back to the previous good checkpoint with a warning.
    warned = []
    with pytest.warns(ckpt.CheckpointWarning):
        assert rundir.resolve_resume(run_dir, "auto", True, warned.append) == ckpt.checkpoint_path(run_dir, 4)
    assert "step_00000006" in warned[0]
    # An explicit path to the corrupt one is refused.
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        rundir.resolve_resume(run_dir, str(newest), True, quiet)
    # An interrupted save (no marker) is never used, and a truncated file is caught.
    (ckpt.checkpoint_path(run_dir, 8)).mkdir()
    assert ckpt.complete_checkpoints(run_dir)[-1] == newest
    opt = ckpt.checkpoint_path(run_dir, 2) / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match="optimizer.safetensors"):
        ckpt.verify(ckpt.checkpoint_path(run_dir, 2))
    # Retention keeps exactly keep_last complete checkpoints and drops stale partial saves.
    ckpt.prune(run_dir, 2)
    assert [ckpt.step_of(p) for p in ckpt.complete_checkpoints(run_dir)] == [4, 6]
    assert ckpt.checkpoint_path(run_dir, 8).exists()  # newer than every complete one: maybe in progress


def test_nonfinite_steps_are_skipped_then_rolled_back_or_stopped(tmp_path, corpus, cache, monkeypatch):
    run = small_run(corpus, steps=12, ckpt_every=4, eval_every=0, max_bad_steps=2)
    bad_steps = {6, 7, 8}  # 1-based training steps whose loss is NaN
    orig = Trainer._loss
    seen = {}

    def loss(self, x, y, reduction="mean"):
        out = orig(self, x, y, reduction)
        if torch.is_grad_enabled() and self.step + 1 in bad_steps:
            seen.setdefault(self.step + 1, ({k: v.clone() for k, v in self.model.state_dict().items()},
                                            {k: v["exp_avg"].clone() for k, v in self.optimizer.state.items()}))
            return out * float("nan")
        return out

    monkeypatch.setattr(Trainer, "_loss", loss)
    res = run_training(run, tmp_path / "roll", data_cache=cache, progress=False, log=quiet)
    events = [m for m in res.metrics if m["kind"] == "event"]
    assert [(e["event"], e["step"]) for e in events] == [("nonfinite", 6), ("nonfinite", 7), ("rollback", 7),
                                                          ("nonfinite", 8)]
    assert events[2]["to_step"] == 4
    # Step 6 changed nothing: the weights before step 7 equal those before step 6.
    before6, before7 = seen[6], seen[7]
    assert all(torch.equal(before6[0][k], before7[0][k]) for k in before6[0])
    assert all(torch.equal(before6[1][k], before7[1][k]) for k in before6[1])
    assert res.status == "completed" and res.step == 12
    assert json.loads((ckpt.checkpoint_path(tmp_path / "roll", 12) / ckpt.STATE).read_text())["bad_steps_total"] == 3
    stop = apply_overrides(run, ["on_bad_steps=stop"])
    with pytest.raises(TrainingDiverged, match="2 consecutive steps"):
        run_training(stop, tmp_path / "stop", data_cache=cache, progress=False, log=quiet)


def test_output_folder_of_another_run_is_refused_untouched(tmp_path, corpus, cache):
    run = small_run(corpus, steps=2, ckpt_every=0)
    run_dir = tmp_path / "run"
    run_training(run, run_dir, data_cache=cache, progress=False, log=quiet)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=r"holds another run \(differs in train.lr"):
        run_training(apply_overrides(run, ["lr=1e-4"]), run_dir, data_cache=cache, progress=False, log=quiet)
    other = small_run(corpus, steps=2)
    other = other.replace(model=other.model.replace(dim=32))
    with pytest.raises(ckpt.CheckpointError, match="another model config"):
        run_training(other, tmp_path / "new", resume=str(ckpt.checkpoint_path(run_dir, 2)), data_cache=cache,
                     progress=False, log=quiet)
    assert not (tmp_path / "new").exists()
    from diff_transformer.data import BPETokenizer, ByteTokenizer

    assert ckpt.same_tokenizer(ckpt.checkpoint_path(run_dir, 2), ByteTokenizer())
    bpe = BPETokenizer.train(["a few words of text to learn merges from"] * 20, vocab_size=300)
    assert not ckpt.same_tokenizer(ckpt.checkpoint_path(run_dir, 2), bpe)
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert before == after


def test_loading_never_unpickles(tmp_path):
    target = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (target,))

    folder = tmp_path / "model"
    DiffTransformerLM(preset("tiny", n_layers=1, vocab_size=300)).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UserError):
        load(folder)
    assert not target.exists()


def test_compare_matched_pair_same_data_and_init(tmp_path, corpus, cache, capsys):
    run = small_run(corpus, steps=4, eval_every=2, ckpt_every=0)
    logged = []
    summary = compare(run, tmp_path / "cmp", seeds=[1, 2], data_cache=cache, progress=False, log=logged.append)
    out = capsys.readouterr().out
    assert "DIFF" in out and "baseline" in out and "±" in out
    assert set(summary["runs"]) == {"seed_1/diff", "seed_1/baseline", "seed_2/diff", "seed_2/baseline"}
    assert json.loads((tmp_path / "cmp" / "summary.json").read_text(), parse_constant=lambda c: 1 / 0)  # no NaN
    for name in ("loss_curves.png", "lambda.png", "loss_gap.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0
    progress = [m for m in logged if m.startswith("[compare] run ")]
    assert [m.split(":")[0] for m in progress] == [f"[compare] run {k} of 4" for k in range(1, 5)]
    assert all("ETA" in m for m in progress[1:])  # from the second run on, the ETA of the rest
    # The gap: paired by seed, with its Student-t interval, p-value and where (if anywhere) DIFF catches up.
    gap = summary["gap"]
    assert gap["per_seed"] == pytest.approx([summary["runs"][f"seed_{s}/diff"]["final_val_loss"]
                                             - summary["runs"][f"seed_{s}/baseline"]["final_val_loss"] for s in (1, 2)])
    assert gap["ci_low"] < gap["mean"] < gap["ci_high"] and 0 <= gap["p_value"] <= 1
    assert summary["gap_curve"]["tokens"] == [0, 2 * 8 * 32, 4 * 8 * 32]
    assert "DIFF catches up with baseline: " in out and "epochs of" in out and "median optimizer-step" in out
    assert ("compared: DIFF V1 with the paper's per-head norm at gain 1, λ_init depth schedule, hf init "
            "vs softmax baseline, hf init") in out
    assert ("note: at small scale the per-head norm's initial gain of 1 decides most of DIFF's gap, and at 30M "
            "parameters it closes with 3-4x the tokens (docs/ablations.md)") in out
    assert summary["epochs"] == pytest.approx(4 * 8 * 32 / summary["unique_train_tokens"])
    m = summary["models"]
    assert m["diff"]["params"] - m["baseline"]["params"] == 2 * 6 * run.model.head_dim  # λ vectors + head norm: 6d a layer
    assert all(math.isfinite(m[k]["val_loss_mean"]) for k in m)
    d = RunConfig.from_json(tmp_path / "cmp" / "seed_1" / "diff" / "run.json")
    b = RunConfig.from_json(tmp_path / "cmp" / "seed_1" / "baseline" / "run.json")
    assert d.differences(b) == ["model.attention", "model.head_norm"]
    # Shared parameters start equal: the step-2 checkpoints are not equal, but the init is.
    wd = DiffTransformerLM(d.model, seed=d.train.seed).state_dict()
    wb = DiffTransformerLM(b.model, seed=b.train.seed).state_dict()
    shared = set(wd) & set(wb)
    assert "layers.0.self_attn.q_proj.weight" in shared and all(torch.equal(wd[k], wb[k]) for k in shared)
    with pytest.raises(UserError, match="holds another compare"):
        compare(run, tmp_path / "cmp", seeds=[1, 3], data_cache=cache, progress=False, log=quiet)
    with pytest.raises(UserError, match="differs in variants"):
        compare(run, tmp_path / "cmp", seeds=[1, 2], variants=["diff", "diff-no-norm"], data_cache=cache,
                progress=False, log=quiet)
    with pytest.raises(UserError, match="two different variant names"):
        compare(run, tmp_path / "new", seeds=[1], variants=["diff", "diff"], data_cache=cache, log=quiet)
    with pytest.raises(UserError, match="unknown variant"):
        compare(run, tmp_path / "new", seeds=[1], variants=["diff", "nope"], data_cache=cache, log=quiet)
    assert not (tmp_path / "new").exists()


def test_matched_models_keep_an_explicit_head_norm_ablation():
    diff, base = matched_models(preset("tiny", head_norm=False))
    assert (diff.attention, diff.head_norm, base.attention, base.head_norm) == ("diff", False, "baseline", False)
    diff, base = matched_models(preset("tiny"))
    assert diff.head_norm is True and base.head_norm is False
    diff, base = matched_models(preset("tiny", attention="diff_v2"))
    assert diff.attention == "diff_v2" and base.attention == "baseline"


def test_compare_two_named_variants(tmp_path, corpus, cache, capsys):
    run = small_run(corpus, steps=2, eval_every=1, ckpt_every=0)
    summary = compare(run, tmp_path / "cmp", seeds=[1], variants=["diff", "diff-no-norm"], data_cache=cache,
                      progress=False, log=quiet)
    out = capsys.readouterr().out
    assert summary["order"] == ["diff", "diff-no-norm"] and "val_loss_gap_diff_minus_baseline" not in summary
    assert RunConfig.from_json(tmp_path / "cmp" / "seed_1" / "diff-no-norm" / "run.json").model.head_norm is False
    assert "compared: DIFF V1 with the paper's per-head norm at gain 1" in out and "vs DIFF V1 with no per-head norm" in out
    assert summary["gap"]["n"] == 1 and summary["gap"]["ci_low"] is None  # one seed: no interval
    assert "val loss diff − diff-no-norm" in out


# Profiling --------------------------------------------------------------------------------------
def test_profile_steps_writes_trace_and_table_without_changing_training(corpus, cache, tmp_path):
    plain = run_training(small_run(corpus), tmp_path / "plain", data_cache=cache, progress=False, log=quiet)
    lines = []
    traced = run_training(small_run(corpus, profile_steps=2), tmp_path / "traced", data_cache=cache,
                          progress=False, log=lines.append)
    assert losses(traced.metrics) == losses(plain.metrics)  # the trace observes; it changes nothing
    folder = tmp_path / "traced" / "profile"
    assert any("profile of 2 steps written to" in line for line in lines)
    summary = json.loads((folder / "rank0.json").read_text())
    assert summary["steps"] == 2 and summary["clock"] == "CPU" and summary["self_us_total"] > 0
    ops = [row["op"] for row in summary["top"]]
    assert any(op.startswith("aten::") for op in ops) and len(ops) <= 40
    assert "self CPU time by operator" in (folder / "rank0.txt").read_text()
    trace = json.loads((folder / "rank0.trace.json").read_text())
    assert trace["traceEvents"]
    assert not (tmp_path / "plain" / "profile").exists()
    # a session too short for the window says so and writes nothing
    lines.clear()
    run_training(small_run(corpus, steps=4, profile_steps=2), tmp_path / "short", data_cache=cache,
                 progress=False, log=lines.append)
    assert any("no profile will be written" in line for line in lines)
    assert not (tmp_path / "short" / "profile").exists()
    with pytest.raises(ConfigError, match="train.profile_steps"):
        TrainConfig(profile_steps=-1)
