"""The evaluation suite: the needle generator and scorers, the attention probe and the measurements
built on it (against hand-computed values and numpy), and `eval --task` / `eval-compare` end to end."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from diff_transformer import DiffTransformerLM, preset
from diff_transformer.attention.probe import AttentionProbe
from diff_transformer.cli import main
from diff_transformer.data import ByteTokenizer
from diff_transformer.data import synthetic as syn
from diff_transformer.evals import runner
from diff_transformer.evals.base import EvalContext
from diff_transformer.evals.common import probing

from conftest import snapshot, strict_json, write_corpus
from evals_helpers import model_folder

RUNNER = Path(__file__).with_name("fault_runner.py")

runner.load_tasks()
from diff_transformer.evals import attention_noise, long_nll, needle, outliers, perplexity, quantization  # noqa: E402

HAYSTACK = "The river ran past the old mill. Nobody knew why! Was it the wind? It rained all day.\n" * 60


def tiny_model(attention: str, n_layers: int = 2, seed: int = 0, **kw) -> DiffTransformerLM:
    cfg = preset("tiny", attention=attention, dim=32, n_layers=n_layers, n_heads=4, vocab_size=257,
                 max_seq_len=256, **kw)
    return DiffTransformerLM(cfg, seed=seed).eval()


def context_for(model, tokens=None, **options) -> EvalContext:
    tok = ByteTokenizer()
    docs = [HAYSTACK[:1500], HAYSTACK[1500:3200]]
    if tokens is None:
        tokens = np.array([t for d in docs for t in (*tok.encode(d), tok.eos_id)], dtype=np.int64)
    return EvalContext(model=model, tokenizer=tok, device=torch.device("cpu"), model_dir=Path("."), run_dir=None,
                       val_tokens=tokens, val_documents=docs, options={k: str(v) for k, v in options.items()},
                       progress=False)


# The needle generator and scorers ------------------------------------------------------------------
def test_needle_generator_deterministic_disjoint_depths_fits():
    assert len(syn.EVAL_CITIES) >= 60 and len(syn.TRAIN_CITIES) >= 60
    assert not set(syn.EVAL_CITIES) & set(syn.TRAIN_CITIES)
    rng = np.random.default_rng(0)
    nums = {p: syn.draw_numbers(rng, 200, p) for p in ("eval", "train")}
    assert not set(nums["eval"]) & set(nums["train"])
    assert all(syn.number_pool(n) == p and 10**6 <= n < 10**7 for p in nums for n in nums[p])

    tok = ByteTokenizer()
    hay = tok.encode(HAYSTACK)
    depths = [0.0, 0.5, 1.0, 0.25]
    make = lambda seed, pool="eval": syn.make_needle_example(np.random.default_rng(seed), hay, tok, 900, depths, 4, 2, pool)  # noqa: E731
    ex = make(1)
    assert ex == make(1) and ex != make(2)
    assert set(ex.cities) <= set(syn.EVAL_CITIES) and set(make(1, "train").cities) <= set(syn.TRAIN_CITIES)
    assert all(syn.number_pool(n) == "train" for n in make(3, "train").numbers)
    longest = max(len(c) for c in ex.candidate_ids())
    for prompt, answer, city in zip(ex.prompts, ex.answers, ex.cities):
        assert len(prompt) + longest <= 900
        assert tok.decode(prompt).endswith(syn.QUESTION_TEMPLATE.format(city=city))
        assert answer in tok.decode(ex.context)
    for i, (s, e) in enumerate(ex.number_spans):
        assert tok.decode(ex.context[s:e]) == f" {ex.numbers[i]}"
        ns, ne = ex.needle_spans[i]
        sentence = syn.NEEDLE_TEMPLATE.format(city=ex.cities[i], number=ex.numbers[i])
        assert tok.decode(ex.context[ns:ne]) == " " + sentence
        # placed at a sentence boundary near the depth asked: the text before it ends a sentence
        assert abs(ex.actual_depths[i] - depths[i]) <= 0.1
        before = tok.decode(ex.context[:ns]).rstrip(" ")
        assert ns == 0 or before.endswith((".", "!", "?", "\n"))
    with pytest.raises(ValueError):
        syn.make_needle_example(np.random.default_rng(0), hay[:50], tok, 900, depths, 4, 1, "eval")


def test_exact_match_accepts_only_the_number():
    assert needle.exact_match(" 4817263.", "4817263")
    assert needle.exact_match("4817263 is it", "4817263")
    assert not needle.exact_match(" 5817263.", "4817263")  # another needle's number
    assert not needle.exact_match(" 481726", "4817263")  # a prefix
    assert not needle.exact_match(" 48172631", "4817263")  # extra digits
    assert not needle.exact_match(" the number", "4817263")


def test_rank_scoring_with_rigged_logits():
    favourite = {0: 7, 1: 8}  # position offset after the prompt -> the token the fake model prefers

    class Rigged:
        def __call__(self, ids):  # (B, N) -> (B, N, V): at prompt position n-1+j, token favourite[j] wins
            logits = torch.zeros(*ids.shape, 16)
            for j, t in favourite.items():
                logits[:, 2 + j, t] = 5.0
            logits[:, 3, 9] = 4.0  # the second-best second token
            return logits

    prompt = [1, 2, 3]
    cands = [[7, 9], [7, 8], [5, 8], [7, 8, 8]]
    lps = needle.candidate_logprobs(Rigged(), prompt, cands, torch.device("cpu"))
    assert needle.rank_of(lps, 1) == 1
    assert needle.rank_of(lps, 0) == 2 and needle.rank_of(lps, 2) > 2
    assert needle.rank_of([0.0, 0.0], 0) == 2  # ties count against the right answer


@pytest.mark.parametrize("amp", [False, True])
def test_greedy_text_is_model_generate_greedy(amp):
    model, tok = tiny_model("diff"), ByteTokenizer()
    prompt = tok.encode("The special magic number for Oslo is:")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):  # as greedy_text's own autocast
        ref = model.generate(torch.tensor([prompt]), 6, temperature=0)[0, len(prompt):].tolist()
    assert needle.greedy_text(model, tok, prompt, 6, torch.device("cpu"), amp) == tok.decode(ref)


# The probe and the attention masses ----------------------------------------------------------------
@pytest.mark.parametrize("attention", ["diff", "diff_v2", "baseline"])
def test_probe_reproduces_the_model_and_reports_every_layer(attention):
    model = tiny_model(attention)
    ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
        with probing(model, AttentionProbe(keep=True)) as probe:
            got = model(ids)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    assert [c.layer for c in probe.calls] == [0, 1]
    assert all(torch.isinf(c.logits1[0, 0, 0, 1:]).all() for c in probe.calls)  # causal mask
    assert probe.calls[0].kind == ("softmax" if attention == "baseline" else "differential")


def test_probe_refuses_arguments_it_does_not_know():
    from diff_transformer.attention import softmax_attention
    from diff_transformer.attention.probe import ProbeUnsupported

    q = torch.randn(1, 2, 4, 8)
    with AttentionProbe():
        softmax_attention(q, q, q, bias=None)  # an unknown keyword left at None passes
        with pytest.raises(ProbeUnsupported, match="bias"):
            softmax_attention(q, q, q, bias=torch.zeros(4, 4))


def test_split_mass_by_hand():
    span, context_end = (1, 2), 3  # answer: key 1; noise: keys 0 and 2; other: keys 3 and 4
    a1 = torch.tensor([0.1, 0.6, 0.1, 0.1, 0.1])
    a2 = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])
    # λ = 1.5: A1 − λA2 = [−0.2, 0.3, −0.2, −0.2, −0.2], row sum −0.5 (= 1 − λ), Σ|a| = 1.1. Dividing by
    # the row sum gave answer −0.6 and noise +0.8; by Σ|a|: 0.3 / 1.1 and −0.4 / 1.1.
    got = attention_noise.split_mass(a1 - 1.5 * a2, span, context_end)
    expect = {"answer": 3 / 11, "noise": -4 / 11, "other": -4 / 11, "raw_answer": 0.3, "raw_noise": -0.4,
              "raw_other": -0.4, "row_sum": -0.5, "row_abs_sum": 1.1}
    assert {k: pytest.approx(float(v), abs=1e-6) for k, v in got.items()} == expect
    # λ = −0.5: A1 + 0.5·A2 = [0.2, 0.7, 0.2, 0.2, 0.2] ≥ 0, Σ|a| = Σa = 1.5: the plain fractions
    got = attention_noise.split_mass(a1 + 0.5 * a2, span, context_end)
    assert float(got["answer"]) == pytest.approx(0.7 / 1.5) and float(got["noise"]) == pytest.approx(0.4 / 1.5)
    assert float(got["other"]) == pytest.approx(0.4 / 1.5) and float(got["row_abs_sum"]) == pytest.approx(1.5)
    # λ = 1 with A1 = A2: an all-zero row has zero shares, not NaN; batched rows are independent
    rows = torch.stack([a1 - 1.5 * a2, a2 - a2])  # (2, M)
    got = attention_noise.split_mass(rows, span, context_end)
    assert got["answer"].tolist() == pytest.approx([3 / 11, 0.0]) and torch.isfinite(got["noise"]).all()


@pytest.mark.parametrize("attention", ["baseline", "diff", "diff_v2", "diff_lambda_above_1"])
def test_attention_mass_uniform_attention_by_hand(attention):
    model = tiny_model("diff" if attention == "diff_lambda_above_1" else attention, n_layers=1)
    d = model.config.head_dim
    with torch.no_grad():
        model.layers[0].self_attn.q_proj.weight.zero_()  # every logit 0: uniform over the visible keys
        if attention.startswith("diff_lambda") or attention == "diff":
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                getattr(model.layers[0].self_attn, name).zero_()  # λ = e^0 − e^0 + λ_init = λ_init
        if attention == "diff_lambda_above_1":
            for name in ("lambda_q1", "lambda_k1"):  # λq1·λk1 = log 2: λ = 2 − 1 + λ_init = 1.2
                getattr(model.layers[0].self_attn, name).fill_(math.sqrt(math.log(2) / d))
    ids = list(range(40, 70))
    queries, span, context_end = [20, 25, 29], (5, 9), 15
    got = attention_noise.attention_mass(model, ids, queries, span, context_end, torch.device("cpu"))
    # A1 = A2 = uniform, so the map is (1 − λ)/(q + 1) on every visible key: the shares are ±(keys)/(q + 1),
    # negative when λ > 1 (the row gives every key negative weight)
    lam = {"diff": 0.2, "diff_lambda_above_1": 1.2}.get(attention, 0.0)
    sign = -1.0 if lam > 1 else 1.0
    expect_answer = np.mean([4 / (q + 1) for q in queries])
    expect_noise = np.mean([(15 - 4) / (q + 1) for q in queries])
    assert got["answer"][0] == pytest.approx(sign * expect_answer, rel=1e-5)
    assert got["noise"][0] == pytest.approx(sign * expect_noise, rel=1e-5)
    if attention == "diff_v2":  # λ per token: rows sum to 1 − λ_t, only the normalised masses are known
        return
    if attention != "baseline":
        assert model.lambdas()[0] == pytest.approx(lam, rel=1e-5)
    assert got["raw_answer"][0] == pytest.approx((1 - lam) * expect_answer, rel=1e-4)
    assert got["row_sum"][0] == pytest.approx(1 - lam, rel=1e-4)
    assert got["row_abs_sum"][0] == pytest.approx(abs(1 - lam), rel=1e-4)


# Quantization ---------------------------------------------------------------------------------------
def test_quantizer_against_hand_computed_values():
    inf = float("inf")
    x = torch.tensor([[[[1.0, -0.55, 0.26, -inf], [0.1, 0.3, -inf, -inf]]]])  # (1, 1, 2, 4)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    # row, 3 bits: integers -3..3; row 0 scale 1/3: [3, -1.65, 0.78] -> [3, -2, 1]; row 1 scale 0.1: [1, 3]
    q = quantization.absmax_quantize(x, 3, mask, "row")
    torch.testing.assert_close(q[0, 0, 0, :3], torch.tensor([1.0, -2 / 3, 1 / 3]))
    torch.testing.assert_close(q[0, 0, 1, :2], torch.tensor([0.1, 0.3]))
    assert torch.isinf(q[0, 0][~mask]).all()
    # head: one scale 1/3 for both rows: 0.1 -> 0, 0.3 -> 1/3
    q = quantization.absmax_quantize(x, 3, mask, "head")
    torch.testing.assert_close(q[0, 0, 1, :2], torch.tensor([0.0, 1 / 3]))
    torch.testing.assert_close(quantization.absmax_quantize(x, 16, mask), torch.where(mask, x, -inf), atol=1e-4, rtol=0)


def test_quantized_validation_loss_16_bits_same_4_bits_differs():
    model = tiny_model("diff")
    with torch.no_grad():  # sharp, loud attention, so that 4-bit logits matter
        for block in model.layers:
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(block.self_attn, proj).weight.mul_(10)
        model.lm_head.weight.mul_(30)
    tokens = np.random.default_rng(0).integers(0, 256, 2000)
    ctx = context_for(model, tokens, batch_size=2, seq_len=64, batches=2)
    plain, _ = perplexity.val_loss(ctx)
    losses = {}
    for bits in (16, 4):
        with probing(model, AttentionProbe(logits_transform=quantization.quantizer(bits, "row"))):
            losses[bits], _ = perplexity.val_loss(ctx)
    assert abs(losses[16] - plain) < 1e-3
    assert abs(losses[4] - plain) > 1e-3


# Outliers and long-NLL against plain loops ----------------------------------------------------------
def test_magnitude_stats_against_numpy():
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, generator=gen) * 3 for n in (50, 700, 1, 333)]
    stats = outliers.MagnitudeStats(sample=10_000)
    for c in chunks:
        stats.add(c)
    allv = np.abs(torch.cat(chunks).numpy())
    desc = np.sort(allv)[::-1]
    got = stats.result()
    for k in outliers.TOP_K:
        assert got[f"top{k}"] == pytest.approx(desc[k - 1], rel=1e-6)
    assert got["median"] == pytest.approx(np.median(allv), rel=1e-6)
    few = outliers.MagnitudeStats()
    few.add(torch.tensor([-2.0, 1.0]))
    assert few.result()["top2"] == 1.0 and few.result()["top3"] is None


def test_long_nll_buckets_and_positions_against_loops():
    nll = np.random.default_rng(0).random((3, 10))
    edges, means = long_nll.bucket_means(nll, 3)
    assert edges.tolist() == [0, 3, 7, 10]
    for b in range(3):
        vals = [nll[r, t] for r in range(3) for t in range(10) if edges[b] <= t < edges[b + 1]]
        assert means[b] == pytest.approx(sum(vals) / len(vals))
    model = tiny_model("diff")
    rows = np.random.default_rng(1).integers(0, 256, (3, 9))
    got = long_nll.position_nll(model, rows, 2, torch.device("cpu"))
    with torch.no_grad():
        for r in range(3):
            for t in range(8):  # NLL of token t+1 from the prefix 0..t alone
                logp = torch.log_softmax(model(torch.tensor(rows[r:r + 1, : t + 1]))[0, -1], -1)
                assert got[r, t] == pytest.approx(-float(logp[rows[r, t + 1]]), abs=1e-4)


# The CLI end to end ---------------------------------------------------------------------------------
SMALL = ["--opt", "needles=2", "--opt", "samples=1", "--opt", "contexts=256", "--opt", "depths=0,1",
         "--opt", "tokens=128", "--opt", "docs=2", "--opt", "batches=1", "--opt", "bits=16,4", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("evals")
    corpus = write_corpus(root / "corpus", n_docs=8, chars=2500)
    out = {"root": root, "cache": root / "cache"}
    for attention in ("diff", "baseline"):
        args = ["train", "--preset", "tiny", "--data-cache", str(out["cache"]), "--no-progress", "--set",
                "model.dim=32", "model.n_layers=2", "model.max_seq_len=256", "data.tokenizer=byte", "batch_size=4",
                "seq_len=64", "steps=2", "eval_every=1", "eval_batches=1", "ckpt_every=2", "log_every=1",
                "warmup_steps=1", f"model.attention={attention}", f"data.source={corpus}", "--out",
                str(root / attention)]
        assert main(args) == 0
        out[attention] = root / attention
    return out


def test_eval_all_tasks_writes_strict_json_and_png(runs, capsys):
    run = runs["diff"]
    assert main(["eval", str(run), "--task", "all", "--data-cache", str(runs["cache"]), *SMALL]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    tasks = [t.name for t in runner.select_tasks("all")]  # icl and zero-shot need inputs: not in "all"
    assert [line.split(":")[0] for line in printed] == tasks
    for name in tasks:
        result = strict_json(run / "evals" / f"{name}.json")
        assert "summary" in result
        assert (run / "evals" / f"{name}.png").stat().st_size > 0
    lam = strict_json(run / "evals" / "lambda.json")
    assert len(lam["final"]) == 2 and lam["steps"] == [0, 1, 2] and lam["any_nonpositive"] is False
    q = strict_json(run / "evals" / "quantization.json")
    assert q["granularity"] == "row" and [r["bits"] for r in q["by_bits"]] == ["16", "4"]
    # the perplexity task is the plain `eval`'s number on the same windows
    assert main(["eval", str(run), "--batches", "1", "--data-cache", str(runs["cache"])]) == 0
    plain = float(capsys.readouterr().out.split("val loss ")[1].split(",")[0])
    assert strict_json(run / "evals" / "perplexity.json")["val_loss"] == pytest.approx(plain, abs=1e-4)


def test_eval_bad_input_exit_2_one_line_folder_unchanged(runs, capsys):
    run = runs["baseline"]
    before = snapshot(run)
    base = [str(run), "--data-cache", str(runs["cache"]), "--no-progress"]
    for extra in (["--task", "nope"], ["--task", "needle", "--opt", "needles=abc"], ["--task", "needle", "--opt", "x"],
                  ["--task", "needle", "--opt", "bogus=1"], ["--task", "long-nll", "--opt", "context=100000"]):
        capsys.readouterr()
        assert main(["eval", *base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), (extra, err)
        assert snapshot(run) == before
    capsys.readouterr()
    assert main(["eval", *base, "--task", "nope"]) == 2
    assert "known tasks are perplexity, long-nll" in capsys.readouterr().err


def test_eval_compare_table_and_plots(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["eval-compare", str(runs["diff"]), str(runs["baseline"]), "--task", "perplexity,lambda,needle",
                 "--out", str(out), "--data-cache", str(runs["cache"]), *SMALL]) == 0
    md = (out / "evals.md").read_text()
    assert "DIFF (n=1)" in md and "baseline (n=1)" in md and "| perplexity | val_loss |" in md
    summary = strict_json(out / "evals.json")
    assert set(summary["groups"]) == {"DIFF", "baseline"}
    cell = summary["table"]["perplexity"]["val_loss"]["DIFF"]
    assert cell["n"] == 1 and cell["std"] is None and math.isfinite(cell["mean"])
    for name in ("perplexity", "lambda", "needle"):
        assert (out / f"{name}.png").is_file()
    capsys.readouterr()
    assert main(["eval-compare", f"{runs['diff']},{runs['diff']}", str(runs["baseline"]), "--label", "D", "B",
                 "--task", "lambda", "--out", str(tmp_path / "groups"), "--no-progress"]) == 0
    assert "| lambda | lambda_mean | " in capsys.readouterr().out
    assert "D (n=2)" in (tmp_path / "groups" / "evals.md").read_text()
    assert main(["eval-compare", str(runs["diff"]), "--label", "a", "b", "--task", "lambda", "--out",
                 str(tmp_path / "bad")]) == 2 and not (tmp_path / "bad").exists()
    # groups: the same run twice as two "seeds" gives a zero std
    res = runner.evaluate_runs({"D": [runs["diff"], runs["diff"]]}, ["perplexity"], data_cache=runs["cache"],
                               progress=False, write_runs=False, echo=None)
    assert res["table"]["perplexity"]["val_loss"]["D"]["std"] == pytest.approx(0.0, abs=1e-9)


def test_no_matplotlib_json_still_written(runs, monkeypatch, capsys):
    run = runs["baseline"]
    assert main(["eval", str(run), "--task", "lambda", "--no-progress"]) == 0
    assert (run / "evals" / "lambda.png").is_file()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["eval", str(run), "--task", "lambda", "--no-progress"]) == 0
    assert strict_json(run / "evals" / "lambda.json")["lambda"] == "no λ"
    assert not (run / "evals" / "lambda.png").exists()
    assert "warning: matplotlib is not installed" in capsys.readouterr().err


def test_model_folder_needs_data_option_and_writable_folder(runs, tmp_path, capsys):
    import shutil

    ckpt = sorted((runs["diff"] / "checkpoints").iterdir())[-1]
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer_meta.json"):
        shutil.copy(ckpt / name, folder / name)
    before = snapshot(folder)
    assert main(["eval", str(folder), "--task", "long-nll", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--opt data=PATH" in err[0] and snapshot(folder) == before
    text = tmp_path / "texts.txt"
    text.write_text(HAYSTACK * 3)
    assert main(["eval", str(folder), "--task", "long-nll,lambda", "--opt", f"data={text}", "--opt", "docs=1",
                 "--no-progress"]) == 0
    assert strict_json(folder / "evals" / "long-nll.json")["rows"] == 1
    folder.chmod(0o500)
    (folder / "evals").chmod(0o500)
    try:
        if not os.access(folder / "evals", os.W_OK):  # root can write anyway
            capsys.readouterr()
            assert main(["eval", str(folder), "--task", "lambda", "--no-progress"]) == 2
            assert "not writable" in capsys.readouterr().err
    finally:
        (folder / "evals").chmod(0o700)
        folder.chmod(0o700)


def test_a_crash_keeps_the_finished_tasks(runs, monkeypatch, tmp_path):
    import shutil

    from diff_transformer.evals.base import TASKS, Task

    def boom(ctx):
        raise RuntimeError("boom")

    monkeypatch.setitem(TASKS, "boom", Task("boom", boom, None, "fails", needs_data=False, options=()))
    run = tmp_path / "run"
    shutil.copytree(runs["diff"], run, ignore=shutil.ignore_patterns("evals"))
    with pytest.raises(RuntimeError, match="boom"):
        runner.evaluate_path(run, ["lambda", "boom"], progress=False)
    assert strict_json(run / "evals" / "lambda.json")["final"]
    assert not (run / "evals" / "boom.json").exists()


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 75), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_keep_the_finished_tasks(tmp_path, sig, code):
    """`timeout` (SIGTERM) or Ctrl-C during a slow task: the finished task's JSON is written, the note is
    printed, and the exit code is the trainer's (75 / 130)."""
    folder = model_folder(tmp_path / "model", attention="diff")
    ready = tmp_path / "slow_started"
    env = {**os.environ, "FAULT": f"slow_task:{ready}", "PYTHONPATH": os.pathsep.join(sys.path)}
    # A child of a non-interactive shell may start with SIGINT ignored; the runner wants Python's default.
    code_line = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                 f"sys.argv = [{str(RUNNER)!r}, *sys.argv[1:]]; runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", code_line, "eval", str(folder), "--task", "lambda,slow",
                             "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), proc.communicate(timeout=30)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert out.startswith("lambda: ")
    assert f"note: wrote the finished tasks (lambda) to {folder / 'evals'}" in err
    assert strict_json(folder / "evals" / "lambda.json")["meta"]["task"] == "lambda"
    assert not (folder / "evals" / "slow.json").exists()
    assert not list((folder / "evals").glob(".*"))  # no temporary file left behind


def test_eval_compare_stopped_keeps_each_runs_finished_tasks(runs, monkeypatch, tmp_path):
    """SIGTERM (raised in this process) while the second run's tasks run: the first run's tasks and the
    second's finished one are written, no comparison; the SIGTERM handler is given back afterwards."""
    import shutil

    from diff_transformer.evals.base import TASKS, Task

    copies = {name: tmp_path / name for name in ("diff", "baseline")}
    for name, folder in copies.items():
        shutil.copytree(runs[name], folder, ignore=shutil.ignore_patterns("evals"))

    def stop_in_second_run(ctx):
        if ctx.run_dir == copies["baseline"]:
            signal.raise_signal(signal.SIGTERM)
        return {"summary": {"x": 1.0}}

    monkeypatch.setitem(TASKS, "stop", Task("stop", stop_in_second_run, None, "stops", needs_data=False, options=()))
    def guard(signum, frame):  # should the runner not catch SIGTERM, fail this test rather than kill pytest
        raise RuntimeError("SIGTERM reached the test's handler")

    previous = signal.signal(signal.SIGTERM, guard)
    try:
        with pytest.raises(runner.EvalStopped):
            runner.evaluate_runs({"DIFF": [copies["diff"]], "baseline": [copies["baseline"]]}, ["lambda", "stop"],
                                 out=tmp_path / "cmp", progress=False, echo=None)
        assert signal.getsignal(signal.SIGTERM) is guard
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert strict_json(copies["diff"] / "evals" / "stop.json")["summary"] == {"x": 1.0}
    assert strict_json(copies["baseline"] / "evals" / "lambda.json")["lambda"] == "no λ"
    assert not (copies["baseline"] / "evals" / "stop.json").exists() and not (tmp_path / "cmp").exists()


def test_eval_compare_reuse_reads_stored_results_without_checkpoints(runs, tmp_path, capsys):
    """Runs evaluated elsewhere (their evals/ copied back, no checkpoints) are compared from their files;
    a task missing from a folder is run; a stored file that is not a result is one error line."""
    import shutil

    stored = {}
    for name in ("diff", "baseline"):
        assert main(["eval", str(runs[name]), "--task", "perplexity,lambda", "--data-cache", str(runs["cache"]),
                     *SMALL]) == 0
        stored[name] = tmp_path / f"{name}-copy"
        shutil.copytree(runs[name], stored[name], ignore=shutil.ignore_patterns("checkpoints"))
    capsys.readouterr()
    out = tmp_path / "cmp"
    assert main(["eval-compare", str(stored["diff"]), str(stored["baseline"]), "--label", "D", "B", "--task",
                 "perplexity,lambda", "--reuse", "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("reused from") == 2
    summary = strict_json(out / "evals.json")
    want = strict_json(runs["diff"] / "evals" / "perplexity.json")["summary"]["val_loss"]
    assert summary["table"]["perplexity"]["val_loss"]["D"]["mean"] == want
    assert summary["groups"]["D"][0]["options"]["perplexity"] == strict_json(
        runs["diff"] / "evals" / "perplexity.json")["meta"]["options"]
    assert "options_differ" not in summary
    # without --reuse the checkpoint-less copies cannot be evaluated: one line, nothing written
    capsys.readouterr()
    assert main(["eval-compare", str(stored["diff"]), "--task", "lambda", "--out", str(tmp_path / "no"),
                 "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("error:") and not (tmp_path / "no").exists()
    # a task not stored is run when the run has its checkpoint; options that differ are noted
    partial = tmp_path / "partial"
    shutil.copytree(runs["baseline"], partial)
    (partial / "evals" / "lambda.json").unlink()
    meta_changed = strict_json(partial / "evals" / "perplexity.json")
    meta_changed["meta"]["options"] = {"batches": "7", "needles": "9"}  # needles: not a perplexity option
    (partial / "evals" / "perplexity.json").write_text(json.dumps(meta_changed))
    res = runner.evaluate_runs({"D": [stored["diff"]], "B": [partial]}, ["perplexity", "lambda"], reuse=True,
                               out=tmp_path / "mixed", progress=False, echo=None)
    assert (partial / "evals" / "lambda.json").is_file() and res["options_differ"] == ["perplexity"]
    assert "different options" in (tmp_path / "mixed" / "evals.md").read_text()
    # hostile stored files: not JSON, not an object, no summary of numbers
    for body in ("{not json", "[1, 2]", '{"summary": {"val_loss": "low"}}', '{"summary": 3}'):
        (partial / "evals" / "perplexity.json").write_text(body)
        capsys.readouterr()
        assert main(["eval-compare", str(partial), "--task", "perplexity", "--reuse", "--out",
                     str(tmp_path / "hostile"), "--no-progress"]) == 2, body
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "perplexity.json" in err[0] and "without --reuse" in err[0], (body, err)
        assert not (tmp_path / "hostile").exists()
    # a link out of the folder is not followed
    (partial / "evals" / "perplexity.json").unlink()
    (partial / "evals" / "perplexity.json").symlink_to(stored["diff"] / "evals" / "perplexity.json")
    capsys.readouterr()
    assert main(["eval-compare", str(partial), "--task", "perplexity", "--reuse", "--out", str(tmp_path / "hostile"),
                 "--no-progress"]) == 2
    assert "is a link" in capsys.readouterr().err and not (tmp_path / "hostile").exists()
