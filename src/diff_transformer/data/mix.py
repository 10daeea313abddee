"""Synthetic examples mixed into training rows as batches are drawn (``data.mix``).

``needle:P``: each row of a training batch becomes, with probability ``P``, a key-value retrieval
example made from the row's own window of text by :func:`synthetic.make_needle_example` with the
training pool (cities of ``TRAIN_CITIES``, numbers of the ``"train"`` residue class: never an
evaluation city or number). A mixed row of ``seq_len + 1`` tokens reads::

    text with 1-4 needles at sentence boundaries  \\n question  answer  EOS  more of the window's text
    <------------------------------------- the inserted example --------->

so the question and its answer close the inserted example (the layout of the evaluation's
prompts, answer included), and the rest of the row is filled with the window's text after the
haystack that the example used, after an EOS. The model is trained on every position as usual.

Determinism: which global rows are mixed is drawn from a generator seeded with ``(seed, step,
MIX_STREAM)``, and row ``r``'s example from one seeded with ``(seed, step, MIX_STREAM, r)``; the window
starts keep their own generator. So a mixed batch is a pure function of ``(seed, step, rank,
world_size)``, ranks together see the one-process batch, and the unmixed rows are exactly the
rows of the run without a mix. Validation batches are never mixed.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError
from .config import parse_mix
from .synthetic import TRAIN_CITIES, make_needle_example, needle_pieces, question_ids
from .tokenizer import Tokenizer

MIX_STREAM = 0x6D6978  # "mix": keeps the mix's draws apart from the window starts' generator
NEEDLES = (1, 4)  # needles hidden in one example, drawn uniformly from this range; the first is asked
LONGEST_NUMBER = 9_999_999  # stands for the longest encoding of a 7-digit number in the fit check


class NeedleMix:
    """Puts retrieval examples into a share ``p`` of the training rows; see the module docstring."""

    def __init__(self, p: float, tokenizer: Tokenizer, seq_len: int) -> None:
        if not 0.0 < p <= 1.0:
            raise ValueError(f"p={p} must lie in (0, 1]; a share of 0 means no mix (build_mix returns None)")
        self.p = p  # chance that a row becomes an example
        self.tokenizer = _Cached(tokenizer)  # encodes needles and questions; its EOS ends an example
        self.row_len = seq_len + 1  # tokens of one row, inputs plus the last target
        # The tokens one needle and its question take at most, over the training cities.
        need = max(
            sum(map(len, needle_pieces(self.tokenizer, c, LONGEST_NUMBER)))
            + len(question_ids(self.tokenizer, c))
            + len(self.tokenizer.encode(f" {LONGEST_NUMBER}"))
            for c in TRAIN_CITIES
        )
        if need >= self.row_len:
            raise UserError(
                f"data.mix=needle needs rows longer than one needle and its question ({need} tokens with this "
                f"tokenizer), but train.seq_len={seq_len}: raise train.seq_len to at least {need} or drop data.mix"
            )

    def mixed_rows(self, seed: int, step: int, batch_size: int) -> np.ndarray:
        """``(batch_size,)`` bool: which rows of the global batch of ``step`` hold an example."""
        return np.random.default_rng((seed, step, MIX_STREAM)).random(batch_size) < self.p

    def example(self, window: np.ndarray, seed: int, step: int, row: int) -> np.ndarray:
        """``window`` ``(seq_len + 1,)`` turned into a row holding a retrieval example (same shape, int64)."""
        rng = np.random.default_rng((seed, step, MIX_STREAM, row))
        n = int(rng.integers(NEEDLES[0], NEEDLES[1] + 1))
        while True:  # fewer needles when the row cannot hold n; the fit check guarantees one
            try:
                ex = make_needle_example(rng, window, self.tokenizer, self.row_len, rng.random(n).tolist(), n, 1,
                                         "train")
                break
            except ValueError:
                if n == 1:
                    raise
                n -= 1
        ids = ex.prompts[0] + ex.answer_ids[0] + [self.tokenizer.eos_id] + window[ex.haystack_tokens:].tolist()
        return np.asarray(ids[: self.row_len], dtype=np.int64)


class _Cached:
    """A tokenizer that remembers the encodings of the number-free template texts (a needle's head,
    its ".", a question: one per training city) and the text of each single token (the generator
    decodes every haystack token to find sentence ends); numbers are encoded afresh each time."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_id
        self._encoded: dict[str, list[int]] = {}
        self._decoded: dict[int, str] = {}

    def encode(self, text: str) -> list[int]:
        if any(c.isdigit() for c in text):
            return self.tokenizer.encode(text)
        if text not in self._encoded:
            self._encoded[text] = self.tokenizer.encode(text)
        return list(self._encoded[text])

    def decode(self, ids: list[int]) -> str:
        if len(ids) != 1:
            return self.tokenizer.decode(ids)
        if ids[0] not in self._decoded:
            self._decoded[ids[0]] = self.tokenizer.decode(ids)
        return self._decoded[ids[0]]


def build_mix(spec: str, tokenizer: Tokenizer, seq_len: int) -> NeedleMix | None:
    """The mix ``data.mix`` names, or None when it mixes nothing (empty, or a share of 0)."""
    p = parse_mix(spec).get("needle", 0.0)
    return NeedleMix(p, tokenizer, seq_len) if p > 0 else None
