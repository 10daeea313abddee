"""Hardening (issue 12): runs that ended wrong, and bad inputs that gave tracebacks instead of one line.

Every bad-input case asserts what the user meets: exit 2, one ``error:`` line and the folders involved
byte-identical. Tiny model, byte tokenizer, CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diff_transformer.cli import main
from diff_transformer.train import checkpoint as ckpt
from diff_transformer.train import rundir

from conftest import snapshot, write_corpus

TINY = ["model.dim=64", "model.n_layers=2", "data.tokenizer=byte", "batch_size=4", "seq_len=16",
        "eval_every=3", "eval_batches=2", "ckpt_every=3", "log_every=1", "warmup_steps=2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("harden")
    corpus = write_corpus(root / "corpus", n_docs=6, chars=2000)
    cache = root / "cache"
    base = ["--data-cache", str(cache), "--no-progress"]
    args = ["--preset", "tiny", *base, "--set", *TINY, f"data.source={corpus}"]
    run = root / "run"
    assert main(["train", *args, "steps=6", "--out", str(run)]) == 0
    return {"root": root, "corpus": corpus, "cache": cache, "base": base, "args": args, "run": run}


def cli(*argv, env_extra=None, timeout=120, **kw) -> subprocess.CompletedProcess:
    """The CLI in a child process (what a user runs): tracebacks, exit codes and signals are real."""
    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "diff_transformer.cli", *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def assert_one_error(code: int, err: str, needle: str = "") -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(errors) == 1 and needle in errors[0], err
    return errors[0]


def bad(argv, folders, needle="", capsys=None):
    """Run in-process; exit 2, one error line holding ``needle``, ``folders`` unchanged."""
    before = [snapshot(f, dirs=True) for f in folders]
    if capsys is not None:
        capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err if capsys is not None else ""
    line = assert_one_error(code, err, needle)
    assert [snapshot(f, dirs=True) for f in folders] == before
    return line


# 1-5: runs that ended wrong ------------------------------------------------------------------------------------
def test_diverging_run_exits_3_not_0(env, tmp_path):
    """A rollback must not turn the rolled-back state into a new checkpoint (so the second streak stops the
    run), and a run never ends "done" with a non-finite validation loss."""
    out = tmp_path / "div"
    r = cli("train", *env["args"], "lr=1e6", "ckpt_every=1", "max_bad_steps=3", "steps=30", "--out", out)
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "done:" not in r.stdout
    assert len([x for x in r.stderr.splitlines() if x.startswith("error: ")]) == 1
    for p in ckpt.complete_checkpoints(out):  # no checkpoint holds non-finite weights
        assert all(torch.isfinite(t).all() for t in load_file(str(p / "model.safetensors")).values()), p


def test_kill_in_the_start_up_window_does_not_block_the_rerun(env, tmp_path):
    out = tmp_path / "startup"
    out.mkdir()
    shutil.copytree(env["run"] / "tokenizer", out / ".tokenizer.tmp")  # killed while writing tokenizer/
    assert main(["train", *env["args"], "steps=3", "--out", str(out)]) == 0
    shutil.rmtree(out)
    out.mkdir()
    shutil.copytree(env["run"] / "tokenizer", out / "tokenizer")  # killed before run.json
    assert main(["train", *env["args"], "steps=3", "--out", str(out)]) == 0
    assert (out / "run.json").is_file() and [ckpt.step_of(p) for p in ckpt.complete_checkpoints(out)] == [3]


def test_resume_to_an_older_checkpoint_continues_and_replaces_the_later_ones(env, tmp_path, capsys):
    out = tmp_path / "older"
    shutil.copytree(env["run"], out)
    final = load_file(str(ckpt.checkpoint_path(out, 6) / "model.safetensors"))
    assert main(["train", *env["args"], "steps=6", "--out", str(out), "--resume",
                 str(ckpt.checkpoint_path(out, 3))]) == 0
    assert [ckpt.step_of(p) for p in ckpt.complete_checkpoints(out)] == [3, 6]
    again = load_file(str(ckpt.checkpoint_path(out, 6) / "model.safetensors"))
    assert all(torch.equal(final[k], again[k]) for k in final)  # CPU training is deterministic
    kinds = [(m["kind"], m["step"]) for m in rundir.read_metrics(out) if m["kind"] != "summary"]
    ref = [(m["kind"], m["step"]) for m in rundir.read_metrics(env["run"]) if m["kind"] != "summary"]
    assert kinds == ref


def test_rerun_of_a_finished_run_keeps_its_summary(env, tmp_path, capsys):
    out = tmp_path / "finished"
    shutil.copytree(env["run"], out)
    before = (out / rundir.METRICS_FILE).read_bytes()
    assert [m["kind"] for m in rundir.read_metrics(out)][-1] == "summary"
    assert main(["train", *env["args"], "steps=6", "--out", str(out)]) == 0
    assert "already complete" in capsys.readouterr().out
    assert (out / rundir.METRICS_FILE).read_bytes() == before


def test_two_trains_on_one_folder_the_second_is_refused_naming_the_holder(env, tmp_path):
    out = tmp_path / "locked"
    settings = ["steps=100000", "eval_every=0", "ckpt_every=0"]
    src = str(Path(__file__).parents[1] / "src")
    first = subprocess.Popen([sys.executable, "-m", "diff_transformer.cli", "train", *env["args"], *settings,
                              "--out", str(out)], env={**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / rundir.METRICS_FILE
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None and not (
            metrics.is_file() and '"train"' in metrics.read_text()):
        time.sleep(0.05)
    try:
        second = cli("train", *env["args"], *settings, "--out", out, timeout=60)
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=300)
    assert first.returncode == 75, err
    line = assert_one_error(second.returncode, second.stderr, "in use")
    assert f"PID {first.pid}" in line
    steps = [(m["kind"], m["step"]) for m in rundir.read_metrics(out)]
    assert len(steps) == len(set(steps))  # no record twice
    import fcntl

    with open(out / rundir.LOCK_FILE, "a") as f:  # released when the holder exited
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


# 6-13: errors that were tracebacks -----------------------------------------------------------------------------
def test_disk_full_during_a_save_is_one_line_naming_the_space_needed(env, tmp_path):
    out = tmp_path / "full"
    shutil.copytree(env["run"], out)
    shutil.rmtree(ckpt.checkpoint_path(out, 6))
    kept = snapshot(ckpt.checkpoint_path(out, 3), dirs=True)
    limit = (ckpt.checkpoint_path(out, 3) / "model.safetensors").stat().st_size + 4096  # optimizer.safetensors: 2x

    def small_files():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = cli("train", *env["args"], "steps=6", "--out", out, preexec_fn=small_files)
    line = assert_one_error(r.returncode, r.stderr, "a save needs about")
    assert "keep_last + 1 = 3" in line and "File too large" in line
    assert snapshot(ckpt.checkpoint_path(out, 3), dirs=True) == kept
    assert not ckpt.checkpoint_path(out, 6).exists()
    assert cli("train", *env["args"], "steps=6", "--out", out).returncode == 0  # room again: it resumes


@pytest.fixture(scope="module")
def model_dir(env, tmp_path_factory):
    import diff_transformer

    model, tok = diff_transformer.load(env["run"])
    folder = tmp_path_factory.mktemp("model") / "m"
    model.save_pretrained(folder)
    tok.save(folder)
    return folder


def _with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / "config.json").read_text())
    data.update(changes)
    (dst / "config.json").write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize("changes,needle", [
    ({"n_layers": 10**9}, "parameters"), ({"vocab_size": 10**12}, "parameters"),
    ({"dim": "64"}, "model.dim"), ({"n_layers": 2.5}, "model.n_layers"), ({"tie_embeddings": "false"}, "tie_embeddings"),
    ({"init_std": None}, "init_std"), ({"n_layers": 10**30}, "n_layers")])
def test_absurd_or_ill_typed_model_config_is_refused_before_allocating(model_dir, tmp_path, capsys, changes, needle):
    folder = _with_config(model_dir, tmp_path / "m", **changes)
    bad(["generate", folder, "--prompt", "a", "--max-new-tokens", "2"], [folder], needle, capsys)
    out = tmp_path / "ft"
    bad(["train", "--init-from", folder, "--out", out, "--no-progress"], [folder, out], needle, capsys)


@pytest.mark.parametrize("setting,needle", [
    ("model.n_layers=1000000000", "parameters"), ("model.dim=100000", "parameters"), ("lr=inf", "train.lr"),
    ("weight_decay=nan", "train.weight_decay"), ("model.init_std=nan", "model.init_std"),
    ("seed=18446744073709551616", "train.seed"), ("data.vocab_size=1000000000", "vocab_size")])
def test_bad_settings_are_refused(env, tmp_path, capsys, setting, needle):
    out = tmp_path / "new"
    bad(["train", *env["args"], setting, "--out", out], [out, env["cache"]], needle, capsys)


@pytest.mark.parametrize("section,changes,needle", [
    ("train", {"seed": "abc"}, "train.seed"), ("model", {"tie_embeddings": "false"}, "model.tie_embeddings"),
    ("train", {"steps": 1.5}, "train.steps"), ("data", {"vocab_size": "300"}, "data.vocab_size"),
    ("train", {"lr": None}, "train.lr")])
def test_config_file_values_are_type_checked(env, tmp_path, capsys, section, changes, needle):
    data = json.loads((env["run"] / "run.json").read_text())
    data[section].update(changes)
    config = tmp_path / "run.json"
    config.write_text(json.dumps(data))
    out = tmp_path / "new"
    bad(["train", "--config", config, *env["base"], "--out", out], [out, env["cache"]], needle, capsys)


def test_out_that_cannot_be_written_is_one_line(env, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    bad(["train", *env["args"], "steps=3", "--out", blocker / "run"], [tmp_path], "cannot write", capsys)


def _tiktoken_folder(folder: Path) -> Path:
    import base64

    folder.mkdir()
    ranks = b"".join(base64.b64encode(bytes([i])) + b" %d\n" % i for i in range(256))
    (folder / "tokenizer.tiktoken").write_bytes(ranks)
    (folder / "tokenizer_meta.json").write_text(json.dumps(
        {"kind": "tiktoken", "name": "mine", "file": "tokenizer.tiktoken", "pattern": r"\s+|\S+", "eos_id": 256}))
    return folder


@pytest.mark.parametrize("case", ["garbage tokenizer.json", "binary meta", "meta not an object",
                                  "eos id not an integer", "file outside the folder", "file ../",
                                  "bad pattern"])
def test_malformed_tokenizer_files_are_one_line(env, tmp_path, capsys, case):
    import tokenizers

    folder = tmp_path / "tok"
    if case == "garbage tokenizer.json":
        folder.mkdir()
        (folder / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')
        (folder / "tokenizer_meta.json").write_text(json.dumps({"kind": "bpe", "file": "tokenizer.json"}))
    else:
        _tiktoken_folder(folder)
        meta = json.loads((folder / "tokenizer_meta.json").read_text())
        if case == "binary meta":
            (folder / "tokenizer_meta.json").write_bytes(b"\xff\xfe\x00garbage\x80")
        elif case == "meta not an object":
            (folder / "tokenizer_meta.json").write_text("[1, 2]")
        else:
            meta.update({"eos id not an integer": {"eos_id": "x"}, "file outside the folder": {"file": "/etc/hostname"},
                         "file ../": {"file": "../tok/tokenizer.tiktoken"}, "bad pattern": {"pattern": "(("}}[case])
            (folder / "tokenizer_meta.json").write_text(json.dumps(meta))
    out = tmp_path / "new"
    bad(["train", *env["args"], f"data.tokenizer=saved:{folder}", "steps=3", "--out", out], [folder, out],
        "tokenizer", capsys)


def reseal(folder: Path, files: dict | None = None) -> None:
    """Rewrite manifest.json (``files``, or fresh hashes of the listed files) and COMPLETE to match: a
    hand-edited or foreign checkpoint whose hashes are consistent."""
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    if files is None:
        files = {n: {"sha256": ckpt.sha256(folder / n), "bytes": (folder / n).stat().st_size}
                 for n in manifest["files"]}
    manifest["files"] = files
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))
    (folder / ckpt.MARKER).write_text(json.dumps({"manifest_sha256": ckpt.sha256(folder / ckpt.MANIFEST)}))


def _tampered(env, tmp_path, case) -> Path:
    folder = tmp_path / "ck" / "checkpoints" / "step_00000006"
    shutil.copytree(ckpt.checkpoint_path(env["run"], 6), folder)
    files = json.loads((folder / ckpt.MANIFEST).read_text())["files"]
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    if case == "absolute path":
        reseal(folder, {**files, str(outside): {"sha256": ckpt.sha256(outside)}})
    elif case == "../ path":
        reseal(folder, {**files, "../../../outside.txt": {"sha256": ckpt.sha256(outside)}})
    elif case == "empty file list":
        w = folder / "model.safetensors"
        w.write_bytes(w.read_bytes()[:-8] + b"\x00" * 8)
        reseal(folder, {})
    elif case == "entry not an object":
        reseal(folder, {**files, "model.safetensors": "abc"})
    elif case == "optimizer.json malformed":
        (folder / ckpt.OPTIM_META).write_text(json.dumps({"param_groups": 5, "scalars": []}))
        reseal(folder)
    elif case == "trainer state malformed":
        state = json.loads((folder / ckpt.STATE).read_text())
        (folder / ckpt.STATE).write_text(json.dumps({**state, "step": "six"}))
        reseal(folder)
    elif case == "rng state malformed":
        state = json.loads((folder / ckpt.STATE).read_text())
        state["rng"]["numpy_pos"] = "x"
        (folder / ckpt.STATE).write_text(json.dumps(state))
        reseal(folder)
    elif case == "empty optimizer.safetensors":
        save_file({}, str(folder / ckpt.OPTIM_TENSORS))
        reseal(folder)
    return folder


@pytest.mark.parametrize("case", ["absolute path", "../ path", "empty file list", "entry not an object",
                                  "optimizer.json malformed", "trainer state malformed", "rng state malformed",
                                  "empty optimizer.safetensors"])
def test_checkpoint_manifest_lists_exactly_what_is_read_and_malformed_state_is_one_line(env, tmp_path, capsys, case):
    folder = _tampered(env, tmp_path, case)
    out = tmp_path / "new"
    bad(["train", *env["args"], "steps=9", "--out", out, "--resume", folder], [folder.parents[1], out],
        "checkpoint", capsys)
    if case in ("absolute path", "../ path", "empty file list", "entry not an object"):
        bad(["generate", folder, "--prompt", "a", "--max-new-tokens", "2"], [folder.parents[1]], "", capsys)
        bad(["eval", folder, *env["base"][:2]], [folder.parents[1]], "", capsys)


@pytest.mark.parametrize("change", [{"dtype": "<i1"}, {"dtype": "<u4"}, {"dtype": "<u4", "hash": False},
                                    {"file": "../x.bin"}, {"tokens": 3}, {"manifest": "[]"}])
def test_cache_manifest_is_validated(env, tmp_path, capsys, change):
    cache = tmp_path / "cache"
    shutil.copytree(env["cache"], cache)
    folder = next(p for p in cache.iterdir() if p.is_dir() and p.name.startswith("corpus-byte-"))
    manifest = json.loads((folder / "manifest.json").read_text())
    if "dtype" in change:
        manifest["dtype"] = change["dtype"]
    if "file" in change:
        manifest["train"]["file"] = change["file"]
    if "tokens" in change:
        manifest["val"]["tokens"] = change["tokens"]
    text = change.get("manifest") or json.dumps(manifest)
    (folder / "manifest.json").write_text(text)
    if change.get("hash") is False:
        (folder / "manifest.sha256").unlink(missing_ok=True)
    elif (folder / "manifest.sha256").is_file():
        (folder / "manifest.sha256").write_text(hashlib.sha256(text.encode()).hexdigest())
    out = tmp_path / "new"
    args = [a if a != str(env["cache"]) else str(cache) for a in env["args"]]
    bad(["train", *args, "steps=3", "--out", out], [cache, out], "dataset cache", capsys)


@pytest.fixture(scope="module")
def hf_dir(env, tmp_path_factory):
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf") / "hf"
    assert main(["export", str(env["run"]), "--out", str(folder)]) == 0
    return folder


def _sharded(hf_dir: Path, dst: Path, weight_map_value: str | None = None) -> Path:
    shutil.copytree(hf_dir, dst)
    (dst / "model.safetensors").rename(dst / "model-00001-of-00001.safetensors")
    names = load_file(str(dst / "model-00001-of-00001.safetensors")).keys()
    shard = weight_map_value or "model-00001-of-00001.safetensors"
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    return dst


@pytest.mark.parametrize("shard,needle", [("model-00002-of-00002.safetensors", "does not hold"),
                                          ("../hf/model.safetensors", "not a file in"), ("/etc/hostname", "not a file in")])
def test_import_index_naming_a_missing_or_outside_shard_is_one_line(hf_dir, tmp_path, capsys, shard, needle):
    src = _sharded(hf_dir, tmp_path / "src", shard)
    out = tmp_path / "out"
    bad(["import", src, "--out", out], [src, out], needle, capsys)


def test_import_with_a_garbage_tokenizer_imports_the_model_and_says_so(hf_dir, tmp_path, capsys):
    src = _sharded(hf_dir, tmp_path / "src")
    (src / "tokenizer.json").write_text('{"model": "garbage"}')
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["import", str(src), "--out", str(out)]) == 0
    assert "the tokenizer was not imported" in capsys.readouterr().err
    assert (out / "model.safetensors").is_file()


def test_exported_and_imported_folders_follow_the_umask(env, hf_dir, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "exp"
        assert main(["export", str(env["run"]), "--out", str(out)]) == 0
        imported = tmp_path / "imp"
        assert main(["import", str(out), "--out", str(imported)]) == 0
    finally:
        os.umask(old)
    for folder in (out, imported):
        assert folder.stat().st_mode & 0o777 == 0o755
        assert all(p.stat().st_mode & 0o777 == 0o644 for p in folder.iterdir()), \
            {p.name: oct(p.stat().st_mode) for p in folder.iterdir()}


@pytest.mark.parametrize("argv,needle", [
    (["--temperature", "nan"], "--temperature"), (["--temperature", "-1"], "--temperature"),
    (["--top-k", "0"], "--top-k"), (["--top-p", "1.5"], "--top-p"), (["--top-p", "nan"], "--top-p"),
    (["--seed", "18446744073709551616"], "--seed"), (["--device", "cuda:7"], "--device"), (["--device", "tpu"], "--device")])
def test_generate_options_each_named_in_one_line(env, capsys, argv, needle):
    bad(["generate", env["run"], "--prompt", "a", "--max-new-tokens", "2", *argv], [env["run"]], needle, capsys)


def test_eval_on_a_missing_cuda_device_is_one_line(env, capsys):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    bad(["eval", env["run"], *env["base"][:2], "--device", "cuda:7"], [env["run"]], "--device", capsys)


# 14 and what a newcomer tripped on -----------------------------------------------------------------------------
def test_sigterm_during_the_final_save_exits_0(env, tmp_path, monkeypatch, capsys):
    orig = ckpt.commit

    def commit(path):
        orig(path)
        if ckpt.step_of(Path(path)) == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler takes it: the run is complete

    monkeypatch.setattr(ckpt, "commit", commit)
    out = tmp_path / "final"
    assert main(["train", *env["args"], "steps=6", "--out", str(out)]) == 0
    assert "done: 6 steps" in capsys.readouterr().out


def test_ctrl_c_saves_like_sigterm_and_says_how_to_resume(env, tmp_path):
    out = tmp_path / "int"
    src = str(Path(__file__).parents[1] / "src")
    proc = subprocess.Popen([sys.executable, "-m", "diff_transformer.cli", "train", *env["args"], "steps=100000",
                             "eval_every=0", "ckpt_every=0", "--out", str(out)],
                            env={**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / rundir.METRICS_FILE
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not (
            metrics.is_file() and '"train"' in metrics.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped by SIGINT" in err and "rerun the same command" in err and "Traceback" not in err
    assert len(ckpt.complete_checkpoints(out)) == 1


def test_half_precision_weights_load_with_a_warning(model_dir, tmp_path, capsys):
    folder = tmp_path / "m16"
    shutil.copytree(model_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    save_file({k: v.half() for k, v in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    r = cli("generate", folder, "--prompt", "a", "--max-new-tokens", "2")  # warnings as the user sees them
    err = r.stderr
    assert r.returncode == 0, err
    assert any(line.startswith("warning: ") and "float16" in line for line in err.splitlines()), err


def test_null_jsonl_rows_are_counted_in_a_warning(env, tmp_path, capsys):
    rows = [{"text": f"document {i} " + "some words here " * 40} for i in range(6)] + [{"text": None}] * 3
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = cli("train", "--preset", "tiny", "--data-cache", tmp_path / "cache", "--no-progress", "--set",
            *TINY, f"data.source={corpus}", "steps=1", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert "warning: " + str(corpus) + ": 3 row(s) with 'text' null were skipped" in r.stderr.splitlines()


def test_resume_after_the_corpus_changed_warns(env, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    shutil.copytree(env["corpus"], corpus)
    args = [a.replace(str(env["corpus"]), str(corpus)) for a in env["args"]]
    out = tmp_path / "run"
    assert main(["train", *args, "steps=3", "--out", str(out)]) == 0
    (corpus / "doc00.txt").write_text((corpus / "doc00.txt").read_text() + " and a new sentence.")
    capsys.readouterr()
    assert main(["train", *args, "steps=3", "--out", str(out)]) == 0
    assert "the training data changed since checkpoint" in capsys.readouterr().err


def test_cli_help_version_and_warmup_warning(env, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "argument parsing only" not in top and "Differential Transformer" in top
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("diff-transformer ")
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--max-new-tokens", "--top-k", "--top-p"):
        assert text.split(option)[-1].split("--")[0].strip().split(" ", 1)[1:] != [], option
    assert main(["train", *env["args"], "steps=1", "warmup_steps=5", "--out", str(tmp_path / "w")]) == 0
    assert "train.warmup_steps=5 is more than the run's 1 steps" in capsys.readouterr().err


# The property: every loader, fed mutated files, exits 0 or 2 with one line; never a traceback or hang ---------
FUZZ_CASES = int(os.environ.get("FUZZ_CASES", "300"))  # about 10 s; each case is a fresh mutation


def test_loaders_fed_mutated_files_exit_0_or_2_with_one_line(env, model_dir, tmp_path):
    import resource

    root = tmp_path / "fuzz"
    root.mkdir()
    shutil.copytree(env["run"], root / "run")
    shutil.copytree(model_dir, root / "model")
    shutil.copytree(env["cache"], root / "cache")
    shutil.copytree(env["corpus"], root / "corpus")
    try:
        import transformers  # noqa: F401  (the optional extra: then import is fuzzed too)

        assert main(["export", str(env["run"]), "--out", str(root / "hf")]) == 0
    except ImportError:
        pass

    def limit_memory():  # unbounded allocation shows up as a MemoryError traceback instead of swapping
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    src = str(Path(__file__).parents[1] / "src")
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("fuzz_loaders.py")), str(root), "12",
                        str(FUZZ_CASES)], env={**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=600, preexec_fn=limit_memory)
    assert r.returncode == 0, r.stderr[-3000:]
    results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(results) == FUZZ_CASES
    failures = []
    for case in results:
        errors = [line for line in case["stderr"].splitlines() if line.startswith("error: ")]
        ok = case["code"] == 0 or (case["code"] == 2 and len(errors) == 1 and "Traceback" not in case["stderr"]
                                   and case["unchanged"]) or (  # a resumed run that diverges: exit 3, one line
            case["code"] == 3 and case["loader"] == "train" and len(errors) == 1 and "Traceback" not in case["stderr"])
        right = {"generate": "a", "eval": "val loss", "train": "done:", "export": "exported",
                 "import": "imported"}[case["loader"]]  # exit 0: the right result
        if case["code"] == 0 and not (case["stdout"].startswith(right) if right == "a" else right in case["stdout"]):
            ok = False
        if not ok or case["seconds"] > 60:
            failures.append(case)
    assert not failures, json.dumps(failures[:3], indent=1)
    assert {c["kind"] for c in results} >= {"checkpoint", "model", "tokenizer", "cache", "config"}
    assert any(c["code"] == 2 for c in results)


@pytest.mark.parametrize("change,needle", [({"model": "abc"}, "JSON objects"), ({"train": 5}, "JSON objects"),
                                           ({"preset": {}}, "preset")])
def test_config_file_sections_of_the_wrong_type_are_one_line(env, tmp_path, capsys, change, needle):
    data = {**json.loads((env["run"] / "run.json").read_text()), **change}
    config = tmp_path / "run.json"
    config.write_text(json.dumps(data))
    out = tmp_path / "new"
    bad(["train", "--config", config, *env["base"], "--out", out], [out], needle, capsys)


def test_config_file_integer_betas_train(env, tmp_path):
    data = json.loads((env["run"] / "run.json").read_text())
    data["train"].update(beta1=0, steps=1)
    config = tmp_path / "run.json"
    config.write_text(json.dumps(data))
    assert main(["train", "--config", str(config), *env["base"], "--out", str(tmp_path / "new")]) == 0


def test_write_failures_of_run_files_and_metrics_are_one_line(env, tmp_path, monkeypatch, capsys):
    from diff_transformer.train import trainer as trainer_mod

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rundir, "write_run_files", full)
    bad(["train", *env["args"], "steps=3", "--out", tmp_path / "a"], [], "No space left on device", capsys)
    monkeypatch.undo()

    def open_(path, *args, **kwargs):
        if Path(path).name == rundir.METRICS_FILE and args[:1] == ("a",):
            raise OSError(28, "No space left on device")
        return open(path, *args, **kwargs)

    monkeypatch.setattr(trainer_mod, "open", open_, raising=False)
    bad(["train", *env["args"], "steps=3", "--out", tmp_path / "b"], [], "metrics.jsonl", capsys)


def test_eval_of_a_model_folder_says_how_to_score_it_and_that_works(env, model_dir, tmp_path, capsys):
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    line = bad(["eval", folder, *env["base"][:2]], [folder], "--task perplexity --opt data=", capsys)
    argv = line.split("`")[1].split()[1:]  # the suggested command, with this corpus
    argv[argv.index("data=FILE_OR_FOLDER")] = f"data={env['corpus']}"
    assert main([*argv, *env["base"]]) == 0
    assert "val_loss" in capsys.readouterr().out


def test_a_rollback_is_not_saved_as_a_new_checkpoint_so_a_second_streak_stops(env, tmp_path, monkeypatch, capsys):
    """Steps from 4 on are non-finite (the validation loss stays finite): the first streak rolls back to
    step 3, the second finds the same checkpoint and stops with exit 3."""
    from diff_transformer.train.trainer import Trainer

    orig = Trainer.train_step

    def train_step(self):
        loss, norm = orig(self)
        return (math.nan, math.nan) if self.step + 1 >= 4 else (loss, norm)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    out = tmp_path / "streaks"
    capsys.readouterr()
    code = main(["train", *env["args"], "ckpt_every=1", "max_bad_steps=2", "steps=20", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "again after rolling back to step 3" in err
    assert [ckpt.step_of(p) for p in ckpt.complete_checkpoints(out)] == [2, 3]


def test_a_full_disk_while_tokenising_is_one_line_and_leaves_no_partial_cache(env, tmp_path, monkeypatch, capsys):
    from diff_transformer.data import shards

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards, "_write_shard", full)
    cache = tmp_path / "cache"
    args = [a if a != str(env["cache"]) else str(cache) for a in env["args"]]
    bad(["train", *args, "steps=1", "--out", tmp_path / "new"], [tmp_path / "new"], "No space left on device", capsys)
    assert not [p for p in cache.iterdir() if p.is_dir()]  # the partial build was removed


def test_export_and_import_that_run_out_of_space_are_one_line_and_leave_nothing(env, hf_dir, tmp_path):
    limit = 64 << 10  # model.safetensors is larger

    def small_files():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    for argv, out in ((["export", env["run"]], tmp_path / "exp"), (["import", hf_dir], tmp_path / "imp")):
        r = cli(*argv, "--out", out, preexec_fn=small_files)
        assert_one_error(r.returncode, r.stderr, "cannot write")
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}")]


def test_import_of_an_absurd_config_is_refused_before_allocating(hf_dir, tmp_path, capsys):
    src = _with_config(hf_dir, tmp_path / "src", num_hidden_layers=10**9)
    out = tmp_path / "out"
    bad(["import", src, "--out", out], [src, out], "parameters", capsys)
