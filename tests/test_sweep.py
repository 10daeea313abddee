"""`diff-transformer sweep`, its statistics and FLOPs, and the trainer's instrumentation, on the CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from diff_transformer.cli import main
from diff_transformer.config import preset
from diff_transformer.data import DataConfig, prepare_dataset
from diff_transformer.train import rundir
from diff_transformer.train.compare import gap_curve
from diff_transformer.train.config import RunConfig, TrainConfig
from diff_transformer.train.stats import (catch_up, dumps, flops_per_token, interpolate, non_embedding_params,
                                          paired_difference, t_quantile, t_two_sided_p)
from diff_transformer.train.trainer import Trainer

from conftest import snapshot, strict_json, write_corpus

TINY = ["model.n_layers=1", "model.dim=32", "data.tokenizer=byte", "steps=4", "batch_size=2", "seq_len=16",
        "eval_every=2", "eval_batches=1", "log_every=1", "ckpt_every=0", "warmup_steps=1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), n_docs=12)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


# Statistics ------------------------------------------------------------------------------------------
def test_student_t_against_closed_forms_and_tables():
    # Table values of t(0.975, dof).
    for dof, value in ((1, 12.7062047), (2, 4.3026527), (4, 2.7764451), (10, 2.2281389), (30, 2.0422725)):
        assert t_quantile(0.975, dof) == pytest.approx(value, abs=1e-6)
    # Closed forms: dof 1 (Cauchy) p = 1 - 2/π·atan|t|; dof 2: p = 1 - |t| / sqrt(2 + t²).
    for t in (0.1, 1.0, 3.0, 25.0):
        assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-9)
        assert t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
    assert t_two_sided_p(2.0, 5) == pytest.approx(0.1019395, abs=1e-6)


def test_paired_difference_by_hand():
    d = paired_difference([1.0, 2.0, 3.5], [0.5, 1.2, 2.0])  # differences 0.5, 0.8, 1.5
    mean = 2.8 / 3
    sd = math.sqrt(((0.5 - mean) ** 2 + (0.8 - mean) ** 2 + (1.5 - mean) ** 2) / 2)
    half = 4.302652729749 * sd / math.sqrt(3)
    t = mean / (sd / math.sqrt(3))
    assert d["n"] == 3 and d["mean"] == pytest.approx(mean) and d["std"] == pytest.approx(sd)
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((mean - half, mean + half))
    assert d["p_value"] == pytest.approx(1 - t / math.sqrt(2 + t * t))
    one = paired_difference([1.0], [0.5])
    assert one["n"] == 1 and one["mean"] == 0.5 and one["ci_low"] is None and one["p_value"] is None
    assert paired_difference([1.0, None], [0.0, 2.0])["n"] == 1  # a missing run drops its seed


def test_flops_per_token_by_hand():
    base = preset("tiny", n_layers=1, dim=32, vocab_size=257, attention="baseline")
    diff = base.replace(attention="diff")
    # d = 8, ffn 96 (8/3·32 rounded up to 32): q,k,v,o 4·32·32, SwiGLU 3·32·96, two pre-norms and the final norm.
    p_base = 4 * 32 * 32 + 3 * 32 * 96 + 2 * 32 + 32
    p_diff = p_base + 4 * 8 + 2 * 8  # λ vectors (4 d) and the per-head norm (2 d)
    assert non_embedding_params(base) == p_base and non_embedding_params(diff) == p_diff
    assert flops_per_token(base, 16) == 6 * p_base + 12 * 1 * 16 * 32
    assert flops_per_token(diff, 16) == pytest.approx(6 * p_diff + 12 * 1 * 16 * 32 * 16 / 14)
    assert flops_per_token(base.replace(attention="diff_v2"), 16) == pytest.approx(
        6 * non_embedding_params(base.replace(attention="diff_v2")) + 2 * 12 * 16 * 32)


def test_catch_up_and_gap_curve_on_synthetic_curves():
    xs = [0, 10, 20, 30, 40, 50]
    assert catch_up(xs, [0.3, 0.1, -0.05, 0.02, -0.01, -0.02]) == 40
    assert catch_up(xs, [0.3, 0.2, 0.1, 0.05, 0.02, 0.01]) is None
    assert catch_up(xs, [-0.1] * 6) == 0
    assert catch_up(xs, [0.1, -0.1, None, -0.1, -0.1, -0.1]) == 30  # a missing point breaks the streak

    def run(values):
        return {"eval_curve": [[s, v] for s, v in zip((0, 5, 10), values)], "tokens_per_step": 64}

    first = {1: run([5.0, 4.0, 3.0]), 2: run([5.2, 4.2, 2.8])}
    second = {1: run([5.0, 3.8, 3.1]), 2: run([5.0, 4.0, 3.0])}
    c = gap_curve(first, second)
    assert c["tokens"] == [0, 320, 640]
    assert c["mean"] == pytest.approx([0.1, 0.2, -0.15])
    assert c["std"] == pytest.approx([math.sqrt(0.02), 0.0, math.sqrt(0.005)])
    assert c["catch_up_tokens"] == 640
    assert interpolate([0, 10, 20], [5.0, 4.0, 2.0], 15) == pytest.approx(3.0)
    assert interpolate([0, 10, 20], [5.0, 4.0, 2.0], 21) is None


def test_json_never_holds_nan():
    text = dumps({"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": {"d": (math.nan,)}})
    assert json.loads(text) == {"a": None, "b": [None, None, 1.5], "c": {"d": [None]}}


# Instrumentation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["diff", "baseline"])
def test_instrumentation_matches_a_manual_computation(tmp_path, corpus, cache, attention):
    run = RunConfig(model=preset("tiny", dim=32, n_layers=2, n_heads=4, vocab_size=257, attention=attention),
                    train=TrainConfig(batch_size=4, seq_len=16, steps=3, grad_accum=2, log_every=2, eval_every=0,
                                      ckpt_every=0, grad_clip=1e-3, warmup_steps=0),
                    data=DataConfig(source=str(corpus), tokenizer="byte"))
    dataset = prepare_dataset(run.data, cache)
    trainer = Trainer(run, dataset, tmp_path / "run", progress=False, log=lambda m: None)
    if attention == "diff":
        with torch.no_grad():  # known gains
            trainer.model.layers[0].self_attn.head_norm.weight.fill_(1.5)
            trainer.model.layers[1].self_attn.head_norm.weight.copy_(torch.linspace(0.0, 1.0, 16))
    # The manual RMS: the input of o_proj on the step's two micro-batches, with this step's weights.
    x, _ = trainer.batches.batch(0)
    seen = {i: [] for i in range(2)}
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda m, a, i=i: seen[i].append(a[0].detach().pow(2).mean())) for i, layer in enumerate(trainer.model.layers)]
    with torch.no_grad():
        for xm in x.split(2):
            trainer.model(xm)
    for h in hooks:
        h.remove()
    manual = [math.sqrt(float(torch.stack(seen[i]).mean())) for i in range(2)]
    trainer._instrumenting = True
    trainer.train_step()
    trainer._instrumenting = False
    got = trainer.instruments()
    assert got["o_proj_in_rms"] == pytest.approx(manual, rel=1e-5)
    assert got["head_norm_gain"] == (pytest.approx([1.5, 0.5]) if attention == "diff" else [None, None])
    # Not recorded outside log steps: the sums stay at zero between them.
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.train_step()
    assert all(layer.self_attn.o_proj._sq_count.item() == 0 for layer in trainer.model.layers)
    # The training loop writes the keys on log steps only; grad_norm is before clipping (clip 1e-3).
    (tmp_path / "fit").mkdir()
    res = Trainer(run, dataset, tmp_path / "fit", progress=False, log=lambda m: None).fit()
    trains = [m for m in res.metrics if m["kind"] == "train"]
    assert [m["step"] for m in trains] == [2, 3]
    for m in trains:
        assert len(m["o_proj_in_rms"]) == 2 and all(v > 0 for v in m["o_proj_in_rms"])
        assert m["grad_norm"] > 1e-2 and m["step_seconds"] > 0 and m["train_seconds_total"] >= m["step_seconds"]
        assert (m["head_norm_gain"][0] is not None) == (attention == "diff")
    summary = rundir.read_metrics(tmp_path / "fit")[-1]
    assert summary["kind"] == "summary" and summary["median_step_seconds"] > 0 and summary["steps_timed"] == 3


# The sweep command -------------------------------------------------------------------------------------------
def test_sweep_runs_resumes_refuses_and_reports_failures(tmp_path, corpus, cache, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--variants", "baseline,diff", "--seeds", "1", "2", "--preset", "tiny", "--jobs", "2",
            "--data-cache", str(cache), "--set", *TINY, f"data.source={corpus}", "--out", str(out)]
    assert main(args) == 0
    io = capsys.readouterr()
    assert io.err.count("[sweep] run ") >= 4 and "run 4 of 4" in io.err and "ETA" in io.err
    for v in ("baseline", "diff"):
        for s in (1, 2):
            assert rundir.read_metrics(out / v / f"seed_{s}")[-1]["kind"] == "summary"
    summary = strict_json(out / "summary.json")
    g = summary["groups"]
    assert set(g) == {"baseline", "diff"} and g["diff"]["vs_reference"]["n"] == 2
    per_seed = [summary["runs"][f"diff/seed_{s}"]["final_val_loss"] - summary["runs"][f"baseline/seed_{s}"][
        "final_val_loss"] for s in (1, 2)]
    assert g["diff"]["vs_reference"]["mean"] == pytest.approx(sum(per_seed) / 2)
    assert g["diff"]["params"] - g["baseline"]["params"] == 6 * 8  # λ vectors + per-head norm, d = 8
    assert g["diff"]["flops_per_token"] > g["baseline"]["flops_per_token"]
    assert g["baseline"]["loss_at_reference_flops"]["mean"] == pytest.approx(g["baseline"]["val_loss_mean"])
    assert summary["epochs"] == pytest.approx(4 * 2 * 16 / summary["unique_train_tokens"])
    assert "Δ vs baseline" in io.out and "epochs" in io.out and "median optimizer-step time" in io.out
    sweep_json = (out / "sweep.json").read_bytes()

    # The same command again trains nothing and gives the same summary.
    before = snapshot(out)
    assert main(args) == 0
    err = capsys.readouterr().err
    assert err.count("already finished; skipped") == 4 and "->" not in err
    again = strict_json(out / "summary.json")
    for d in (summary, again):
        d.pop("wall_seconds_this_invocation")
    assert again == summary
    assert {k: v for k, v in snapshot(out).items() if k != "summary.json"} == {
        k: v for k, v in before.items() if k != "summary.json"}

    # Another sweep in the same folder is refused, one line, nothing touched.
    before = snapshot(out)
    assert main([*args[:-2], "lr=1e-4", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "another sweep" in err[0] and "train.lr" in err[0]
    assert main([*args[:2], "baseline,diff-no-norm", *args[3:]]) == 2
    assert "another sweep" in capsys.readouterr().err
    assert snapshot(out) == before and (out / "sweep.json").read_bytes() == sweep_json

    # A run that fails is reported with its exit code and last stderr line; the others go on; exit non-zero.
    (out / "diff" / "seed_2" / "metrics.jsonl").unlink()
    (out / "diff" / "seed_2" / "run.json").write_text("{broken")
    assert main(args) == 1
    io = capsys.readouterr()
    assert "run 4 of 4 FAILED: diff seed 2 exit 2: error: config file" in io.err
    assert "failed: diff seed 2 (exit 2): error: config file" in io.out
    report = strict_json(out / "summary.json")
    assert report["failed"][0]["exit_code"] == 2 and report["groups"]["diff"]["seeds_done"] == [1]


def test_sweep_bad_input_exit_2_nothing_written(tmp_path, corpus, cache, capsys):
    out = tmp_path / "new"
    base = ["sweep", "--preset", "tiny", "--data-cache", str(cache), "--set", *TINY, f"data.source={corpus}",
            "--out", str(out)]
    for extra, needle in (
        (["--variants", "baseline,nope"], "unknown variant 'nope'"),
        (["--variants", "diff,diff"], "distinct"),
        (["--variants", "diff,baseline", "--reference", "diff-v2"], "--reference diff-v2"),
        (["--variants", "diff", "--seeds", "1", "1"], "--seeds"),
        (["--variants", "diff", "--lrs", "0"], "--lrs"),
        (["--variants", "diff", "--jobs", "0"], "--jobs"),
    ):
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], (extra, err)
        assert not out.exists()


def test_sweep_with_lrs_lays_out_lr_folders_and_best_lr(tmp_path, corpus, cache, capsys):
    out = tmp_path / "lrs"
    assert main(["sweep", "--variants", "baseline,diff", "--seeds", "1", "--lrs", "1e-3", "3e-3", "--preset", "tiny",
                 "--data-cache", str(cache), "--set", *TINY, "steps=2", f"data.source={corpus}",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert (out / "diff" / "lr_0.003" / "seed_1" / "run.json").is_file()
    assert RunConfig.from_json(out / "diff" / "lr_0.001" / "seed_1" / "run.json").train.lr == 1e-3
    summary = strict_json(out / "summary.json")
    assert set(summary["groups"]) == {"baseline@0.001", "baseline@0.003", "diff@0.001", "diff@0.003"}
    best = summary["best_lr"]["diff"]
    losses = {lr: summary["groups"][f"diff@{lr:g}"]["val_loss_mean"] for lr in (1e-3, 3e-3)}
    assert best["lr"] == min(losses, key=losses.get)
    assert "own best lr" in text


def test_sigterm_stops_every_run_with_a_checkpoint_and_the_rerun_finishes(tmp_path, corpus, cache):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sweep"
    argv = [sys.executable, "-m", "diff_transformer.cli", "sweep", "--variants", "baseline,diff", "--seeds", "1",
            "--jobs", "2", "--preset", "tiny", "--data-cache", str(cache), "--set", *TINY, "steps=400",
            "eval_every=0", f"data.source={corpus}", "--out", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = [out / v / "seed_1" / "metrics.jsonl" for v in ("baseline", "diff")]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if all(m.is_file() and '"train"' in m.read_text() for m in metrics):
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "rerun the same command to resume" in err
    for v in ("baseline", "diff"):
        stopped = sorted((out / v / "seed_1" / "checkpoints").glob("step_*"))
        assert stopped and (stopped[-1] / "COMPLETE").is_file(), v
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    for v in ("baseline", "diff"):
        assert "resuming from" in (out / v / "seed_1" / "train.log").read_text()
        assert rundir.read_metrics(out / v / "seed_1")[-1]["step"] == 400


def test_sweep_of_a_scaled_variant_records_it_and_resumes(tmp_path, corpus, cache, capsys):
    """baseline-wide's head count is a fraction of the run's: sweep.json records it as text, and the rerun matches."""
    out = tmp_path / "wide"
    args = ["sweep", "--variants", "baseline,baseline-wide", "--seeds", "1", "--preset", "tiny", "--data-cache",
            str(cache), "--set", *TINY, "model.n_heads=4", "steps=2", f"data.source={corpus}", "--out", str(out)]
    assert main(args) == 0
    record = strict_json(out / "sweep.json")
    assert record["overrides"]["baseline-wide"]["model.n_heads"] == "1/2·n_heads"
    wide = RunConfig.from_json(out / "baseline-wide" / "seed_1" / "run.json").model
    assert (wide.n_heads, wide.head_dim) == (2, 16)
    before = snapshot(out / "baseline-wide")
    assert main(args) == 0  # the same sweep again: recognised, nothing retrained
    assert snapshot(out / "baseline-wide") == before
