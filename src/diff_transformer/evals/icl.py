"""Many-shot in-context classification: accuracy against the number of demonstrations (the paper's
Figure 6) and its spread over demonstration orders (Figure 7).

Data: any set of (text, label) pairs. ``--opt dataset=PATH`` with ``--opt format=``

- ``jsonl``: one object a line with fields ``text`` and ``label`` (``--opt text_field=``, ``label_field=``);
- ``csv``: a header row naming the text and label columns (the same options);
- ``trec`` / ``trec-fine``: TREC question classification, ``COARSE:fine question`` a line; a folder holding
  ``train.txt`` and ``test.txt`` or one file; 6 coarse or 50 fine labels written out as words
  (``LOC`` -> ``location``, ``LOC:city`` -> ``location city``);
- ``banking77``: a CSV with ``text,category`` (a folder with ``train.csv``/``test.csv`` or one file);
- ``clinc150``: the CLINC OOS ``data_full.json`` (``{split: [[text, intent], ...]}``; ``train`` and ``test``
  splits, out-of-scope splits left out), or a folder holding it.

Without format the file suffix decides (.jsonl, .csv, .txt -> trec, .json -> clinc150). The test set is
``--opt test=PATH`` (same format), the folder's test file, or else a seeded split of the dataset
(``--opt test_fraction=0.2``). Underscores in labels become spaces.

Prompt (as the paper's, after Bertsch et al. 2024): each demonstration is
``"Question: {text}\\nType: {label}\\n\\n"``, then ``"Question: {text}\\nType:"`` for the test input; each
label is scored as the continuation ``" {label}"`` by the sum of its tokens' log-probabilities (``acc``;
``acc_norm`` divides by the number of label tokens) and the best label is the prediction. Pieces are
tokenised separately and concatenated, so a demonstration has the same tokens wherever it sits.
The demonstrations' keys and values are computed once per (shot count, order) and shared by every test
input and label (:class:`~.scoring.SharedPrefix`).

Demonstrations: ``sampling=balanced`` (round robin over labels, each label's examples in a seeded
order; the default) or ``random``; ``arrange=shuffle`` (a seeded random order; the default) or
``alternate`` (cycling over the labels, Figure 7b). For each shot count, one demonstration set is drawn
and ``orders`` (default 5) different arrangements of it are evaluated on the same test inputs. The sets
are nested: the k-shot set is the first k of one seeded (balanced or random) sequence of the pool. Shot
counts: ``--opt shots=1,4,16`` or by default 1, 2, 4, ... and the largest that fits; a count whose
prompt (demonstrations + the longest test input + the longest label) exceeds ``max_seq_len`` is
dropped and listed in ``dropped_shots``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .base import EvalContext, register
from .common import pyplot, save_figure
from .scoring import SharedPrefix, score_continuations

Example = tuple[str, str]  # (text, label)

FORMATS = ("jsonl", "csv", "trec", "trec-fine", "banking77", "clinc150")
TREC_COARSE = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human",
               "LOC": "location", "NUM": "number"}
DEMO = "Question: {text}\nType: {label}\n\n"
QUERY = "Question: {text}\nType:"
LABEL = " {label}"
PROMPT_FORMAT = DEMO + "... " + QUERY + LABEL


# Loading --------------------------------------------------------------------------------------
def _label(raw: str) -> str:
    return " ".join(raw.replace("_", " ").split())


def _text(raw: str) -> str:
    return " ".join(raw.split())  # one line: a newline inside the text would break the prompt format


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e})") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _check(examples: list[Example], path: Path) -> list[Example]:
    if not examples:
        raise UserError(f"{path} holds no examples")
    return examples


def read_trec(path: Path, fine: bool = False) -> list[Example]:
    out = []
    for lineno, line in enumerate(_read(path).splitlines(), 1):
        if not line.strip():
            continue
        head, _, question = line.partition(" ")
        coarse, sep, sub = head.partition(":")
        if not sep or coarse not in TREC_COARSE or not sub or not question.strip():
            raise UserError(f"line {lineno} of {path} is not TREC's 'COARSE:fine question' "
                            f"(COARSE one of {', '.join(TREC_COARSE)}): {line[:80]!r}")
        label = f"{TREC_COARSE[coarse]} {sub}" if fine else TREC_COARSE[coarse]
        out.append((_text(question), label))
    return _check(out, path)


def read_jsonl(path: Path, text_field: str = "text", label_field: str = "label") -> list[Example]:
    out = []
    for lineno, line in enumerate(_read(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"line {lineno} of {path} is not JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str) or row.get(label_field) is None:
            raise UserError(f"line {lineno} of {path} lacks a string {text_field!r} and a {label_field!r} field "
                            f"(set --opt text_field=... label_field=...)")
        out.append((_text(row[text_field]), _label(str(row[label_field]))))
    return _check(out, path)


def read_csv(path: Path, text_field: str = "text", label_field: str = "label") -> list[Example]:
    reader = csv.DictReader(io.StringIO(_read(path), newline=""))
    fields = reader.fieldnames or []
    if text_field not in fields or label_field not in fields:
        raise UserError(f"{path}: the CSV header {fields} lacks the columns {text_field!r} and {label_field!r} "
                        "(set --opt text_field=... label_field=...)")
    out = []
    try:
        for lineno, row in enumerate(reader, 2):
            text, label = row.get(text_field), row.get(label_field)
            if text is None or label is None or not label.strip():
                raise UserError(f"row {lineno} of {path} has no {text_field!r} or {label_field!r} value")
            out.append((_text(text), _label(label)))
    except csv.Error as e:
        raise UserError(f"{path} is not a valid CSV file ({e})") from None
    return _check(out, path)


def read_clinc150(path: Path, split: str) -> list[Example]:
    try:
        data = json.loads(_read(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not JSON ({e})") from None
    if not isinstance(data, dict) or split not in data:
        have = list(data) if isinstance(data, dict) else type(data).__name__
        raise UserError(f"{path} is not CLINC's {{split: [[text, intent], ...]}} with a {split!r} split (has {have})")
    out = []
    for i, pair in enumerate(data[split]):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise UserError(f"{path}: item {i} of split {split!r} is not a [text, intent] pair: {str(pair)[:80]}")
        out.append((_text(pair[0]), _label(pair[1])))
    return _check(out, path)


def _guess_format(path: Path) -> str:
    suffix = {".jsonl": "jsonl", ".csv": "csv", ".txt": "trec", ".json": "clinc150"}
    if path.suffix in suffix:
        return suffix[path.suffix]
    raise UserError(f"cannot tell the format of {path}: set --opt format=" + "|".join(FORMATS))


def _in_folder(folder: Path, fmt: str, which: str) -> Path | None:
    """The train or test file of a dataset folder (None if it has no such file)."""
    names = {"trec": f"{which}.txt", "trec-fine": f"{which}.txt", "banking77": f"{which}.csv",
             "csv": f"{which}.csv", "jsonl": f"{which}.jsonl", "clinc150": "data_full.json"}
    path = folder / names[fmt]
    return path if path.is_file() else None


def load_file(path: Path, fmt: str, which: str = "train", text_field: str = "text",
              label_field: str = "label") -> list[Example]:
    """Examples of one file (``which`` picks the split of a CLINC file)."""
    if fmt in ("trec", "trec-fine"):
        return read_trec(path, fine=fmt == "trec-fine")
    if fmt == "banking77":
        return read_csv(path, "text", "category")
    if fmt == "csv":
        return read_csv(path, text_field, label_field)
    if fmt == "jsonl":
        return read_jsonl(path, text_field, label_field)
    if fmt == "clinc150":
        return read_clinc150(path, which)
    raise UserError(f"--opt format={fmt!r} is unknown: use one of {', '.join(FORMATS)}")


def load_splits(dataset: str, fmt: str | None = None, test: str | None = None, *, text_field: str = "text",
                label_field: str = "label", test_fraction: float = 0.2, seed: int = 0
                ) -> tuple[list[Example], list[Example]]:
    """(demonstration pool, test set) from ``dataset`` (a file or a folder) and the optional ``test`` file."""
    path = Path(dataset).expanduser()
    if not path.exists():
        raise UserError(f"--opt dataset={dataset}: no such file or folder")
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"--opt format={fmt!r} is unknown: use one of {', '.join(FORMATS)}")
    kw = dict(text_field=text_field, label_field=label_field)
    test_path: Path | None = Path(test).expanduser() if test else None
    if path.is_dir():
        if fmt is None:
            raise UserError(f"{path} is a folder: set --opt format=" + "|".join(FORMATS))
        train_path = _in_folder(path, fmt, "train")
        if train_path is None:
            raise UserError(f"{path} holds no training file for format {fmt} (train.txt, train.csv, "
                            "train.jsonl or data_full.json as the format expects)")
        test_path = test_path or _in_folder(path, fmt, "test")
        path = train_path
    fmt = fmt or _guess_format(path)
    if fmt == "clinc150" and test_path is None:
        test_path = path  # the file holds its own test split
    pool = load_file(path, fmt, "train", **kw)
    if test_path is not None:
        if not test_path.is_file():
            raise UserError(f"--opt test={test}: no such file")
        return pool, load_file(test_path, fmt, "test", **kw)
    if not 0 < test_fraction < 1:
        raise UserError(f"--opt test_fraction={test_fraction} must lie in (0, 1)")
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    n_test = max(1, int(len(pool) * test_fraction))
    if n_test >= len(pool):
        raise UserError(f"{path} has {len(pool)} examples: too few to split into demonstrations and a test set")
    return [pool[i] for i in order[n_test:]], [pool[i] for i in order[:n_test]]


# Demonstrations and prompts -------------------------------------------------------------------
def sample_demonstrations(pool: list[Example], k: int, *, sampling: str, rng: random.Random) -> list[Example]:
    """``k`` distinct examples of ``pool``: a round robin over the labels (``balanced``) or uniform."""
    if k > len(pool):
        raise UserError(f"{k} demonstrations asked but the pool has {len(pool)} examples")
    if sampling == "random":
        return rng.sample(pool, k)
    if sampling != "balanced":
        raise UserError(f"--opt sampling={sampling!r}: use balanced or random")
    return round_robin(pool, rng)[:k]


def arrange(demos: list[Example], *, how: str, rng: random.Random) -> list[Example]:
    """One order of ``demos``: a random permutation (``shuffle``) or cycling over labels (``alternate``)."""
    if how == "shuffle":
        out = list(demos)
        rng.shuffle(out)
        return out
    if how != "alternate":
        raise UserError(f"--opt arrange={how!r}: use shuffle or alternate")
    return round_robin(demos, rng)


def round_robin(examples: list[Example], rng: random.Random) -> list[Example]:
    """All of ``examples``, one of each label in turn (labels and each label's examples in a random order)."""
    by_label: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_label[ex[1]].append(ex)
    labels = sorted(by_label)
    rng.shuffle(labels)
    for lab in labels:
        rng.shuffle(by_label[lab])
    out: list[Example] = []
    for depth in range(max((len(v) for v in by_label.values()), default=0)):
        out += [by_label[lab][depth] for lab in labels if depth < len(by_label[lab])]
    return out


def demo_rng(seed: int, shots: int, order: int) -> random.Random:
    """The generator of (shots, order): order -1 draws the demonstration set, orders 0.. arrange it."""
    return random.Random(f"icl/{seed}/{shots}/{order}")


@dataclass
class Encoded:
    """Token ids of the pieces of the prompts, each piece encoded once."""

    demos: dict[Example, list[int]]
    queries: list[list[int]]  # per test input
    labels: dict[str, list[int]]  # label -> ids of " {label}"

    @classmethod
    def build(cls, tokenizer, pool: list[Example], test: list[Example], labels: list[str]) -> "Encoded":
        texts = [DEMO.format(text=t, label=lab) for t, lab in pool]
        demo_ids = tokenizer.encode_batch(texts)
        query_ids = tokenizer.encode_batch([QUERY.format(text=t) for t, _ in test])
        label_ids = tokenizer.encode_batch([LABEL.format(label=lab) for lab in labels])
        return cls(dict(zip(pool, demo_ids)), query_ids, dict(zip(labels, label_ids)))

    def prompt_ids(self, demos: list[Example]) -> list[int]:
        return [t for d in demos for t in self.demos[d]]


def fitting_shots(requested: list[int] | None, demo_lengths: dict[int, int], budget: int) -> tuple[list[int], list[int]]:
    """(kept, dropped): shot counts whose demonstrations fit ``budget`` tokens. ``demo_lengths`` maps a
    shot count to its prompt length; ``requested`` None means 1, 2, 4, ... plus the largest that fits."""
    if requested is None:
        fit = [k for k, n in sorted(demo_lengths.items()) if n <= budget]
        largest = max(fit, default=0)
        kept = sorted({k for k in fit if k & (k - 1) == 0 or k == largest} - {0})
        return kept, []
    kept = [k for k in requested if demo_lengths.get(k, math.inf) <= budget]
    return kept, [k for k in requested if k not in kept]


def demonstration_sequence(pool: list[Example], sampling: str, seed: int) -> list[Example]:
    """One seeded order of the whole pool; the k-shot demonstrations are its first k (nested sets, so a
    larger shot count adds demonstrations to a smaller one's and a balanced prefix stays balanced)."""
    return sample_demonstrations(pool, len(pool), sampling=sampling, rng=demo_rng(seed, 0, -1))


def prefix_lengths(enc: Encoded, sequence: list[Example], budget: int) -> dict[int, int]:
    """Prompt length of the first k demonstrations for k = 0, 1, ... up to the first that exceeds ``budget``
    (the order within a set does not change it)."""
    out, total = {0: 0}, 0
    for k, demo in enumerate(sequence, 1):
        total += len(enc.demos[demo])
        out[k] = total
        if total > budget:
            break
    return out


# Scoring --------------------------------------------------------------------------------------
def classify(model, prefix: SharedPrefix | None, query: list[int], label_ids: dict[str, list[int]], *,
             amp: bool = False, batch_size: int = 64) -> tuple[str, str]:
    """(prediction by summed log-prob, prediction by log-prob per token) of one test input."""
    labels = list(label_ids)
    scores = score_continuations(model, query, [label_ids[lab] for lab in labels], prefix=prefix,
                                 batch_size=batch_size, amp=amp)
    best = max(range(len(labels)), key=lambda i: scores[i].logprob)
    best_norm = max(range(len(labels)), key=lambda i: scores[i].logprob / scores[i].n_tokens)
    return labels[best], labels[best_norm]


def _spread(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}


def run(ctx: EvalContext) -> dict:
    dataset = ctx.option("dataset", None, str)
    if dataset is None:
        raise UserError("icl needs a dataset: --opt dataset=PATH (with --opt format=" + "|".join(FORMATS) +
                        " when the suffix does not say)")
    fmt = ctx.option("format", None, str)
    pool, test = load_splits(dataset, fmt, ctx.option("test", None, str),
                             text_field=ctx.option("text_field", "text"), label_field=ctx.option("label_field", "label"),
                             test_fraction=ctx.option("test_fraction", 0.2), seed=ctx.seed)
    sampling, how = ctx.option("sampling", "balanced"), ctx.option("arrange", "shuffle")
    n_orders, n_test = ctx.option("orders", 5), ctx.option("n_test", 200)
    batch_size = ctx.option("label_batch", 64)
    if n_orders < 1 or n_test < 1 or batch_size < 1:
        raise UserError("--opt orders, n_test and label_batch must be positive")
    shots_opt = ctx.option("shots", None, str)
    requested = None
    if shots_opt is not None:
        try:
            requested = sorted({int(s) for s in shots_opt.split(",") if s.strip()})
        except ValueError:
            raise UserError(f"--opt shots={shots_opt!r}: give comma-separated integers, e.g. 1,4,16") from None
        if not requested or requested[0] < 0:
            raise UserError(f"--opt shots={shots_opt!r}: give non-negative integers")

    rng = random.Random(f"icl-test/{ctx.seed}")
    if len(test) > n_test:
        test = rng.sample(test, n_test)
    labels = sorted({lab for _, lab in pool} | {lab for _, lab in test})
    missing = sorted({lab for _, lab in test} - {lab for _, lab in pool})
    enc = Encoded.build(ctx.tokenizer, pool, test, labels)
    context = ctx.model.config.max_seq_len
    budget = context - max(len(q) for q in enc.queries) - max(len(v) for v in enc.labels.values())
    if budget < 0:
        raise UserError(f"the longest test input and label do not fit the model's context of {context} tokens")
    sequence = demonstration_sequence(pool, sampling, ctx.seed)
    lengths = prefix_lengths(enc, sequence, budget)
    kept, dropped = fitting_shots(requested, lengths, budget)
    if not kept:
        raise UserError(f"no shot count fits the model's context of {context} tokens "
                        f"(asked {requested or 'the default'}, dropped {dropped})")

    from tqdm import tqdm

    per_shot = []
    n_runs = sum(n_orders if k > 1 else 1 for k in kept)  # 0 or 1 demonstration has one order
    bar = tqdm(total=n_runs * len(test), desc="icl", disable=not ctx.progress, leave=False)
    for k in kept:
        demo_set = sequence[:k]
        accs, accs_norm = [], []
        for o in range(n_orders if k > 1 else 1):
            demos = arrange(demo_set, how=how, rng=demo_rng(ctx.seed, k, o)) if k else []
            ids = enc.prompt_ids(demos)
            prefix = SharedPrefix(ctx.model, ids, amp=ctx.amp) if ids else None
            hits = hits_norm = 0
            for (_, gold), query in zip(test, enc.queries):
                pred, pred_norm = classify(ctx.model, prefix, query, enc.labels, amp=ctx.amp, batch_size=batch_size)
                hits += pred == gold
                hits_norm += pred_norm == gold
                bar.update()
            accs.append(hits / len(test))
            accs_norm.append(hits_norm / len(test))
        per_shot.append({"shots": k, "prompt_tokens": lengths[k], "acc": accs, "acc_norm": accs_norm,
                         **_spread(accs), "norm": _spread(accs_norm)})
    bar.close()

    summary: dict[str, float | None] = {}
    for row in per_shot:
        summary[f"acc_{row['shots']}shot"] = row["mean"]
    top = per_shot[-1]
    summary.update({"acc_max_shots": top["mean"], "acc_std_max_shots": top["std"],
                    "acc_norm_max_shots": top["norm"]["mean"], "max_shots": float(top["shots"]),
                    "chance": 1.0 / len(labels)})
    notes = [f"prompt format: {PROMPT_FORMAT!r}; labels scored by summed log-probability (acc) and per token "
             "(acc_norm)"]
    if dropped:
        notes.append(f"shot counts {dropped} do not fit the context of {context} tokens (or exceed the "
                     f"{len(pool)} demonstrations) and were dropped")
    if missing:
        notes.append(f"test labels never seen in the demonstration pool: {missing[:10]}")
    return {
        "summary": summary,
        "dataset": str(dataset), "format": fmt or _guess_format(Path(dataset).expanduser()),
        "n_pool": len(pool), "n_test": len(test), "n_labels": len(labels), "labels": labels,
        "sampling": sampling, "arrange": how, "orders": n_orders, "context": context,
        "prompt_format": PROMPT_FORMAT, "shots": kept, "dropped_shots": dropped,
        "max_shots_fit": max((k for k, n in lengths.items() if n <= budget), default=0),
        "per_shot": per_shot, "note": "; ".join(notes),
    }


def plot(results: list[tuple[str, dict]], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return

    fig, (ax, box) = plt.subplots(1, 2, figsize=(13, 4.8))
    n = max(len(results), 1)
    for i, (label, res) in enumerate(results):
        rows = res["per_shot"]
        x = [max(r["shots"], 0.5) for r in rows]
        mean = [r["mean"] for r in rows]
        line, = ax.plot(x, mean, marker="o", label=label)
        ax.fill_between(x, [r["min"] for r in rows], [r["max"] for r in rows], alpha=0.2, color=line.get_color())
        positions = [j + (i - (n - 1) / 2) * 0.8 / n for j in range(len(rows))]
        bp = box.boxplot([r["acc"] for r in rows], positions=positions, widths=0.7 / n, patch_artist=True,
                         manage_ticks=False)
        for patch in bp["boxes"]:
            patch.set_facecolor(line.get_color())
            patch.set_alpha(0.5)
        box.plot([], [], color=line.get_color(), label=label)
    if results:
        first = results[0][1]
        ax.axhline(first["summary"]["chance"], color="grey", ls=":", lw=1, label="chance")
        box.set_xticks(range(len(first["per_shot"])), [str(r["shots"]) for r in first["per_shot"]])
        ax.set_title(f"In-context classification ({Path(first['dataset']).name}, {first['n_labels']} labels)")
        box.set_title(f"Spread over {first['orders']} demonstration orders ({first['arrange']})")
    ax.set_xscale("log", base=2)
    if results:
        ticks = sorted({max(r["shots"], 0.5) for _, res in results for r in res["per_shot"]})
        ax.set_xticks(ticks, [str(int(t)) if t >= 1 else "0" for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel("demonstrations")
    ax.set_ylabel("accuracy (mean; band min-max over orders)")
    box.set_xlabel("demonstrations")
    box.set_ylabel("accuracy")
    ax.legend()
    box.legend()
    fig.tight_layout()
    save_figure(fig, path)


register("icl", run, plot, needs_data=False, in_all=False,
         description="many-shot in-context classification: accuracy vs demonstrations and over orders (Fig. 6, 7)",
         options=("dataset", "format", "test", "text_field", "label_field", "test_fraction", "sampling", "arrange",
                  "orders", "n_test", "label_batch", "shots"))
