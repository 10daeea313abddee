"""What data a run trains on and how it is tokenised."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import UserError

TIKTOKEN_PREFIX = "tiktoken:"
SAVED_PREFIX = "saved:"  # a tokenizer saved by Tokenizer.save (a model folder, a run's tokenizer/)
MIN_BPE_VOCAB = 257  # the 256 byte symbols of byte-level BPE plus the EOS token
MAX_BPE_VOCAB = 1 << 20  # a larger BPE vocabulary aborts the tokenizer trainer (allocation) and helps no model here


@dataclass
class DataConfig:
    """The corpus, the tokenizer, the validation split and the training mix.

    Every field but ``mix`` changes the token shards (and so their cache key); ``mix`` is applied to
    training batches as they are drawn (see ``data.mix``) and leaves the shards and validation as
    they are.
    """

    source: str = "sotu"  # built-in corpus ("sotu", "library", ...: corpora.BUILTIN_CORPORA), a .txt/.md file, a folder, .jsonl or .parquet
    text_field: str = "text"  # field holding the text in JSONL rows and Parquet columns
    tokenizer: str = "bpe"  # "bpe" (trained locally on the train split), "byte", "tiktoken:<file.tiktoken>" or "saved:<folder>"
    vocab_size: int = 8192  # BPE vocabulary size including EOS; ignored by "byte" and "tiktoken:"
    val_fraction: float = 0.05  # share of whole documents held out for validation
    split_seed: int = 0  # which documents are held out
    # Synthetic examples mixed into a share of the training rows at batch time, "" for none;
    # "needle:P" puts a retrieval example into each row with probability P (see data/mix.py). Not
    # part of the shard cache key: it changes batches, not shards; validation is never mixed.
    mix: str = ""

    def __post_init__(self) -> None:
        from ..config import check_field_types

        check_field_types(DataConfig, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                       if f.name != "mix"}, "data")  # parse_mix checks mix with its own message
        if not self.source:
            raise UserError("data source is empty: give 'sotu', a text file, a folder, a .jsonl or a .parquet file")
        if self.tokenizer not in ("bpe", "byte") and not self.tokenizer.startswith((TIKTOKEN_PREFIX, SAVED_PREFIX)):
            raise UserError(
                f"unknown tokenizer {self.tokenizer!r}: use 'bpe', 'byte', 'tiktoken:<path/to/file.tiktoken>' "
                "or 'saved:<folder holding a saved tokenizer>'"
            )
        if self.tokenizer == TIKTOKEN_PREFIX:
            raise UserError("tokenizer 'tiktoken:' names no file: use 'tiktoken:<path/to/file.tiktoken>'")
        if self.tokenizer == SAVED_PREFIX:
            raise UserError("tokenizer 'saved:' names no folder: use 'saved:<model folder or tokenizer folder>'")
        if not MIN_BPE_VOCAB <= self.vocab_size <= MAX_BPE_VOCAB:
            raise UserError(
                f"vocab_size={self.vocab_size} is out of range: byte-level BPE needs at least {MIN_BPE_VOCAB} "
                f"(256 bytes + EOS) and at most {MAX_BPE_VOCAB:,} (the tokenizer trainer allocates per id)"
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"val_fraction={self.val_fraction} must lie strictly between 0 and 1")
        if self.split_seed < 0:
            raise UserError(f"split_seed={self.split_seed} must be a non-negative integer")
        self.mix = ",".join(f"{kind}:{p!r}" for kind, p in parse_mix(self.mix).items())  # canonical: "needle:0.1"
        if not self.text_field:
            raise UserError("text_field is empty: name the JSONL/Parquet field that holds the text")


MIX_KINDS = ("needle",)  # what data.mix can insert: "needle" = key-value retrieval (data/synthetic.py)


def parse_mix(spec: str) -> dict[str, float]:
    """``"needle:0.1"`` -> ``{"needle": 0.1}``; ``""`` or ``"none"`` -> ``{}``. Bad specs raise UserError."""
    fix = f"write data.mix=KIND:P with KIND one of {list(MIX_KINDS)} and P in [0, 1] (e.g. data.mix=needle:0.1)"
    if not isinstance(spec, str):
        raise UserError(f"data.mix={spec!r} is not text: {fix}")
    if spec.strip().lower() in ("", "none"):
        return {}
    kind, sep, raw = spec.partition(":")
    if not sep:
        raise UserError(f"data.mix={spec!r} is malformed: {fix}")
    kind = kind.strip()
    if kind not in MIX_KINDS:
        raise UserError(f"data.mix={spec!r} names an unknown kind {kind!r}: {fix}")
    try:
        p = float(raw)
    except ValueError:
        raise UserError(f"data.mix={spec!r}: the share {raw.strip()!r} is not a number: {fix}") from None
    if not 0.0 <= p <= 1.0:  # also refuses nan
        raise UserError(f"data.mix={spec!r}: the share {p} lies outside [0, 1]: {fix}")
    return {kind: p}
