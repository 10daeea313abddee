"""Contextual hallucination, judge-free PROXIES (the paper's Section 3.6 used a GPT-4o judge on
summaries and QA, which cannot run here). Two synthetic probes, deterministic from ``ctx.seed``:

(a) Key-value records ("kv"). A document lists employee records such as
``ID 4821: Alice Moreau, city Lyon, department Finance.``; among them are look-alike
records whose IDs differ from the asked one by a digit or a swap (4812, 4827) and whose values differ.
The question asks one field of one ID. Two conditions:

- ``present``: the asked record is in the document; the right answer is its value. Copying a look-alike's
  value is a hallucination (the answer is grounded in the context, but in the wrong record).
- ``removed``: the asked record is taken out (its look-alikes stay); the instruction says to answer
  ``unknown`` for an unlisted ID, so ``unknown`` is right and any value is a hallucination.

Scored two ways: by log-likelihood choice among the right value (or, when removed, the value the
record had), the look-alikes' values and ``unknown``; and by greedy generation (the text up to the
first newline, comma or period, compared exactly, case-insensitively). Reported per condition and way:
accuracy, hallucination rate (a look-alike's value chosen, or any value when the right answer is
unknown) and abstention rate (``unknown`` chosen); greedy answers that match nothing count as
``other``.

(b) Context contradicts memory ("counterfactual"). Written-out common facts (capitals, colours,
counts, ...) each restated by the context with another answer, e.g. ``In this story, the capital of
France is Lyon.`` then ``Question: What is the capital of France?``. Measured: how often the model
follows the context over its memory (log-likelihood of the context's answer against the common one,
and greedy exact match of either), and, as a control, how often it prefers the common answer with no
context (``knows_fact``: whether there is a memory to override at all).

Why small models may score at chance: the kv probe needs exact retrieval of one record among
look-alikes plus an instruction (abstain when absent) that small or briefly trained models do not
follow, so log-likelihood choices then fall near 1 / (number of candidates) and greedy answers are
mostly ``other``; the counterfactual probe means little where ``knows_fact`` is at 50% (no memory to
contradict). These are proxies for the paper's judged hallucination rates, not the same measure.
"""

from __future__ import annotations

import random
from pathlib import Path

from ..errors import UserError
from .base import EvalContext, register
from .common import pyplot, save_figure
from .scoring import greedy_generate, score_continuations

NOTE = ("judge-free PROXY of contextual hallucination (the paper used a GPT-4o judge): synthetic key-value "
        "records with look-alike distractors and a removed-record condition, and counterfactual contexts "
        "against memorised facts")

FIRST = ["Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Keiko",
         "Luis", "Mara", "Nils", "Olga", "Pavel", "Rosa", "Samir", "Tanya", "Viktor"]
LAST = ["Moreau", "Bianchi", "Novak", "Larsen", "Okafor", "Silva", "Keller", "Tanaka", "Dubois", "Haddad",
        "Kowalski", "Lindqvist", "Romero", "Petrov", "Nakamura", "Fischer"]
FIELDS = {
    "city": ["Lyon", "Porto", "Graz", "Leeds", "Turin", "Ghent", "Bergen", "Krakow", "Seville", "Utrecht",
             "Malmo", "Basel", "Bilbao", "Aarhus", "Brno", "Nantes"],
    "department": ["Finance", "Legal", "Sales", "Research", "Logistics", "Marketing", "Security", "Design",
                   "Support", "Training", "Purchasing", "Facilities"],
}
UNKNOWN = "unknown"
KV_HEADER = f"Answer with the value, or {UNKNOWN} if the ID is not listed.\n\n"
KV_QUESTION = "\n\nQuestion: What is the {field} of ID {key}?\nAnswer:"

# (question word, subject, common answer, the context's answer)
FACTS: list[tuple[str, str, str, str]] = [
    ("What", "the capital of France", "Paris", "Lyon"),
    ("What", "the capital of Italy", "Rome", "Milan"),
    ("What", "the capital of Japan", "Tokyo", "Osaka"),
    ("What", "the capital of Germany", "Berlin", "Munich"),
    ("What", "the capital of Spain", "Madrid", "Barcelona"),
    ("What", "the capital of Egypt", "Cairo", "Alexandria"),
    ("What", "the capital of England", "London", "Manchester"),
    ("What", "the capital of Greece", "Athens", "Thessaloniki"),
    ("What", "the capital of China", "Beijing", "Shanghai"),
    ("What", "the capital of Canada", "Ottawa", "Toronto"),
    ("What", "the capital of Kenya", "Nairobi", "Mombasa"),
    ("What", "the capital of Norway", "Oslo", "Bergen"),
    ("What", "the capital of Poland", "Warsaw", "Krakow"),
    ("What", "the capital of Portugal", "Lisbon", "Porto"),
    ("What", "the capital of Russia", "Moscow", "Kazan"),
    ("What", "the capital of Australia", "Canberra", "Sydney"),
    ("What", "the colour of the sky on a clear day", "blue", "green"),
    ("What", "the colour of fresh grass", "green", "purple"),
    ("What", "the colour of snow", "white", "red"),
    ("What", "the colour of a ripe banana", "yellow", "black"),
    ("What", "the colour of coal", "black", "white"),
    ("What", "the number of days in a week", "seven", "nine"),
    ("What", "the number of legs of a spider", "eight", "six"),
    ("What", "the number of months in a year", "twelve", "ten"),
    ("What", "the number of sides of a triangle", "three", "five"),
    ("What", "the number of wheels on a bicycle", "two", "three"),
    ("What", "the number of legs of a dog", "four", "five"),
    ("What", "the largest planet in the solar system", "Jupiter", "Mars"),
    ("What", "the closest planet to the Sun", "Mercury", "Venus"),
    ("What", "the chemical symbol for gold", "Au", "Ag"),
    ("What", "the language spoken in Brazil", "Portuguese", "Spanish"),
    ("What", "the currency of Japan", "yen", "euro"),
    ("What", "the tallest mountain on Earth", "Everest", "Kilimanjaro"),
    ("What", "the longest river in Africa", "Nile", "Congo"),
    ("What", "the largest ocean on Earth", "Pacific", "Atlantic"),
    ("What", "the boiling point of water in degrees Celsius", "100", "80"),
    ("Who", "the author of Hamlet", "Shakespeare", "Dickens"),
    ("Who", "the inventor of the telephone", "Bell", "Edison"),
    ("Who", "the first person to walk on the Moon", "Armstrong", "Gagarin"),
    ("Who", "the painter of the Mona Lisa", "Leonardo", "Picasso"),
    ("Who", "the composer of the Ninth Symphony with the Ode to Joy", "Beethoven", "Mozart"),
]
STORY = ["In this story, {subject} is {answer}.", "In the world of this novel, {subject} is {answer}.",
         "According to the passage, {subject} is {answer}.", "In this fictional world, {subject} is {answer}."]
FACT_QUESTION = "\nQuestion: {wh} is {subject}?\nAnswer:"


# (a) key-value records ------------------------------------------------------------------------
def lookalike_keys(key: str, n: int, rng: random.Random, taken: set[str]) -> list[str]:
    """``n`` distinct 4-digit IDs one edit from ``key``: a swap of two adjacent digits or one digit changed."""
    candidates = set()
    for i in range(len(key) - 1):
        if key[i] != key[i + 1]:
            candidates.add(key[:i] + key[i + 1] + key[i] + key[i + 2:])
    for i in range(len(key)):
        for d in "0123456789":
            if d != key[i] and not (i == 0 and d == "0"):
                candidates.add(key[:i] + d + key[i + 1:])
    return rng.sample(sorted(candidates - taken - {key}), n)


def record_text(key: str, rec: dict) -> str:
    return f"ID {key}: {rec['name']}, city {rec['city']}, department {rec['department']}."


def make_kv_item(rng: random.Random, *, removed: bool, n_records: int = 6, n_lookalikes: int = 2) -> dict:
    """One document + question: the asked ID, its look-alikes (values differing in the asked field) and
    filler records; the asked record left out when ``removed``."""
    if n_lookalikes < 1 or n_records < n_lookalikes + 1:
        raise UserError("--opt records must exceed lookalikes, and lookalikes be at least 1")
    field = rng.choice(sorted(FIELDS))
    key = str(rng.randint(1000, 9999))
    look = lookalike_keys(key, n_lookalikes, rng, set())
    taken = {key, *look}
    fillers = []
    while len(fillers) < n_records - 1 - n_lookalikes:
        k = str(rng.randint(1000, 9999))
        if k not in taken and all(sum(a != b for a, b in zip(k, t)) > 1 for t in taken):
            fillers.append(k)
            taken.add(k)
    values = rng.sample(FIELDS[field], 1 + n_lookalikes)  # the target's and the look-alikes': all different
    records = {}
    for i, k in enumerate([key, *look, *fillers]):
        rec = {"name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
               **{f: rng.choice(vals) for f, vals in FIELDS.items()}}
        if i <= n_lookalikes:
            rec[field] = values[i]
        records[k] = rec
    shown = [k for k in records if not (removed and k == key)]
    rng.shuffle(shown)
    document = KV_HEADER + "\n".join(record_text(k, records[k]) for k in shown)
    return {"prompt": document + KV_QUESTION.format(field=field, key=key), "field": field, "key": key,
            "condition": "removed" if removed else "present", "value": values[0],
            "answer": UNKNOWN if removed else values[0], "distractors": values[1:]}


def _normalise(text: str) -> str:
    for stop in ("\n", ",", "."):
        text = text.split(stop)[0]
    return " ".join(text.split()).lower()


def kv_outcome(item: dict, answer: str) -> str:
    """``correct``, ``hallucination``, ``abstain`` or ``other`` for a chosen or generated answer."""
    a = _normalise(answer)
    if a == _normalise(item["answer"]):
        return "correct"
    if a == UNKNOWN:
        return "abstain"
    if a in {_normalise(d) for d in item["distractors"]} or (item["condition"] == "removed" and a):
        return "hallucination"  # a look-alike copied, or any value where none is listed
    return "other"


def kv_candidates(item: dict) -> list[str]:
    """The answers the log-likelihood choice ranges over: the record's value, the look-alikes', unknown."""
    return [item["value"], *item["distractors"], UNKNOWN]


# Scoring helpers --------------------------------------------------------------------------------
def choose(model, tokenizer, prompt: str, candidates: list[str], *, amp: bool = False) -> str:
    """The candidate whose ``" " + candidate`` has the highest summed log-probability after ``prompt``."""
    ids = tokenizer.encode(prompt)
    scores = score_continuations(model, ids, [tokenizer.encode(" " + c) for c in candidates], amp=amp)
    return candidates[max(range(len(candidates)), key=lambda i: scores[i].logprob)]


def generate(model, tokenizer, prompt: str, *, max_new_tokens: int = 12, amp: bool = False) -> str:
    ids = greedy_generate(model, tokenizer.encode(prompt), max_new_tokens, stop_ids={tokenizer.eos_id}, amp=amp)
    return tokenizer.decode(ids)


def _rates(outcomes: list[str]) -> dict:
    n = len(outcomes)
    return {name: sum(o == name for o in outcomes) / n for name in ("correct", "hallucination", "abstain", "other")}


def kv_items(ctx: EvalContext, condition: str, n_items: int, n_records: int, n_look: int) -> list[dict]:
    rng = random.Random(f"hallucination-kv/{ctx.seed}/{condition}")
    return [make_kv_item(rng, removed=condition == "removed", n_records=n_records, n_lookalikes=n_look)
            for _ in range(n_items)]


def fit_records(ctx: EvalContext, n_items: int, n_records: int | None, n_look: int, extra: int
                ) -> tuple[int, int]:
    """(records, look-alikes) per document: as given, or by default the most (up to 6) whose every
    prompt plus ``extra`` tokens (the longest answer) fits the model's context; UserError when none fits.
    Greedy generation stops at the context's end."""
    limit = ctx.model.config.max_seq_len
    tries = [n_records] if n_records is not None else range(6, 1, -1)
    longest = 0
    for n in tries:
        look = min(n_look, n - 1)
        longest = max(len(ctx.tokenizer.encode(item["prompt"])) + extra
                      for cond in ("present", "removed") for item in kv_items(ctx, cond, n_items, n, look))
        if longest <= limit:
            return n, look
    raise UserError(f"a key-value prompt needs {longest} tokens but the model's context is {limit}"
                    + (": use fewer records (--opt records=N)" if n_records is not None else
                       " even with 2 records: the hallucination probe needs a longer context"))


# (b) counterfactual facts -----------------------------------------------------------------------
def make_fact_items(seed: int, n: int | None = None) -> list[dict]:
    rng = random.Random(f"hallucination-facts/{seed}")
    facts = list(FACTS)
    rng.shuffle(facts)
    items = []
    for wh, subject, common, alt in facts[:n]:
        story = rng.choice(STORY).format(subject=subject, answer=alt)
        question = FACT_QUESTION.format(wh=wh, subject=subject)
        items.append({"prompt": story + question, "control": question.lstrip("\n"), "context_answer": alt,
                      "memory_answer": common})
    return items


def run(ctx: EvalContext) -> dict:
    model, tok = ctx.model, ctx.tokenizer
    n_items = ctx.option("n_items", 50)
    n_records, n_look = ctx.option("records", None, int), ctx.option("lookalikes", 2)
    max_new = ctx.option("max_new_tokens", 16)
    n_facts = ctx.option("n_facts", len(FACTS))
    if n_items < 1 or n_facts < 1 or max_new < 1:
        raise UserError("--opt n_items, n_facts and max_new_tokens must be positive")
    longest_value = max(len(tok.encode(" " + v + "\n")) for v in [UNKNOWN, *FIELDS["city"], *FIELDS["department"]])
    n_records, n_look = fit_records(ctx, n_items, n_records, n_look, longest_value)
    from tqdm import tqdm

    kv: dict[str, dict] = {}
    rows = []
    for condition in ("present", "removed"):
        items = kv_items(ctx, condition, n_items, n_records, n_look)
        ll, greedy = [], []
        for item in tqdm(items, desc=f"kv {condition}", disable=not ctx.progress, leave=False):
            pick = choose(model, tok, item["prompt"], kv_candidates(item), amp=ctx.amp)
            text = generate(model, tok, item["prompt"], max_new_tokens=max_new, amp=ctx.amp)
            ll.append(kv_outcome(item, pick))
            greedy.append(kv_outcome(item, text))
            if len(rows) < 6:
                rows.append({"condition": condition, "answer": item["answer"], "choice": pick, "greedy": text,
                             "prompt_tail": item["prompt"][-120:]})
        kv[condition] = {"loglik": _rates(ll), "greedy": _rates(greedy), "n": len(items),
                         "candidates": 2 + n_look}

    facts = make_fact_items(ctx.seed, n_facts)
    follow = follow_greedy = memory_greedy = knows = 0
    for item in tqdm(facts, desc="counterfactual", disable=not ctx.progress, leave=False):
        pair = [item["context_answer"], item["memory_answer"]]
        follow += choose(model, tok, item["prompt"], pair, amp=ctx.amp) == item["context_answer"]
        knows += choose(model, tok, item["control"], pair, amp=ctx.amp) == item["memory_answer"]
        text = _normalise(generate(model, tok, item["prompt"], max_new_tokens=max_new, amp=ctx.amp))
        follow_greedy += text == item["context_answer"].lower()
        memory_greedy += text == item["memory_answer"].lower()
    n = len(facts)
    counterfactual = {"follow_context_loglik": follow / n, "follow_context_greedy": follow_greedy / n,
                      "memory_greedy": memory_greedy / n, "knows_fact": knows / n, "n": n}

    summary = {
        "kv_present_acc": kv["present"]["loglik"]["correct"],
        "kv_present_hallucination": kv["present"]["loglik"]["hallucination"],
        "kv_removed_acc": kv["removed"]["loglik"]["correct"],
        "kv_removed_hallucination": kv["removed"]["loglik"]["hallucination"],
        "kv_present_greedy_acc": kv["present"]["greedy"]["correct"],
        "kv_present_greedy_hallucination": kv["present"]["greedy"]["hallucination"],
        "kv_removed_greedy_acc": kv["removed"]["greedy"]["correct"],
        "kv_removed_greedy_hallucination": kv["removed"]["greedy"]["hallucination"],
        "follow_context": counterfactual["follow_context_loglik"],
        "follow_context_greedy": counterfactual["follow_context_greedy"],
        "knows_fact": counterfactual["knows_fact"],
    }
    return {"summary": summary, "kv": kv, "counterfactual": counterfactual, "examples": rows, "note": NOTE,
            "settings": {"n_items": n_items, "records": n_records, "lookalikes": n_look, "max_new_tokens": max_new},
            "chance": {"kv_loglik": 1 / (2 + n_look), "follow_context": 0.5}}


def plot(results: list[tuple[str, dict]], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    import numpy as np

    groups = [("present", "loglik"), ("present", "greedy"), ("removed", "loglik"), ("removed", "greedy")]
    fig, (ax, cf) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / max(len(results), 1)
    x = np.arange(len(groups))
    for i, (label, res) in enumerate(results):
        off = (i - (len(results) - 1) / 2) * width
        acc = [res["kv"][c][w]["correct"] for c, w in groups]
        hal = [res["kv"][c][w]["hallucination"] for c, w in groups]
        bars = ax.bar(x + off, acc, width, label=f"{label}: correct")
        ax.bar(x + off, hal, width, bottom=acc, color=bars[0].get_facecolor(), alpha=0.35, hatch="//",
               label=f"{label}: hallucination")
        c = res["counterfactual"]
        cf.bar(np.arange(3) + off, [c["follow_context_loglik"], c["follow_context_greedy"], c["knows_fact"]], width,
               label=label)
    ax.set_xticks(x, [f"{c}\n{w}" for c, w in groups])
    ax.set_ylabel("share of items")
    ax.set_title("Key-value records (PROXY, judge-free): correct + hallucinated")
    cf.set_xticks(range(3), ["follows context\n(loglik)", "follows context\n(greedy)", "knows fact\n(no context)"])
    cf.axhline(0.5, color="grey", ls=":", lw=1)
    cf.set_title("Context vs memory (PROXY)")
    ax.legend(fontsize=7)
    cf.legend(fontsize=7)
    fig.suptitle("Contextual hallucination proxies - not the paper's GPT-4o-judged rates", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


register("hallucination", run, plot, needs_data=False,
         description="judge-free contextual-hallucination proxies: key-value records with look-alikes, "
                     "counterfactual contexts",
         options=("n_items", "records", "lookalikes", "max_new_tokens", "n_facts"))
