"""The `diff-transformer` command: train/eval/generate end to end, SIGTERM, and every bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from diff_transformer.cli import main
from diff_transformer.train import checkpoint as ckpt
from diff_transformer.train import rundir

from conftest import snapshot, write_corpus

TINY = ["model.dim=64", "model.n_layers=2", "data.tokenizer=byte", "batch_size=8", "seq_len=32",
        "eval_every=3", "eval_batches=2", "ckpt_every=3", "log_every=1", "warmup_steps=2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(root / "corpus")
    cache = root / "cache"
    args = ["--preset", "tiny", "--data-cache", str(cache), "--no-progress", "--set", *TINY,
            f"data.source={corpus}"]
    run = root / "run"
    assert main(["train", *args, "steps=6", "--out", str(run)]) == 0
    return {"root": root, "corpus": corpus, "cache": cache, "args": args, "run": run}


def test_train_eval_generate(env, capsys):
    run = env["run"]
    assert [ckpt.step_of(p) for p in ckpt.complete_checkpoints(run)] == [3, 6]
    capsys.readouterr()
    assert main(["train", *env["args"], "steps=6", "--out", str(run)]) == 0
    assert "already complete at step 6" in capsys.readouterr().out
    assert main(["eval", str(run), "--data-cache", str(env["cache"])]) == 0
    out = capsys.readouterr().out
    val = float(out.split("val loss ")[1].split(",")[0])
    last = [m for m in rundir.read_metrics(run) if m["kind"] == "eval"][-1]["val_loss"]
    assert abs(val - last) < 1e-4  # same windows, scored in one batch instead of micro-batches
    assert main(["generate", str(run), "--prompt", "Fellow citizens", "--max-new-tokens", "12",
                 "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Fellow citizens") and len(text) > len("Fellow citizens")


def test_resume_flag_continues_a_run(env, tmp_path, capsys):
    out = tmp_path / "longer"
    assert main(["train", *env["args"], "steps=3", "--out", str(out)]) == 0
    # Same run with more steps is another run (steps differ): refused.
    assert main(["train", *env["args"], "steps=6", "--out", str(out)]) == 2
    # --resume with no config resumes from run.json.
    assert main(["train", "--out", str(out), "--resume", "--data-cache", str(env["cache"]), "--no-progress"]) == 0
    assert "already complete at step 3" in capsys.readouterr().out


def _bad_cases(env, tmp_path):
    corpus, run = env["corpus"], env["run"]
    base = ["--data-cache", str(env["cache"]), "--no-progress"]
    empty = tmp_path / "empty"
    empty.mkdir()
    notrun = tmp_path / "notrun"
    notrun.mkdir()
    (notrun / "keep.txt").write_text("mine")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    corrupt = tmp_path / "corrupt"
    import shutil

    shutil.copytree(run, corrupt)
    w = ckpt.checkpoint_path(corrupt, 6) / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-10] + b"0123456789")
    new = tmp_path / "new"
    tiny = ["--preset", "tiny", *base, "--set", *TINY, f"data.source={corpus}"]
    return {
        "unknown preset": (["train", "--preset", "huge", "--out", str(new), *base], new, "unknown preset"),
        "unknown --set key": (["train", *tiny, "colour=red", "--out", str(new)], new, "colour"),
        "bad --set value": (["train", *tiny, "steps=-3", "--out", str(new)], new, "train.steps"),
        "bad --set choice": (["train", *tiny, "model.attention=sparse", "--out", str(new)], new, "attention"),
        "zero batch": (["train", *tiny, "batch_size=0", "--out", str(new)], new, "batch_size"),
        "bad compile": (["train", *tiny, "compile=maybe", "--out", str(new)], new, "compile=maybe"),
        "bad FSDP reshard": (["train", *tiny, "fsdp_reshard=sometimes", "--out", str(new)], new, "fsdp_reshard"),
        "zero FSDP unit": (["train", *tiny, "fsdp_blocks_per_unit=0", "--out", str(new)], new, "fsdp_blocks_per_unit"),
        "missing corpus": (["train", *tiny, "data.source=/no/such/corpus.txt", "--out", str(new)], new, "no/such"),
        "empty corpus": (["train", *tiny, f"data.source={empty}", "--out", str(new)], new, "empty"),
        "another run in --out": (["train", *tiny, "steps=6", "lr=1e-4", "--out", str(run)], run, "another run"),
        "not a run in --out": (["train", *tiny, "steps=6", "--out", str(notrun)], notrun, "holds no run.json"),
        "corrupt --resume PATH": (["train", *tiny, "steps=9", "--out", str(new), "--resume",
                                   str(ckpt.checkpoint_path(corrupt, 6))], new, "SHA-256"),
        "checkpoint of another config": (["train", *tiny, "model.dim=32", "steps=9", "--out", str(new), "--resume",
                                          str(ckpt.checkpoint_path(run, 6))], new, "another model config"),
        "checkpoint of another vocabulary": (["train", "--preset", "tiny", *base, "--set", *TINY[:2], "batch_size=8",
                                              "seq_len=32", f"data.source={corpus}", "data.vocab_size=300",
                                              "--out", str(new), "--resume", str(ckpt.checkpoint_path(run, 6))],
                                             new, "vocab_size"),
        "--resume with nothing to resume": (["train", *tiny, "--out", str(new), "--resume"], new, "no run to resume"),
        "missing --config": (["train", "--config", str(tmp_path / "nope.json"), "--out", str(new)], new, "not found"),
        "invalid --config": (["train", "--config", str(bad_json), "--out", str(new)], new, "not valid JSON"),
        "no preset or config": (["train", "--out", str(new)], new, "--preset"),
        "eval of a non-run": (["eval", str(notrun)], notrun, "not a run directory"),
        "eval of a missing folder": (["eval", str(tmp_path / "missing")], new, "not a run directory"),
        "generate from a missing folder": (["generate", str(tmp_path / "missing"), "--prompt", "hi"], new,
                                           "does not exist"),
        "generate with an empty prompt": (["generate", str(run), "--prompt", ""], run, "--prompt is empty"),
        "generate too many tokens": (["generate", str(run), "--prompt", "a", "--max-new-tokens", "5000"], run,
                                     "max_seq_len"),
        "compare into a run folder": (["compare", *tiny, "--out", str(run)], run, "holds no compare.json"),
        "compare of a baseline": (["compare", *tiny, "model.attention=baseline", "--out", str(new)], new,
                                  "differential model"),
    }


def test_bad_input_one_line_exit_2_nothing_overwritten(env, tmp_path, capsys):
    cases = _bad_cases(env, tmp_path)
    assert len(cases) >= 20
    for name, (argv, folder, needle) in cases.items():
        before = snapshot(folder)
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, name
        lines = [line for line in err if line.startswith("error: ")]
        assert len(lines) == 1 and needle in lines[0], (name, err)
        assert snapshot(folder) == before, name


def test_sigterm_exit_code_and_same_losses_after_rerun(env, tmp_path):
    """A real process gets SIGTERM mid-run, exits 75 with a checkpoint; the same command finishes it
    with the losses of an uninterrupted run."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "diff_transformer.cli", "train", *env["args"], "steps=40", "ckpt_every=0",
            "eval_every=10", "--out", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / rundir.METRICS_FILE
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and any(json.loads(line).get("kind") == "train" for line in metrics.read_text().splitlines()
                                     if line.strip()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err
    stopped = ckpt.complete_checkpoints(out)
    assert len(stopped) == 1 and 0 < ckpt.step_of(stopped[0]) < 40
    assert "rerun the same command" in err
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ref = tmp_path / "ref"
    assert main(["train", *env["args"], "steps=40", "ckpt_every=0", "eval_every=10", "--out", str(ref)]) == 0

    def key(run_dir):
        return [(m["kind"], m["step"], m.get("loss"), m.get("val_loss")) for m in rundir.read_metrics(run_dir)
                if m["kind"] in ("train", "eval")]

    assert key(out) == key(ref)
