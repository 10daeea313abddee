"""Synthetic retrieval examples: the "special magic number" needles of the multi-needle test.

The needle-in-a-haystack protocol of the DIFF paper (Section 3.4, after LWM): needles
``"The special magic number for {city} is: {number}."`` with 7-digit numbers are hidden in a
haystack of ordinary text, and the model is asked
``"What is the special magic number for {city}? The special magic number for {city} is:"``.

Evaluation and training never share a needle: the cities come from two disjoint pools
(:data:`EVAL_CITIES`, :data:`TRAIN_CITIES`) and the numbers from two disjoint residue classes,
``number_pool(n) = "eval"`` when the CRC-32 of the number's decimal string is even, ``"train"``
when it is odd (a hash, not the last digit, so the split leaves no visible pattern in the digits).
A model trained on a ``pool="train"`` mix has never seen an evaluation city or number.

Everything here is a pure function of its arguments; randomness comes from the numpy
``Generator`` passed in, so an example is a deterministic function of the generator's state.

Token layout of one example (pieces are encoded separately and concatenated, so the needle's
number tokens are exactly the tokens of the answer ``" {number}"``)::

    haystack[:a] ␣needle_0 haystack[a:b] ␣needle_1 ... haystack[z:]  \\n question  |  answer
    <-------------------------------- context -------------------------------->
    <--------------------------------- prompt ----------------------------------->  <- answer ->

``len(prompt) + len(ids of any needle's number) <= context_len`` for every question, so the model
can read the prompt and produce (or be teacher-forced on) any candidate answer inside its context.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Pool = Literal["eval", "train"]

NEEDLE_TEMPLATE = "The special magic number for {city} is: {number}."
QUESTION_TEMPLATE = "What is the special magic number for {city}? The special magic number for {city} is:"
NUMBER_LOW, NUMBER_HIGH = 1_000_000, 10_000_000  # 7-digit numbers, [low, high)

# Two disjoint pools of 64 cities each: evaluation prompts use only EVAL_CITIES, training mixes
# only TRAIN_CITIES (tests/test_evals.py checks they are disjoint).
EVAL_CITIES: tuple[str, ...] = (
    "Chicago", "Yangon", "Antananarivo", "Colombo", "Almaty", "Sydney", "Mumbai", "Tokyo",
    "Cairo", "Lima", "Oslo", "Nairobi", "Havana", "Kathmandu", "Reykjavik", "Montevideo",
    "Dakar", "Hanoi", "Tbilisi", "Quito", "Helsinki", "Accra", "Manila", "Santiago",
    "Vienna", "Casablanca", "Jakarta", "Bogota", "Lisbon", "Tashkent", "Kampala", "Wellington",
    "Krakow", "Seville", "Osaka", "Marseille", "Porto", "Valparaiso", "Zanzibar", "Mandalay",
    "Cusco", "Kyoto", "Dubrovnik", "Tallinn", "Riga", "Vilnius", "Bratislava", "Ljubljana",
    "Sarajevo", "Skopje", "Tirana", "Yerevan", "Baku", "Bishkek", "Dushanbe", "Ulaanbaatar",
    "Thimphu", "Vientiane", "Phnom Penh", "Kuala Lumpur", "Brisbane", "Perth", "Auckland", "Suva",
)
TRAIN_CITIES: tuple[str, ...] = (
    "Boston", "Denver", "Seattle", "Atlanta", "Houston", "Phoenix", "Dallas", "Miami",
    "Toronto", "Montreal", "Vancouver", "Calgary", "Mexico City", "Guadalajara", "Monterrey", "Cartagena",
    "Caracas", "Medellin", "Buenos Aires", "Cordoba", "Rosario", "Sao Paulo", "Rio de Janeiro", "Recife",
    "London", "Paris", "Berlin", "Madrid", "Rome", "Milan", "Naples", "Munich",
    "Hamburg", "Amsterdam", "Rotterdam", "Brussels", "Antwerp", "Zurich", "Geneva", "Prague",
    "Warsaw", "Budapest", "Bucharest", "Sofia", "Athens", "Istanbul", "Ankara", "Beirut",
    "Amman", "Riyadh", "Doha", "Muscat", "Tehran", "Karachi", "Lahore", "Delhi",
    "Chennai", "Kolkata", "Dhaka", "Bangkok", "Singapore", "Seoul", "Beijing", "Shanghai",
)
assert not set(EVAL_CITIES) & set(TRAIN_CITIES), "the city pools must be disjoint"


def number_pool(number: int) -> Pool:
    """``"eval"`` when crc32 of the decimal string is even, else ``"train"``: two disjoint number sets."""
    return "eval" if zlib.crc32(str(int(number)).encode()) % 2 == 0 else "train"


def cities(pool: Pool) -> tuple[str, ...]:
    if pool == "eval":
        return EVAL_CITIES
    if pool == "train":
        return TRAIN_CITIES
    raise ValueError(f"pool must be 'eval' or 'train', got {pool!r}")


def draw_numbers(rng: np.random.Generator, n: int, pool: Pool) -> list[int]:
    """``n`` distinct 7-digit numbers of ``pool``'s residue class (rejection sampling, ~2 draws each)."""
    cities(pool)  # validates pool
    out: list[int] = []
    while len(out) < n:
        x = int(rng.integers(NUMBER_LOW, NUMBER_HIGH))
        if number_pool(x) == pool and x not in out:
            out.append(x)
    return out


@dataclass(frozen=True)
class NeedleExample:
    """One haystack with ``n_needles`` needles and one prompt per asked needle.

    Positions are token indices into ``context`` (and so into every prompt, which starts with it).
    """

    context: list[int]  # haystack with the needles inserted
    prompts: list[list[int]]  # context + "\\n" + question, one per asked needle
    answers: list[str]  # the asked numbers as strings ("4817263"), aligned with prompts
    answer_ids: list[list[int]]  # token ids of " {number}" for each asked needle: the continuation scored
    cities: list[str]  # every needle's city, in insertion order (needle i at depths[i])
    numbers: list[int]  # every needle's number
    asked: list[int]  # indices into cities/numbers of the asked needles, aligned with prompts
    needle_spans: list[tuple[int, int]]  # [start, end) of each whole needle sentence in context
    number_spans: list[tuple[int, int]]  # [start, end) of each needle's number tokens in context
    depths: list[float]  # the depth each needle was asked for (fraction of the haystack)
    actual_depths: list[float]  # where it landed: insertion offset / haystack tokens used
    haystack_tokens: int  # haystack tokens used (context minus needles)

    def candidate_ids(self) -> list[list[int]]:
        """Token ids of every needle's ``" {number}"``: the candidates of the rank score."""
        return [list(self.context[s:e]) for s, e in self.number_spans]


def needle_pieces(tokenizer, city: str, number: int) -> tuple[list[int], list[int], list[int]]:
    """(ids of " The special magic number for {city} is:", ids of " {number}", ids of ".")."""
    head, _, _ = NEEDLE_TEMPLATE.partition(" {number}")
    return (tokenizer.encode(" " + head.format(city=city)), tokenizer.encode(f" {number}"), tokenizer.encode("."))


def question_ids(tokenizer, city: str) -> list[int]:
    return tokenizer.encode("\n" + QUESTION_TEMPLATE.format(city=city))


def _boundaries(haystack: Sequence[int], tokenizer, budget: int) -> tuple[list[int], list[int]]:
    """Offsets in ``[0, budget]`` where an insertion splits no sentence, and where it splits no word.

    Offset ``i`` is a sentence boundary when token ``i - 1`` ends with ``.``, ``!``, ``?`` or a
    newline (after stripping trailing spaces/quotes); a word boundary when token ``i`` starts with
    whitespace or token ``i - 1`` ends with it. 0 and ``budget`` are both kinds.
    """
    cache: dict[int, str] = {}

    def text(t: int) -> str:
        if t not in cache:
            try:
                cache[t] = tokenizer.decode([int(t)])
            except ValueError:
                cache[t] = ""
        return cache[t]

    sentence, word = [0], [0]
    for i in range(1, budget):
        prev, cur = text(haystack[i - 1]), text(haystack[i])
        if prev.rstrip(" \"')").endswith((".", "!", "?")) or prev.endswith("\n"):
            sentence.append(i)
        if cur[:1].isspace() or prev[-1:].isspace():
            word.append(i)
    sentence.append(budget)
    word.append(budget)
    return sentence, word


def _nearest(candidates: list[int], target: float) -> int:
    idx = int(np.searchsorted(candidates, target))
    best = [candidates[j] for j in (idx - 1, idx) if 0 <= j < len(candidates)]
    return min(best, key=lambda c: (abs(c - target), c))


def make_needle_example(
    rng: np.random.Generator,
    haystack_ids: Sequence[int],
    tokenizer,
    context_len: int,
    depths: Sequence[float],
    n_needles: int,
    n_asked: int,
    pool: Pool,
) -> NeedleExample:
    """Hide ``n_needles`` needles in the start of ``haystack_ids`` and ask for ``n_asked`` of them.

    Args:
        rng: the only source of randomness (cities, numbers, which needles are asked).
        haystack_ids: token ids of ordinary text, at least as many as the context leaves for it;
            the haystack is cut at its last sentence end when that is within its last tenth.
        tokenizer: encodes the needles and questions (``encode``/``decode``).
        context_len: the prompt plus the longest needle number is at most this many tokens.
        depths: one fraction in [0, 1] per needle: where in the haystack needle ``i`` goes. Each
            needle goes to the sentence boundary nearest ``depth * haystack_tokens`` (a word
            boundary if the haystack has no sentence boundary within one tenth of its length of the
            target, the exact token offset if it has no word boundary either).
        n_needles: needles in the haystack; their cities and numbers are distinct.
        n_asked: how many of them are asked, one prompt each; the asked ones are the first
            ``n_asked`` needles (so ``depths[:n_asked]`` places the asked needles).
        pool: ``"eval"`` or ``"train"``: which city pool and number residue class to draw from.

    Raises ValueError when the arguments are inconsistent or the haystack is too short.
    """
    if len(depths) != n_needles:
        raise ValueError(f"depths has {len(depths)} entries; give one per needle ({n_needles})")
    if not 1 <= n_asked <= n_needles:
        raise ValueError(f"n_asked={n_asked} must lie in [1, n_needles={n_needles}]")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must lie in [0, 1]; got {list(depths)}")
    city_pool = cities(pool)
    if n_needles > len(city_pool):
        raise ValueError(f"n_needles={n_needles} exceeds the {len(city_pool)} cities of the {pool} pool")
    chosen = [city_pool[i] for i in rng.choice(len(city_pool), size=n_needles, replace=False)]
    numbers = draw_numbers(rng, n_needles, pool)
    pieces = [needle_pieces(tokenizer, c, x) for c, x in zip(chosen, numbers)]
    questions = [question_ids(tokenizer, chosen[i]) for i in range(n_asked)]
    answer_ids = [pieces[i][1] for i in range(n_asked)]
    needle_len = sum(len(a) + len(b) + len(c) for a, b, c in pieces)
    tail = max(len(q) for q in questions) + max(len(p[1]) for p in pieces)  # any needle's number may be scored
    budget = context_len - needle_len - tail
    if budget < 0:
        raise ValueError(f"context_len={context_len} cannot hold {n_needles} needles and a question "
                         f"({needle_len + tail} tokens); use a longer context or fewer needles")
    if len(haystack_ids) < budget:
        raise ValueError(f"the haystack has {len(haystack_ids)} tokens; {budget} are needed for context_len={context_len}")
    haystack = [int(t) for t in haystack_ids[:budget]]

    sentence, word = _boundaries(haystack, tokenizer, budget)
    if len(sentence) > 2 and sentence[-2] >= 0.9 * budget:  # end the haystack on a whole sentence
        budget = sentence[-2]
        haystack = haystack[:budget]
        sentence, word = sentence[:-1], [w for w in word if w <= budget]
    offsets = []
    for d in depths:
        target = d * budget
        at = _nearest(sentence, target)
        if abs(at - target) > max(1.0, 0.1 * budget):
            at = _nearest(word, target)
        offsets.append(at)

    # Insert in offset order (ties keep needle order) and track every span.
    order = sorted(range(n_needles), key=lambda i: (offsets[i], i))
    context: list[int] = []
    needle_spans: list[tuple[int, int]] = [(0, 0)] * n_needles
    number_spans: list[tuple[int, int]] = [(0, 0)] * n_needles
    prev = 0
    for i in order:
        context.extend(haystack[prev:offsets[i]])
        prev = offsets[i]
        head, num, dot = pieces[i]
        start = len(context)
        number_spans[i] = (start + len(head), start + len(head) + len(num))
        context.extend(head + num + dot)
        needle_spans[i] = (start, len(context))
    context.extend(haystack[prev:])
    prompts = [context + q for q in questions]
    return NeedleExample(
        context=context,
        prompts=prompts,
        answers=[str(numbers[i]) for i in range(n_asked)],
        answer_ids=answer_ids,
        cities=chosen,
        numbers=numbers,
        asked=list(range(n_asked)),
        needle_spans=needle_spans,
        number_spans=number_spans,
        depths=[float(d) for d in depths],
        actual_depths=[o / budget if budget else 0.0 for o in offsets],
        haystack_tokens=budget,
    )
