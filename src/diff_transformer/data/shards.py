"""Tokenise a corpus once into memmap shards with a manifest; reuse them on later runs.

Layout under ``cache_dir``::

    <corpus>-<tokenizer>-<key>/      key = sha256 of the settings below (16 hex digits)
        manifest.json                format version, settings, counts, sha256 of every file
        train.bin, val.bin           little-endian uint16 (vocab <= 65536) or uint32 token ids;
                                     each document followed by EOS
        tokenizer_meta.json, ...     the tokenizer (Tokenizer.save)

The key covers the source's content fingerprint (file hashes, not paths or mtimes: a moved corpus is
reused, an edited one is rebuilt), the tokenizer settings (for tiktoken the rank file's sha256), the
validation fraction and the split seed. Different settings get a new folder; old folders are never
touched. Loading re-checks the sha256 of every file in the folder against the manifest (about 1 GB/s).

Concurrency: the folder appears atomically (built under a temp name, then renamed), and builders
of the same key take an exclusive ``flock`` on ``.<folder>.lock``. When several processes (torchrun
ranks) call :func:`prepare_dataset` at once, one builds and the others wait, then load its result.
A build killed midway can leave a ``.<folder>.tmp-*`` folder behind; it is never read and can be deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..fileio import sha256_file
from .config import SAVED_PREFIX, TIKTOKEN_PREFIX, DataConfig
from .corpora import Corpus, open_corpus
from .tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    load_tokenizer,
    pieces,
    saved_tokenizer_files,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_HASH = "manifest.sha256"  # pins manifest.json (folders built before it existed are checked by content)
SPLITS = ("train", "val")
ENCODE_BATCH_CHARS = 4 << 20  # text handed to one encode_batch call: bounds memory, keeps threads busy


@dataclass
class Dataset:
    """Token shards ready for training, and the tokenizer that made them."""

    path: Path  # the cache folder holding shards, tokenizer files and manifest.json
    tokenizer: Tokenizer  # encodes prompts and decodes samples exactly as the shards were made
    train: np.ndarray  # (n_train_tokens,) read-only memmap of ids; every document followed by EOS
    val: np.ndarray  # (n_val_tokens,) the held-out documents, same layout
    manifest: dict  # the content of manifest.json: settings, counts, checksums
    reused: bool  # True when this call loaded existing shards, False when it tokenised

    @property
    def vocab_size(self) -> int:
        """Number of token ids: the model's embedding size."""
        return self.tokenizer.vocab_size


def prepare_dataset(cfg: DataConfig, cache_dir: str | Path) -> Dataset:
    """Build (first time) or load (later) the shards for ``cfg`` under ``cache_dir``.

    Safe to call from several processes at once; see the module docstring.
    """
    cache_dir = Path(cache_dir).expanduser()
    corpus = open_corpus(cfg.source, cfg.text_field)
    tokenizer_settings, tokenizer_label = _tokenizer_settings(cfg)
    settings = {
        "format_version": FORMAT_VERSION,
        "source": {"kind": corpus.kind, **corpus.fingerprint},
        "tokenizer": tokenizer_settings,
        "val_fraction": cfg.val_fraction,
        "split_seed": cfg.split_seed,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir / f"{corpus.name}-{tokenizer_label}-{key}"
    reused = True
    if not folder.exists():
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the data cache folder {cache_dir} ({e}): choose a writable folder") from e
        try:
            with _exclusive(cache_dir / f".{folder.name}.lock"):
                if not folder.exists():
                    _build(cfg, corpus, settings, key, folder)
                    reused = False
        except OSError as e:  # a full disk or a read-only cache while tokenising
            raise UserError(f"cannot write the data cache in {cache_dir} ({e.strerror or e}): free some space or "
                            "choose another --data-cache") from None
    return _open(folder, reused)


def split_documents(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """``(n_docs,)`` bool mask of the validation documents: a seeded random choice of whole documents.

    ``round(val_fraction * n_docs)`` documents, at least one, and at least one left for training.
    Depends only on ``(n_docs, val_fraction, seed)``.
    """
    if n_docs < 2:
        raise ValueError(f"holding out whole documents needs at least 2, got {n_docs}")
    n_val = min(n_docs - 1, max(1, round(val_fraction * n_docs)))
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(n_docs)[:n_val]] = True
    return is_val


def cut_single_document(text: str, val_fraction: float) -> tuple[str, str]:
    """``(train_text, val_text)`` of a one-document corpus: its last ``val_fraction`` held out.

    The cut moves back to the start of the line it falls in, when that line starts after the
    beginning, so that validation starts on a fresh line.
    """
    cut = round(len(text) * (1.0 - val_fraction))
    line_start = text.rfind("\n", 0, cut) + 1
    if line_start > 0:
        cut = line_start
    train_text, val_text = text[:cut], text[cut:]
    if not train_text.strip() or not val_text.strip():
        raise UserError(
            "the corpus is a single document too short to hold out validation text: add more text or documents"
        )
    return train_text, val_text


def _tokenizer_settings(cfg: DataConfig) -> tuple[dict, str]:
    """What identifies the tokenizer in the cache key, and a short label for the folder name."""
    if cfg.tokenizer == "bpe":
        return {"kind": "bpe", "vocab_size": cfg.vocab_size}, f"bpe{cfg.vocab_size}"
    if cfg.tokenizer == "byte":
        return {"kind": "byte"}, "byte"
    if cfg.tokenizer.startswith(SAVED_PREFIX):
        folder = Path(cfg.tokenizer.removeprefix(SAVED_PREFIX)).expanduser()
        tokenizer = load_tokenizer(folder)  # UserError when the folder holds none
        files = {p.name: sha256_file(p) for p in saved_tokenizer_files(folder)}
        return {"kind": "saved", "name": tokenizer.name, "files": files}, f"saved-{tokenizer.name.replace(':', '-')}"
    path = Path(cfg.tokenizer.removeprefix(TIKTOKEN_PREFIX)).expanduser()
    if not path.is_file():
        raise UserError(f"tiktoken file {path} does not exist: give the path of a local .tiktoken rank file")
    stem = path.name.removesuffix(".tiktoken")
    return {"kind": "tiktoken", "name": stem, "sha256": sha256_file(path)}, f"tiktoken-{stem}"


def _make_tokenizer(cfg: DataConfig, train_docs: Iterable[str], n_train: int) -> Tokenizer:
    """The tokenizer ``cfg`` names; BPE is trained here, on the training documents only."""
    if cfg.tokenizer == "bpe":
        t0 = time.perf_counter()
        texts = (p for doc in train_docs for p in pieces(doc))
        tokenizer = BPETokenizer.train(texts, cfg.vocab_size, length=n_train)
        log.info("trained BPE (%d ids) in %.1f s", tokenizer.vocab_size, time.perf_counter() - t0)
        return tokenizer
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer.startswith(SAVED_PREFIX):
        return load_tokenizer(Path(cfg.tokenizer.removeprefix(SAVED_PREFIX)).expanduser())
    return TiktokenTokenizer.from_file(cfg.tokenizer.removeprefix(TIKTOKEN_PREFIX))


def _build(cfg: DataConfig, corpus: Corpus, settings: dict, key: str, folder: Path) -> None:
    """Tokenise ``corpus`` into ``folder`` (kept as it is if another process's build got there first)."""
    t0 = time.perf_counter()
    log.info("tokenising %s into %s", corpus.origin, folder)
    n_docs = sum(1 for _ in corpus.documents())
    if n_docs == 0:
        raise UserError(f"data source {corpus.origin!r} holds no text: add documents or name another source")
    if n_docs == 1:
        split_mode = "position"
        texts = dict(zip(SPLITS, cut_single_document(next(corpus.documents()), cfg.val_fraction), strict=True))

        def documents(split: str) -> Iterator[str]:
            return iter([texts[split]])

        n_train = 1
    else:
        split_mode = "documents"
        is_val = split_documents(n_docs, cfg.val_fraction, cfg.split_seed)

        def documents(split: str) -> Iterator[str]:
            return (d for d, v in zip(corpus.documents(), is_val, strict=True) if v == (split == "val"))

        n_train = int((~is_val).sum())

    tokenizer = _make_tokenizer(cfg, documents("train"), n_train)
    dtype = np.dtype("<u2") if tokenizer.vocab_size <= 1 << 16 else np.dtype("<u4")
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        tokenizer.save(tmp)
        tokenizer_files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        shards = {
            split: _write_shard(tmp / f"{split}.bin", documents(split), tokenizer, dtype) for split in SPLITS
        }
        manifest = {
            "format_version": FORMAT_VERSION,
            "key": key,
            "settings": settings,
            "source": {"name": corpus.name, "kind": corpus.kind, "origin": corpus.origin, "documents": n_docs},
            "tokenizer": {
                "name": tokenizer.name,
                "vocab_size": tokenizer.vocab_size,
                "eos_id": tokenizer.eos_id,
                "files": tokenizer_files,
            },
            "dtype": dtype.str,
            "split": {"mode": split_mode, "val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed},
            **shards,
            "build_seconds": round(time.perf_counter() - t0, 3),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / MANIFEST_HASH).write_text(sha256_file(tmp / MANIFEST) + "\n")
        try:
            os.rename(tmp, folder)
        except OSError:
            if folder.exists():  # another process, unprotected by flock, finished first: use its folder
                shutil.rmtree(tmp)
                return
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "%s: %d train and %d val tokens in %.1f s",
        folder.name,
        shards["train"]["tokens"],
        shards["val"]["tokens"],
        manifest["build_seconds"],
    )


def _write_shard(path: Path, documents: Iterable[str], tokenizer: Tokenizer, dtype: np.dtype) -> dict:
    """Encode ``documents`` (each followed by EOS) into ``path``; return its manifest entry."""
    h = hashlib.sha256()
    counts = {"documents": 0, "tokens": 0}
    with open(path, "wb") as f:

        def flush(batch: list[str], ends: list[bool]) -> None:
            ids: list[list[int]] = []
            for piece_ids, ends_document in zip(tokenizer.encode_batch(batch), ends, strict=True):
                ids.append(piece_ids)
                if ends_document:
                    ids.append([tokenizer.eos_id])
            data = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype).tobytes()
            f.write(data)
            h.update(data)
            counts["tokens"] += len(data) // dtype.itemsize
            batch.clear()
            ends.clear()

        batch: list[str] = []
        ends: list[bool] = []
        chars = 0
        for doc in documents:
            counts["documents"] += 1
            doc_pieces = list(pieces(doc))
            for i, piece in enumerate(doc_pieces):
                batch.append(piece)
                ends.append(i == len(doc_pieces) - 1)
                chars += len(piece)
            if chars >= ENCODE_BATCH_CHARS:
                flush(batch, ends)
                chars = 0
        flush(batch, ends)
    return {"file": path.name, "sha256": h.hexdigest(), **counts}


def _open(folder: Path, reused: bool) -> Dataset:
    """Load a finished cache folder, checking every file against the manifest."""
    try:
        if (folder / MANIFEST_HASH).is_file():
            want, got = (folder / MANIFEST_HASH).read_text().strip(), sha256_file(folder / MANIFEST)
            if want != got:
                raise ValueError(f"{MANIFEST} has sha256 {got}, {MANIFEST_HASH} says {want[:64]}")
        manifest = json.loads((folder / MANIFEST).read_text())
        _check_manifest(folder, manifest)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # ValueError: JSON too
        raise UserError(f"{folder} is not a valid dataset cache ({str(e)[:300]}): delete that folder to rebuild it") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{folder} has data format {manifest.get('format_version')}, this version reads {FORMAT_VERSION}: "
            "delete that folder to rebuild it"
        )
    expected = {**manifest["tokenizer"]["files"], **{manifest[s]["file"]: manifest[s]["sha256"] for s in SPLITS}}
    for name, want in expected.items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"{path} is missing from the dataset cache: delete {folder} to rebuild it")
        got = sha256_file(path)
        if got != want:
            raise UserError(
                f"{path} has sha256 {got} but its manifest says {want}: the file changed on disk; "
                f"delete {folder} to rebuild it"
            )
    tokens = {s: np.memmap(folder / manifest[s]["file"], dtype=np.dtype(manifest["dtype"]), mode="r") for s in SPLITS}
    tokenizer = load_tokenizer(folder)
    if (tokenizer.vocab_size, tokenizer.eos_id) != (manifest["tokenizer"]["vocab_size"], manifest["tokenizer"]["eos_id"]):
        raise UserError(f"{folder}: its tokenizer has {tokenizer.vocab_size} ids (EOS {tokenizer.eos_id}), its {MANIFEST} "
                        f"says {manifest['tokenizer']['vocab_size']} (EOS {manifest['tokenizer']['eos_id']}): delete that "
                        "folder to rebuild it")
    return Dataset(folder, tokenizer, tokens["train"], tokens["val"], manifest, reused)


def _check_manifest(folder: Path, manifest) -> None:
    """Raise ValueError/TypeError/KeyError unless ``manifest`` describes shards this version wrote."""
    if not isinstance(manifest, dict):
        raise TypeError(f"{MANIFEST} is not an object")
    vocab, eos = manifest["tokenizer"]["vocab_size"], manifest["tokenizer"]["eos_id"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (vocab, eos)) or not 0 <= eos < vocab <= 2**32:
        raise ValueError(f"tokenizer vocab_size {vocab!r} / eos_id {eos!r} are not token counts")
    want = "<u2" if vocab <= 1 << 16 else "<u4"  # what _build writes
    if manifest["dtype"] != want:
        raise ValueError(f"dtype {manifest['dtype']!r}: shards of a {vocab}-id tokenizer are {want!r}")
    if manifest.get("key") != folder.name.rsplit("-", 1)[-1]:
        raise ValueError(f"key {manifest.get('key')!r} is not the folder's")
    hashes = list(manifest["tokenizer"]["files"].values()) + [manifest[s]["sha256"] for s in SPLITS]
    if not all(isinstance(h, str) for h in hashes):
        raise ValueError("its sha256 entries are not strings")
    names = list(manifest["tokenizer"]["files"]) + [manifest[s]["file"] for s in SPLITS]
    if not all(isinstance(n, str) and n and Path(n).name == n and n not in (".", "..") for n in names):
        raise ValueError(f"it names files outside the folder ({names})")
    for s in SPLITS:
        n = manifest[s]["tokens"]
        if not isinstance(n, int) or (folder / manifest[s]["file"]).stat().st_size != n * int(want[-1]):
            raise ValueError(f"{manifest[s]['file']} does not hold {n!r} tokens of {want}")


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_path`` (a no-op where fcntl is missing; the rename still protects)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
