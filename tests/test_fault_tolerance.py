"""Fault tolerance and safe loading (issue 5): real SIGKILLs at random steps and at every stage of a save,
corrupt checkpoints, retention, non-finite steps, SIGTERM, hostile pickles and bad inputs.

Faults are injected from the test side: ``tests/fault_runner.py`` runs the CLI in a child process
and kills it at a chosen point. Everything runs on the CPU with a tiny model and a byte tokenizer;
CPU training is deterministic, so a resumed run must equal the uninterrupted one exactly (tolerance 0).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import diff_transformer
from diff_transformer import DiffTransformerLM, preset
from diff_transformer.cli import main
from diff_transformer.errors import UserError
from diff_transformer.train import checkpoint as ckpt
from diff_transformer.train import rundir
from diff_transformer.train import trainer as trainer_mod
from diff_transformer.train.parallelize import DistInfo

from conftest import write_corpus
from diff_transformer.train.trainer import Trainer

RUNNER = Path(__file__).with_name("fault_runner.py")
STEPS, CKPT_EVERY, KEEP = 12, 2, 2
SETTINGS = ["model.dim=64", "model.n_layers=2", "data.tokenizer=byte", "batch_size=4", "seq_len=16",
            f"steps={STEPS}", "warmup_steps=2", "eval_every=4", "eval_batches=2", f"ckpt_every={CKPT_EVERY}",
            f"keep_last={KEEP}", "log_every=1"]
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The corpus, the shard cache, the train command, and one uninterrupted reference run."""
    root = tmp_path_factory.mktemp("fault")
    corpus = write_corpus(root / "corpus", n_docs=6, chars=2000)
    cache = root / "cache"

    def argv(out: Path, *extra: str) -> list[str]:
        return ["train", "--preset", "tiny", "--data-cache", str(cache), "--no-progress", "--set", *SETTINGS,
                f"data.source={corpus}", *extra, "--out", str(out)]

    ref = root / "ref"
    batches = root / "ref_batches.jsonl"
    proc = launch(argv(ref), batch_log=batches)
    assert proc.returncode == 0, proc.stderr
    return {"root": root, "corpus": corpus, "cache": cache, "argv": argv, "ref": ref, "ref_batches": read_batches(batches)}


def launch(argv: list[str], fault: str = "", batch_log: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FAULT": fault, "FAULT_BATCH_LOG": str(batch_log or "")}
    return subprocess.run([sys.executable, str(RUNNER), *argv], env=env, capture_output=True, text=True, timeout=300)


def read_batches(path: Path) -> list[tuple[int, list]]:
    if not path.is_file():
        return []
    return [(r["step"], r["x"]) for r in map(json.loads, path.read_text().splitlines())]


def curve(run_dir: Path) -> list[tuple]:
    """Every loss-bearing metrics record of a run, without wall-clock figures."""
    out = []
    for m in rundir.read_metrics(run_dir):
        if m["kind"] == "train":
            out.append(("train", m["step"], m["loss"], m["grad_norm"], m["lr"]))
        elif m["kind"] == "eval":
            out.append(("eval", m["step"], m["val_loss"], tuple(m["lambdas"] or ())))
        elif m["kind"] == "event":
            out.append(("event", m["step"], m["event"]))
    return out


def complete_steps(run_dir: Path) -> list[int]:
    return [ckpt.step_of(p) for p in ckpt.complete_checkpoints(run_dir)]


def newest(run_dir: Path) -> int:
    """The step of the newest complete checkpoint (0: none yet)."""
    return ([0] + complete_steps(run_dir))[-1]


def assert_same_final_state(run_dir: Path, ref: Path) -> None:
    """Losses and evaluations, final weights and optimizer state all exactly equal."""
    assert curve(run_dir) == curve(ref)
    a, b = ckpt.checkpoint_path(run_dir, STEPS), ckpt.checkpoint_path(ref, STEPS)
    for name in ("model.safetensors", "optimizer.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    sa, sb = (json.loads((p / ckpt.STATE).read_text()) for p in (a, b))
    assert (sa["step"], sa["bad_steps_total"]) == (sb["step"], sb["bad_steps_total"])
    assert json.loads((a / ckpt.OPTIM_META).read_text()) == json.loads((b / ckpt.OPTIM_META).read_text())


def snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, str]:
    """Every file (by SHA-256) and folder under ``root``."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*")) if not any(p == s or s in p.parents for s in skip)}


# 1 + 6: resume equivalence under SIGKILL and SIGTERM ----------------------------------------------------------
def test_killed_at_random_steps_and_in_a_save_resumes_to_the_same_run(env, tmp_path):
    rng = random.Random(5)
    kills = rng.sample(range(2, STEPS), 3)
    term = rng.choice([s for s in range(2, STEPS) if s not in kills and s % CKPT_EVERY])
    save = rng.choice([s for s in range(CKPT_EVERY, STEPS, CKPT_EVERY) if s not in kills + [term]])
    faults = sorted([(s, f"kill_step:{s}") for s in kills] + [(term, f"term_step:{term}")]
                    + [(save, f"save:{save}:mid")])
    out, ref_batches = tmp_path / "run", env["ref_batches"]
    starts = []
    for i, (step, fault) in enumerate([*faults, (STEPS, "")]):
        start = newest(out)  # where this process must resume
        starts.append(start)
        log = tmp_path / f"batches_{i}.jsonl"
        proc = launch(env["argv"](out), fault, log)
        if fault.startswith("term"):
            assert proc.returncode == 75 and "rerun the same command" in proc.stderr, proc.stderr
            assert newest(out) == step  # the step was finished and saved
        elif fault:
            assert proc.returncode == -signal.SIGKILL, (fault, proc.stderr)
            assert newest(out) < step
        else:
            assert proc.returncode == 0, proc.stderr
        if start:
            assert f"resuming from {ckpt.checkpoint_path(out, start)} (step {start})" in proc.stderr
        # The data order: this process took the reference's batches from its resume point on.
        taken = read_batches(log)
        assert taken == ref_batches[start:start + len(taken)] and len(taken) >= step - start
        assert len(complete_steps(out)) <= KEEP + 1
    assert len(set(starts)) >= 4 and len(taken) == STEPS - starts[-1]
    assert_same_final_state(out, env["ref"])
    assert complete_steps(out) == [STEPS - CKPT_EVERY, STEPS]  # retention: exactly keep_last


# 2: a crash during a save ---------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["before", "mid", "manifest", "marker"])
def test_kill_at_each_stage_of_a_save_keeps_the_previous_checkpoint(env, tmp_path, stage, capsys):
    out = tmp_path / "run"
    proc = launch(env["argv"](out), f"save:6:{stage}")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    partial = ckpt.checkpoint_path(out, 6)
    assert complete_steps(out) == [2, 4] and partial.is_dir() and not (partial / ckpt.MARKER).exists()
    files = {p.name for p in partial.iterdir()}
    if stage == "before":
        assert files == set()
    elif stage == "mid":
        assert "model.safetensors" in files and "optimizer.safetensors" not in files
        assert ".optimizer.safetensors.tmp" in files
    else:
        assert set(TENSOR_FILES) <= files and (ckpt.MANIFEST in files) == (stage == "marker")
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.verify(partial)
    assert rundir.resolve_resume(out, "auto", True, print) == ckpt.checkpoint_path(out, 4)
    capsys.readouterr()
    assert main(env["argv"](out)) == 0
    assert f"resuming from {ckpt.checkpoint_path(out, 4)} (step 4)" in capsys.readouterr().err
    assert_same_final_state(out, env["ref"])
    assert complete_steps(out) == [10, 12]


def test_kill_between_commit_and_pruning_then_keep_last_again(env, tmp_path, capsys):
    out = tmp_path / "run"
    proc = launch(env["argv"](out), "save:6:prune")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert complete_steps(out) == [2, 4, 6]  # committed, not yet pruned: the new one is the newest good one
    capsys.readouterr()
    assert main(env["argv"](out)) == 0
    assert "(step 6)" in capsys.readouterr().err
    assert complete_steps(out) == [10, 12]
    assert_same_final_state(out, env["ref"])


def test_save_writes_temp_files_fsyncs_renames_and_commits_last(env, tmp_path, monkeypatch):
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "run"
    assert main(env["argv"](out, "steps=2")) == 0
    folder = ckpt.checkpoint_path(out, 2)
    mine = [e for e in events if Path(e[-1]) == folder or Path(e[-1]).parent == folder]  # not the tokenizer's own
    renames = [e for e in mine if e[0] == "replace"]
    final = sorted(p.name for p in folder.iterdir())
    assert sorted(Path(e[2]).name for e in renames) == final  # every file arrived by one rename
    for _, src, dst in renames:
        assert Path(src).parent == Path(dst).parent == folder and Path(src).name == f".{Path(dst).name}.tmp"
        synced = mine.index(("fsync", src))
        assert synced < mine.index(("replace", src, dst))  # fsynced under its temporary name, then renamed
    assert [Path(e[2]).name for e in renames[-2:]] == [ckpt.MANIFEST, ckpt.MARKER]  # the marker last
    after_marker = events[events.index(renames[-1]) + 1:]  # then the folder and its parent are fsynced
    assert ("fsync", str(folder)) in after_marker and ("fsync", str(folder.parent)) in after_marker


@pytest.mark.parametrize("rank", [0, 1])
def test_distributed_save_only_rank0_writes_and_commits_after_a_barrier(env, tmp_path, monkeypatch, rank):
    from diff_transformer.data import prepare_dataset
    from diff_transformer.train.config import RunConfig

    run = RunConfig.from_json(env["ref"] / "run.json")
    dataset = prepare_dataset(run.data, env["cache"])
    trainer = Trainer(run, dataset, tmp_path / "run", progress=False, log=lambda m: None)
    (tmp_path / "run").mkdir()
    trainer.dist = DistInfo(rank=rank, world_size=2)
    trainer.step = 2
    path = ckpt.checkpoint_path(tmp_path / "run", 2)
    events = []
    real_write, real_commit = ckpt.write_checkpoint, ckpt.commit
    monkeypatch.setattr(ckpt, "write_checkpoint", lambda *a, **k: (events.append("write"), real_write(*a, **k)))
    monkeypatch.setattr(ckpt, "commit", lambda p: (events.append("commit"), real_commit(p)))
    monkeypatch.setattr(trainer_mod, "barrier", lambda info: events.append(
        ("barrier", (path / ckpt.MARKER).exists())))
    trainer.save()
    if rank == 0:
        assert events == ["write", ("barrier", False), "commit", ("barrier", True)]
        ckpt.verify(path)
    else:
        assert events == [("barrier", False), ("barrier", False)] and not path.exists()


# 3: corruption ------------------------------------------------------------------------------------------------
def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("name,damage", [("model.safetensors", flip), ("optimizer.safetensors", truncate),
                                         ("rng.safetensors", flip), (ckpt.STATE, truncate),
                                         (ckpt.OPTIM_META, flip), (ckpt.MANIFEST, flip)])
def test_corrupt_newest_checkpoint_is_named_skipped_on_auto_resume_and_refused_by_path(env, tmp_path, capsys,
                                                                                         name, damage):
    out = tmp_path / "run"
    shutil.copytree(env["ref"], out)
    newest = ckpt.checkpoint_path(out, STEPS)
    target = newest / name
    want = (json.loads((newest / ckpt.MARKER).read_text())["manifest_sha256"] if name == ckpt.MANIFEST
            else json.loads((newest / ckpt.MANIFEST).read_text())["files"][name]["sha256"])
    damage(target)
    got = ckpt.sha256(target)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.verify(newest)
    assert name in str(info.value) and want in str(info.value) and got in str(info.value)
    # An explicit --resume to it exits non-zero, with one line naming the file and both hashes.
    other = tmp_path / "other"
    capsys.readouterr()
    assert main(env["argv"](other, "--resume", str(newest))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and all(s in err[0] for s in (name, want, got))
    assert not other.exists()
    # Rerunning the same command falls back to the previous checkpoint with a warning and ends as the reference.
    with pytest.warns(ckpt.CheckpointWarning, match=f"skipping checkpoint step_{STEPS:08d}"):
        assert main(env["argv"](out)) == 0
    err = capsys.readouterr().err
    assert f"warning: skipping checkpoint step_{STEPS:08d}" in err and name in err
    assert f"(step {STEPS - CKPT_EVERY})" in err
    ckpt.verify(newest)
    assert_same_final_state(out, env["ref"])


# 4: retention -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [2, 3])
def test_retention_keeps_exactly_keep_last_and_never_the_newest(env, tmp_path, monkeypatch, keep):
    seen = []
    real = ckpt.prune

    def prune(run_dir, keep_last):
        deleted = real(run_dir, keep_last)
        seen.append((complete_steps(run_dir), [ckpt.step_of(p) for p in deleted]))
        return deleted

    monkeypatch.setattr(ckpt, "prune", prune)
    out = tmp_path / "run"
    assert main(env["argv"](out, f"keep_last={keep}")) == 0
    saves = list(range(CKPT_EVERY, STEPS + 1, CKPT_EVERY))
    assert [s[0] for s in seen] == [saves[max(0, i + 1 - keep):i + 1] for i in range(len(saves))]
    for i, (_, deleted) in enumerate(seen):
        assert saves[i] not in deleted and deleted == ([saves[i - keep]] if i >= keep else [])
    assert main(env["argv"](tmp_path / "bad", "keep_last=1")) == 2  # at least 2: one to fall back to


# 5: non-finite steps -----------------------------------------------------------------------------------------
def test_nonfinite_gradient_skips_the_update_and_counts(env, tmp_path, monkeypatch):
    bad = {5}
    orig_loss, orig_step = Trainer._loss, Trainer.train_step
    states = {}

    def loss(self, x, y, reduction="mean"):
        out = orig_loss(self, x, y, reduction)
        if out.requires_grad and self.step + 1 in bad:
            out.register_hook(lambda g: g * float("inf"))  # finite loss, infinite gradient
        return out

    def snap(self):
        return ({k: v.clone() for k, v in self.model.state_dict().items()},
                {n: {k: v.clone() for k, v in s.items()} for n, s in self.optimizer.state.items()})

    def train_step(self):
        states[self.step] = snap(self)  # before step self.step + 1
        return orig_step(self)

    monkeypatch.setattr(Trainer, "_loss", loss)
    monkeypatch.setattr(Trainer, "train_step", train_step)
    out = tmp_path / "run"
    assert main(env["argv"](out)) == 0
    before, after = states[4], states[5]  # around step 5
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1].keys() == after[1].keys() and all(
        torch.equal(before[1][n][k], after[1][n][k]) for n in before[1] for k in before[1][n])
    assert not all(torch.equal(states[5][0][k], states[6][0][k]) for k in states[5][0])  # step 6 updates again
    events = [m for m in rundir.read_metrics(out) if m["kind"] == "event"]
    assert [(e["event"], e["step"], e["bad_steps"], e["bad_steps_total"]) for e in events] == [("nonfinite", 5, 1, 1)]
    assert not math.isfinite(float(events[0]["grad_norm"])) and math.isfinite(float(events[0]["loss"]))
    assert json.loads((ckpt.checkpoint_path(out, STEPS) / ckpt.STATE).read_text())["bad_steps_total"] == 1


@pytest.mark.parametrize("policy", ["rollback", "stop"])
def test_consecutive_bad_steps_roll_back_or_stop_clearly(env, tmp_path, monkeypatch, capsys, policy):
    orig = Trainer._loss
    rolled = []

    def loss(self, x, y, reduction="mean"):
        out = orig(self, x, y, reduction)
        return out * float("nan") if out.requires_grad and self.step + 1 >= 6 else out

    real_load = Trainer.load_weights

    def load_weights(self, checkpoint):
        real_load(self, checkpoint)
        rolled.append((checkpoint.step, {k: torch.equal(v, checkpoint.model_state[k])
                                         for k, v in self.model_state().items()}))

    monkeypatch.setattr(Trainer, "_loss", loss)
    monkeypatch.setattr(Trainer, "load_weights", load_weights)
    out = tmp_path / "run"
    capsys.readouterr()
    code = main(env["argv"](out, "max_bad_steps=2", f"on_bad_steps={policy}"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code == 3 and len(err) == 1
    if policy == "stop":
        assert "2 consecutive steps (6..7) had a non-finite loss or gradient; stopping" in err[0] and rolled == []
    else:  # rolled back once to step 4 (exact weights), bad again: no further rollback to the same checkpoint
        assert [r[0] for r in rolled] == [4] and all(rolled[0][1].values())
        assert "again after rolling back to step 4" in err[0]
    events = [(m["event"], m["step"]) for m in rundir.read_metrics(out) if m["kind"] == "event"]
    assert events[:2] == [("nonfinite", 6), ("nonfinite", 7)]


# 7: no code execution on load ----------------------------------------------------------------------------------
class Evil:
    """Unpickling this creates ``target``."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def rehash(checkpoint: Path) -> None:
    """Make a tampered checkpoint's manifest and marker consistent: hashes prove integrity, not safety."""
    manifest = json.loads((checkpoint / ckpt.MANIFEST).read_text())
    for name, entry in manifest["files"].items():
        entry.update(sha256=ckpt.sha256(checkpoint / name), bytes=(checkpoint / name).stat().st_size)
    (checkpoint / ckpt.MANIFEST).write_text(json.dumps(manifest))
    (checkpoint / ckpt.MARKER).write_text(json.dumps({"manifest_sha256": ckpt.sha256(checkpoint / ckpt.MANIFEST)}))


def _hf_folder(tmp_path: Path, weights: str, payload: bytes) -> Path:
    from diff_transformer.hf import hf_config

    folder = tmp_path / "hf"
    folder.mkdir()
    hf_config(preset("tiny", n_layers=1, vocab_size=300, attention="baseline", head_norm=False)).save_pretrained(folder)
    (folder / weights).write_bytes(payload)
    return folder


ENTRY_POINTS = ["from_pretrained", "load model folder", "generate model folder", "load checkpoint",
                "--resume checkpoint (weights)", "--resume checkpoint (optimizer)", "--resume checkpoint (rng)",
                "auto resume (rng)", "--resume checkpoint (trainer state)", "eval checkpoint", "--config",
                "import_hf pytorch_model.bin"]


@pytest.mark.parametrize("where", ENTRY_POINTS)
def test_a_pickle_is_refused_everywhere_and_never_runs(env, tmp_path, where, capsys):
    target = tmp_path / "pwned"
    payload = pickle.dumps(Evil(target))
    canary = tmp_path / "canary"
    pickle.loads(pickle.dumps(Evil(canary)))  # the payload is live: unpickling it does create its file
    assert canary.exists()
    model_dir = tmp_path / "model"
    DiffTransformerLM(preset("tiny", n_layers=1, vocab_size=257)).save_pretrained(model_dir)
    run = tmp_path / "run"
    shutil.copytree(env["ref"], run)
    newest = ckpt.checkpoint_path(run, STEPS)

    def poison(name: str) -> None:
        (newest / name).write_bytes(payload)
        rehash(newest)

    cli = None
    if where == "from_pretrained":
        (model_dir / "model.safetensors").write_bytes(payload)
        with pytest.raises((ValueError, UserError), match="safetensors"):
            DiffTransformerLM.from_pretrained(model_dir)
    elif where == "load model folder":
        (model_dir / "model.safetensors").write_bytes(payload)
        with pytest.raises(UserError, match="safetensors"):
            diff_transformer.load(model_dir)
    elif where == "generate model folder":
        (model_dir / "model.safetensors").write_bytes(payload)
        cli = ["generate", str(model_dir), "--prompt", "hi"]
    elif where == "load checkpoint":
        poison("model.safetensors")
        with pytest.raises(UserError, match="safetensors"):
            diff_transformer.load(newest)
    elif where.startswith("--resume"):
        poison({"weights": "model.safetensors", "optimizer": "optimizer.safetensors", "rng": "rng.safetensors",
                "trainer state": ckpt.STATE}[where.split("(")[1][:-1]])
        cli = env["argv"](tmp_path / "new", "steps=14", "--resume", str(newest))
    elif where == "auto resume (rng)":
        poison("rng.safetensors")
        cli = env["argv"](run)  # the same command: resumes from the newest checkpoint, which verifies
    elif where == "eval checkpoint":
        poison("model.safetensors")
        cli = ["eval", str(newest), "--data-cache", str(env["cache"])]
    elif where == "--config":
        bad = tmp_path / "run.json"
        bad.write_bytes(payload)
        cli = ["train", "--config", str(bad), "--out", str(tmp_path / "new")]
    elif where == "import_hf pytorch_model.bin":
        bin_file = tmp_path / "probe.bin"
        torch.save({"w": Evil(canary.with_name("canary2"))}, bin_file)
        torch.load(bin_file, weights_only=False)  # live in torch's format too
        assert canary.with_name("canary2").exists()
        torch.save({"w": Evil(target)}, bin_file)
        folder = _hf_folder(tmp_path, "pytorch_model.bin", bin_file.read_bytes())
        from diff_transformer.hf import import_hf

        with pytest.raises(UserError, match="pickled weights"):
            import_hf(folder)
    if cli is not None:
        capsys.readouterr()
        assert main(cli) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
    assert not target.exists()


# 8: bad inputs --------------------------------------------------------------------------------------------------
def _bad_inputs(env, root: Path) -> dict[str, tuple[list[str], str]]:
    """Cases beyond tests/test_cli.py's: (argv, words the one error line must hold)."""
    run, new = root / "run", root / "new"
    shutil.copytree(env["ref"], run)
    newest = ckpt.checkpoint_path(run, STEPS)
    tok = run / "tokenizer"

    def model_folder(name: str, **config) -> Path:
        folder = root / name
        DiffTransformerLM(preset("tiny", n_layers=1, vocab_size=257, **config)).save_pretrained(folder)
        for f in tok.iterdir():
            shutil.copy(f, folder)
        return folder

    empty_w, trunc_w, empty_c, trunc_c, no_w = (model_folder(n) for n in ("empty_w", "trunc_w", "empty_c", "trunc_c",
                                                                          "no_w"))
    (empty_w / "model.safetensors").write_bytes(b"")
    truncate(trunc_w / "model.safetensors")
    (empty_c / "config.json").write_bytes(b"")
    truncate(trunc_c / "config.json")
    (no_w / "model.safetensors").unlink()
    shape = model_folder("shape")
    save_file({k: (v[..., :-1].contiguous() if v.dim() == 2 else v) for k, v in load_file(str(shape / "model.safetensors")).items()},
              str(shape / "model.safetensors"))
    dtype = model_folder("dtype")
    save_file({k: v.to(torch.int32) for k, v in load_file(str(dtype / "model.safetensors")).items()},
              str(dtype / "model.safetensors"))
    small_vocab = root / "small_vocab"  # the byte tokenizer's ids (up to 256) are out of this model's range
    DiffTransformerLM(preset("tiny", n_layers=1, vocab_size=200)).save_pretrained(small_vocab)
    for f in tok.iterdir():
        shutil.copy(f, small_vocab)
    incomplete = root / "incomplete"
    shutil.copytree(newest, incomplete / "checkpoints" / newest.name)
    (incomplete / "checkpoints" / newest.name / ckpt.MARKER).unlink()
    missing_file = root / "missing_file"
    shutil.copytree(newest, missing_file / "checkpoints" / newest.name)
    (missing_file / "checkpoints" / newest.name / "optimizer.safetensors").unlink()
    empty_config = root / "empty.json"
    empty_config.write_text("")
    a_file = root / "a_file"
    a_file.write_text("not a folder")
    gen = ["generate", "--prompt", "The", "--max-new-tokens", "4"]
    return {
        "empty weights": ([*gen, str(empty_w)], "empty_w/model.safetensors"),
        "truncated weights": ([*gen, str(trunc_w)], "trunc_w/model.safetensors"),
        "empty config": ([*gen, str(empty_c)], "config.json"),
        "truncated config": ([*gen, str(trunc_c)], "config.json"),
        "missing weights": ([*gen, str(no_w)], "no weights"),
        "shape mismatch": ([*gen, str(shape)], "shape of"),
        "dtype mismatch": ([*gen, str(dtype)], "dtype of"),
        "prompt ids beyond the vocabulary": ([*gen, str(small_vocab)], "vocab_size is 200"),
        "non-positive new tokens": ([*gen, str(run), "--max-new-tokens", "0"], "--max-new-tokens must be positive"),
        "non-positive eval batches": (["eval", str(run), "--batches", "0", "--data-cache", str(env["cache"])],
                                      "--batches must be positive"),
        "zero steps": (env["argv"](new, "steps=0"), "train.steps"),
        "negative batch size": (env["argv"](new, "batch_size=-4"), "train.batch_size"),
        "zero seq_len": (env["argv"](new, "seq_len=0"), "seq_len"),
        "keep_last below 2": (env["argv"](new, "keep_last=1"), "keep_last must be >= 2"),
        "another model in --out": (env["argv"](run, "model.n_layers=3"), "holds another run"),
        "--out is a file": (env["argv"](a_file), "is a file"),
        "empty --config": (["train", "--config", str(empty_config), "--out", str(new)], "not valid JSON"),
        "incomplete --resume": (env["argv"](new, "--resume", str(incomplete / "checkpoints" / newest.name)),
                                "incomplete"),
        "--resume with a missing file": (env["argv"](new, "--resume", str(missing_file / "checkpoints" / newest.name)),
                                         "optimizer.safetensors is missing"),
        "config mismatch on --resume": (env["argv"](new, "model.n_layers=1", "--resume", str(newest)),
                                        "another model config"),
        "unknown preset": (["train", "--preset", "nano", "--out", str(new)], "nano"),
        "unknown variant": (env["argv"](new, "model.attention=diff_v3"), "diff_v3"),
        "unknown schedule": (env["argv"](new, "schedule=step"), "schedule"),
        "unknown on_bad_steps policy": (env["argv"](new, "on_bad_steps=ignore"), "on_bad_steps"),
    }


def test_bad_inputs_one_line_nonzero_exit_and_folders_byte_identical(env, tmp_path, capsys):
    cases = _bad_inputs(env, tmp_path)
    assert len(cases) >= 20
    for name, (argv, needle) in cases.items():
        before = snapshot(tmp_path)
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (name, err)
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], (name, err)
        assert snapshot(tmp_path) == before, name
