"""Tokenizers: byte-level BPE trained locally, plain bytes, and tiktoken encodings from a local file.

All three share one end-of-text token, the string ``<|endoftext|>``; it separates documents in the
token shards. The literal string ``<|endoftext|>`` inside input text also encodes to the EOS id (as
Hugging Face tokenizers do with special tokens), so ``decode(encode(text)) == text`` for every text.

A tokenizer saves itself into a folder (the dataset cache or a model folder) as
``tokenizer_meta.json`` naming its kind, plus its own files; :func:`load_tokenizer` reads them back.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..errors import UserError
from ..fileio import write_bytes_atomically

EOS_TEXT = "<|endoftext|>"
META_FILE = "tokenizer_meta.json"
BPE_FILE = "tokenizer.json"
TIKTOKEN_FILE = "tokenizer.tiktoken"

# tiktoken's pre-tokenisation regexes (copied from tiktoken_ext/openai_public.py, which would
# download the rank files). A .tiktoken file named after one of these encodings gets its regex and
# its official EOS id; any other file gets the cl100k regex and EOS = the id after its last rank.
_R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)
_O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
# file stem -> (pre-tokenisation regex, EOS id)
KNOWN_TIKTOKEN_ENCODINGS: dict[str, tuple[str, int]] = {
    "gpt2": (_R50K_PATTERN, 50256),
    "r50k_base": (_R50K_PATTERN, 50256),
    "p50k_base": (_R50K_PATTERN, 50256),
    "cl100k_base": (_CL100K_PATTERN, 100257),
    "o200k_base": (_O200K_PATTERN, 199999),
}


@runtime_checkable
class Tokenizer(Protocol):
    """What training, evaluation and generation need from a tokenizer."""

    name: str  # short label, e.g. "bpe", "byte", "tiktoken:cl100k_base"
    vocab_size: int  # number of ids (largest id + 1); the model's embedding size
    eos_id: int  # id of <|endoftext|>, the document separator

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, in parallel where the backend can."""
        ...

    def save(self, directory: str | Path) -> None:
        """Write what :func:`load_tokenizer` needs into ``directory`` (created if missing)."""
        ...


class BPETokenizer:
    """Byte-level BPE (GPT-2 pre-tokenisation, no normaliser) from the ``tokenizers`` library.

    Saved as a standard ``tokenizer.json``: ``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``
    loads it and gives the same ids. EOS is the special token ``<|endoftext|>`` (id 0 when trained here).
    """

    def __init__(self, backend) -> None:  # backend: tokenizers.Tokenizer
        eos_id = backend.token_to_id(EOS_TEXT)
        if eos_id is None:
            raise UserError(
                f"the BPE tokenizer has no {EOS_TEXT} token: use one trained by this package (BPETokenizer.train)"
            )
        self.backend = backend
        self.name = "bpe"
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.eos_id = eos_id

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, length: int | None = None) -> "BPETokenizer":
        """Learn merges on ``texts`` until ``vocab_size`` ids (fewer if the text runs out of pairs).

        Every one of the 256 bytes is in the vocabulary, so any text round-trips. ``length`` is the
        number of texts, for the library's scheduling only.
        """
        from tokenizers import Tokenizer as Backend
        from tokenizers import decoders, models, pre_tokenizers, trainers

        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer, length=length)
        return cls(backend)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch_fast(texts)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_bytes_atomically(directory / BPE_FILE, self.backend.to_str(pretty=True).encode())
        _write_meta(directory, {"kind": "bpe", "name": self.name, "file": BPE_FILE, "eos_token": EOS_TEXT})


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, EOS = 256. Decoding replaces invalid UTF-8 (e.g. a cut character)."""

    def __init__(self) -> None:
        self.name = "byte"
        self.vocab_size = 257
        self.eos_id = 256

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(text.split(EOS_TEXT)):
            if i:
                ids.append(self.eos_id)
            ids.extend(part.encode("utf-8"))
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        eos = EOS_TEXT.encode()
        out = bytearray()
        for i in ids:
            if i == self.eos_id:
                out += eos
            elif 0 <= i < 256:
                out.append(i)
            else:
                raise ValueError(f"id {i} is not a byte tokenizer id (0..256)")
        return out.decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        _write_meta(Path(directory), {"kind": "byte", "name": self.name})


class TiktokenTokenizer:
    """A ``tiktoken.Encoding`` built from a local ``.tiktoken`` rank file; nothing is downloaded.

    The file has one ``<base64 token> <rank>`` per line (the format of OpenAI's published files).
    The pre-tokenisation regex and EOS id come from :data:`KNOWN_TIKTOKEN_ENCODINGS` when the file
    is named after a known encoding (``cl100k_base.tiktoken``); otherwise the cl100k regex and
    EOS = (largest rank + 1).
    """

    def __init__(self, ranks_file_bytes: bytes, name: str, pattern: str, eos_id: int, source: str) -> None:
        import tiktoken

        ranks = _parse_tiktoken_ranks(ranks_file_bytes, source)
        if eos_id in ranks.values():
            raise UserError(f"EOS id {eos_id} of {source} collides with a token rank: the file is not {name}")
        self.ranks_file_bytes = ranks_file_bytes
        self.pattern = pattern
        self.name = f"tiktoken:{name}"
        self.eos_id = eos_id
        self.vocab_size = max(max(ranks.values()), eos_id) + 1
        self.encoding = tiktoken.Encoding(
            name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={EOS_TEXT: eos_id}
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "TiktokenTokenizer":
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(f"tiktoken file {path} does not exist: give the path of a local .tiktoken rank file")
        data = path.read_bytes()
        stem = path.name.removesuffix(".tiktoken")
        if stem in KNOWN_TIKTOKEN_ENCODINGS:
            pattern, eos_id = KNOWN_TIKTOKEN_ENCODINGS[stem]
        else:
            pattern, eos_id = _CL100K_PATTERN, max(_parse_tiktoken_ranks(data, str(path)).values()) + 1
        return cls(data, stem, pattern, eos_id, str(path))

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special={EOS_TEXT})

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_batch(texts, allowed_special={EOS_TEXT})

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(list(ids))

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_bytes_atomically(directory / TIKTOKEN_FILE, self.ranks_file_bytes)
        meta = {
            "kind": "tiktoken",
            "name": self.name.removeprefix("tiktoken:"),
            "file": TIKTOKEN_FILE,
            "pattern": self.pattern,
            "eos_id": self.eos_id,
        }
        _write_meta(directory, meta)


def saved_tokenizer_files(directory: Path) -> list[Path]:
    """The files :meth:`Tokenizer.save` wrote into ``directory`` (the description and what it names)."""
    meta_path = directory / META_FILE
    files = [meta_path]
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, UserError):
        files.append(_inside(directory, json.loads(meta_path.read_text())["file"]))
    return [f for f in files if f.is_file()]


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer that :meth:`Tokenizer.save` wrote into ``directory``."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise UserError(
            f"no tokenizer in {directory} (missing {META_FILE}): give a model or dataset folder that holds one"
        )
    try:
        if meta_path.stat().st_size > 1 << 20:
            raise ValueError("larger than 1 MB")
        meta = json.loads(meta_path.read_text())
        kind = meta["kind"]
        if kind == "byte":
            return ByteTokenizer()
        if kind == "bpe":
            from tokenizers import Tokenizer as Backend

            path = _need(_inside(directory, meta["file"]))
            try:
                backend = Backend.from_file(str(path))
            except Exception as e:  # tokenizers raises a bare Exception on malformed files
                raise UserError(f"{path} is not a tokenizers JSON file ({str(e)[:200]}): save the tokenizer again") from None
            return BPETokenizer(backend)
        if kind == "tiktoken":
            data = _need(_inside(directory, meta["file"])).read_bytes()
            eos_id, name, pattern = meta["eos_id"], meta["name"], meta["pattern"]
            if not (isinstance(eos_id, int) and not isinstance(eos_id, bool) and 0 <= eos_id < 1 << 31):
                raise ValueError(f"eos_id {eos_id!r} is not a token id")
            if not (isinstance(name, str) and isinstance(pattern, str)):
                raise ValueError("name and pattern must be strings")
            try:
                return TiktokenTokenizer(data, name, pattern, eos_id, str(directory))
            except UserError:
                raise
            except Exception as e:  # tiktoken's regex compiler and builder raise their own types
                raise ValueError(f"tiktoken refuses it: {str(e)[:200]}") from None
    except UserError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:  # ValueError: JSON, UTF-8
        raise UserError(f"{meta_path} is not a tokenizer description ({str(e)[:200] or type(e).__name__}): "
                        "save the tokenizer again") from None
    raise UserError(f"{meta_path} names an unknown tokenizer kind {kind!r}: expected bpe, byte or tiktoken")


def pieces(text: str, max_chars: int = 1 << 20) -> Iterator[str]:
    """Cut ``text`` into pieces of about ``max_chars`` whose encodings concatenate to ``encode(text)``.

    Cuts fall only before a single space between two letters ("word| word"): every pre-tokenisation
    regex here (GPT-2's, cl100k's, o200k's) ends a token there, so BPE merges never cross a cut.
    Lets the backends spread one long document over threads. A piece runs longer than ``max_chars``
    up to the next such space when its window has none.
    """
    start = 0
    while len(text) - start > max_chars:
        cut = _word_boundary_near(text, start + max_chars, start)
        if cut is None:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


def _word_boundary_near(text: str, target: int, start: int) -> int | None:
    """The last letter-space-letter space in ``(start, target)``, else the first one after it."""

    def between_letters(i: int) -> bool:
        return text[i - 1].isalpha() and i + 1 < len(text) and text[i + 1].isalpha()

    i = text.rfind(" ", start + 1, target)
    while i > start:
        if between_letters(i):
            return i
        i = text.rfind(" ", start + 1, i)
    i = text.find(" ", target)
    while i != -1:
        if between_letters(i):
            return i
        i = text.find(" ", i + 1)
    return None


def _parse_tiktoken_ranks(data: bytes, source: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise UserError(
                f"line {lineno} of {source} is not '<base64 token> <rank>' ({e}): give an unmodified .tiktoken file"
            ) from e
    if not ranks:
        raise UserError(f"{source} holds no token ranks: give a .tiktoken rank file")
    if len(set(ranks.values())) != len(ranks):
        raise UserError(f"{source} gives one rank to two tokens: give an unmodified .tiktoken file")
    return ranks


def _inside(directory: Path, name) -> Path:
    """``directory / name`` for a plain file name; a path that leaves the folder (absolute, ``..``, a
    subfolder) is refused: a tokenizer description names only files beside it."""
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise UserError(f"{directory / META_FILE} names the file {name!r}, which is not a file in that folder: "
                        "save the tokenizer again")
    return directory / name


def _need(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"tokenizer file {path} is missing: save the tokenizer into that folder again")
    return path


def _write_meta(directory: Path, meta: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(directory / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
