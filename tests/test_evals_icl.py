"""The in-context classification task: loaders, demonstration sampling, the label scorer, the shared
prefix (exact), shot fitting and an end-to-end run on a tiny model."""

from __future__ import annotations

import json
import os
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from diff_transformer.data.tokenizer import ByteTokenizer
from diff_transformer.errors import UserError
from diff_transformer.evals import icl
from diff_transformer.evals.scoring import SharedPrefix, score_continuations

from evals_helpers import RiggedLM, context, model_folder, prefers, tiny_model

# ../shared/data/icl beside the repository (DIFF_TRANSFORMER_ICL_DATA elsewhere, e.g. from a git worktree)
SHARED = Path(os.environ.get("DIFF_TRANSFORMER_ICL_DATA",
                             Path(__file__).resolve().parents[1].parent / "shared" / "data" / "icl"))
TOPICS = ["sports", "science", "music"]


def synthetic(n_per_label: int = 6) -> list[tuple[str, str]]:
    words = {"sports": ["goal", "match", "team"], "science": ["atom", "cell", "lab"], "music": ["song", "drum", "band"]}
    return [(f"a {words[lab][i % 3]} story {i}", lab) for lab in TOPICS for i in range(n_per_label)]


def write_jsonl(path: Path, rows, text="text", label="label") -> Path:
    path.write_text("".join(json.dumps({text: t, label: lab}) + "\n" for t, lab in rows))
    return path


# Scorer -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("gold", TOPICS)
def test_classify_picks_the_label_the_model_prefers(gold):
    query = list(icl.QUERY.format(text="a goal story").encode())
    labels = {lab: list(icl.LABEL.format(label=lab).encode()) for lab in TOPICS}
    model = RiggedLM(prefers("Type: " + gold))
    pred, pred_norm = icl.classify(model, None, query, labels)
    assert pred == gold and pred_norm == gold


def test_length_normalisation_can_disagree_with_the_sum():
    # " a" costs one token at log 0.3; " bbbbbb" six tokens at log 0.8 each: the sum prefers " a",
    # the per-token mean prefers " bbbbbb".
    a, b = ord("a"), ord("b")

    def rule(ids):
        if ids[-1] == ord(" "):
            return {a: math.log(0.3), b: math.log(0.65)}
        if ids[-1] == b:
            return {b: math.log(0.8)}
        return {ord(" "): math.log(0.99)}

    labels = {"a": [32, a], "bbbbbb": [32] + [b] * 6}
    pred, pred_norm = icl.classify(RiggedLM(rule), None, list(b"Type:"), labels)
    assert (pred, pred_norm) == ("a", "bbbbbb")


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("attention", ["diff", "baseline", "diff_v2"])
def test_shared_prefix_gives_the_full_sequence_scores(attention, backend):
    model = tiny_model(attention, attn_backend=backend)
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 256, (40,), generator=gen).tolist()
    ctx_ids = torch.randint(0, 256, (7,), generator=gen).tolist()
    conts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (1, 3, 5, 2)]
    shared = score_continuations(model, ctx_ids, conts, prefix=SharedPrefix(model, prefix), batch_size=3)
    full = score_continuations(model, prefix + ctx_ids, conts)
    single = [score_continuations(model, prefix + ctx_ids, [c])[0] for c in conts]  # no padding at all
    for s, f, one in zip(shared, full, single):
        assert s.logprob == pytest.approx(one.logprob, abs=1e-4)
        assert f.logprob == pytest.approx(one.logprob, abs=1e-4)
        assert s.n_tokens == one.n_tokens and s.greedy == one.greedy


@pytest.mark.parametrize("attention", ["diff", "baseline", "diff_v2"])
def test_shared_prefix_and_classify_under_bf16_autocast(attention):
    """The CUDA evaluation runs these under bf16 autocast; a prefix cache kept in fp32 made DIFF's op
    refuse the bf16 queries. Scores stay those of the full sequence, and near the fp32 ones."""
    model = tiny_model(attention, attn_backend="sdpa")
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 256, (40,), generator=gen).tolist()
    ctx_ids = torch.randint(0, 256, (7,), generator=gen).tolist()
    conts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (1, 3, 5, 2)]
    fp32 = score_continuations(model, prefix + ctx_ids, conts)
    labels = {lab: list(icl.LABEL.format(label=lab).encode()) for lab in TOPICS}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shared_prefix = SharedPrefix(model, prefix)
        shared = score_continuations(model, ctx_ids, conts, prefix=shared_prefix, batch_size=3)
        full = score_continuations(model, prefix + ctx_ids, conts)
        picked = icl.classify(model, shared_prefix, ctx_ids, labels)
        picked_full = icl.classify(model, None, prefix + ctx_ids, labels)
    assert all(t.dtype == torch.bfloat16 for t in shared_prefix.k + shared_prefix.v)
    for s, f, ref in zip(shared, full, fp32):
        assert s.logprob == pytest.approx(f.logprob, abs=0.02)
        assert s.logprob == pytest.approx(ref.logprob, abs=0.05)
    assert picked == picked_full


def test_scorer_refuses_what_does_not_fit():
    model = tiny_model(max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len"):
        score_continuations(model, [1] * 10, [[2] * 8])
    with pytest.raises(ValueError, match="non-empty"):
        score_continuations(model, [], [[2]])


# Demonstrations --------------------------------------------------------------------------------
def test_balanced_sampling_is_balanced_distinct_and_deterministic():
    pool = synthetic(6)
    for k in (1, 3, 7, 17):
        demos = icl.sample_demonstrations(pool, k, sampling="balanced", rng=icl.demo_rng(3, k, -1))
        counts = Counter(lab for _, lab in demos)
        assert len(demos) == len(set(demos)) == k
        assert max(counts.values()) - min(counts.values()) <= 1 and (k < 3 or len(counts) == 3)
        assert demos == icl.sample_demonstrations(pool, k, sampling="balanced", rng=icl.demo_rng(3, k, -1))
    random_demos = icl.sample_demonstrations(pool, 5, sampling="random", rng=random.Random(0))
    assert len(set(random_demos)) == 5
    with pytest.raises(UserError):
        icl.sample_demonstrations(pool, 5, sampling="nope", rng=random.Random(0))


def test_orders_are_permutations_deterministic_and_differ():
    demos = icl.sample_demonstrations(synthetic(6), 12, sampling="balanced", rng=icl.demo_rng(0, 12, -1))
    orders = [icl.arrange(demos, how="shuffle", rng=icl.demo_rng(0, 12, o)) for o in range(4)]
    assert all(sorted(o) == sorted(demos) for o in orders)
    assert len({tuple(o) for o in orders}) == 4
    assert orders[2] == icl.arrange(demos, how="shuffle", rng=icl.demo_rng(0, 12, 2))
    alt = icl.arrange(demos, how="alternate", rng=random.Random(1))
    assert sorted(alt) == sorted(demos)
    labels = [lab for _, lab in alt]
    assert labels[:3] == labels[3:6] == labels[6:9] and len(set(labels[:3])) == 3  # cycles over the labels


def test_demonstration_sets_are_nested_and_prefix_lengths_stop_past_the_budget():
    pool = synthetic(6)
    seq = icl.demonstration_sequence(pool, "balanced", 4)
    assert sorted(seq) == sorted(pool) and seq == icl.demonstration_sequence(pool, "balanced", 4)
    assert seq != icl.demonstration_sequence(pool, "balanced", 5)
    assert all(len({lab for _, lab in seq[3 * i:3 * i + 3]}) == 3 for i in range(6))  # each prefix balanced
    enc = icl.Encoded.build(ByteTokenizer(), pool, pool[:1], TOPICS)
    lengths = icl.prefix_lengths(enc, seq, 100)
    per_demo = [len(enc.demos[d]) for d in seq]
    assert lengths[0] == 0 and all(lengths[k] == sum(per_demo[:k]) for k in lengths)
    assert lengths[max(lengths)] > 100 >= lengths[max(lengths) - 1]


def test_fitting_shots_keeps_what_fits_and_names_the_rest():
    lengths = {0: 0, **{k: 10 * k for k in range(1, 21)}}
    assert icl.fitting_shots(None, lengths, 125) == ([1, 2, 4, 8, 12], [])
    assert icl.fitting_shots([0, 4, 16, 20], lengths, 165) == ([0, 4, 16], [20])


# Loaders ---------------------------------------------------------------------------------------
def test_loaders_read_every_format(tmp_path):
    rows = synthetic(2)
    assert icl.load_file(write_jsonl(tmp_path / "a.jsonl", rows), "jsonl") == rows
    assert icl.load_file(write_jsonl(tmp_path / "b.jsonl", rows, "q", "y"), "jsonl", text_field="q",
                         label_field="y") == rows
    (tmp_path / "c.csv").write_text("id,text,label\n" + "".join(f'{i},"{t}",{lab}\n' for i, (t, lab) in enumerate(rows)))
    assert icl.load_file(tmp_path / "c.csv", "csv") == rows
    (tmp_path / "trec.txt").write_text("LOC:city What city is big ?\nHUM:ind Who  wrote it ?\n\n")
    assert icl.load_file(tmp_path / "trec.txt", "trec") == [("What city is big ?", "location"), ("Who wrote it ?", "human")]
    assert icl.load_file(tmp_path / "trec.txt", "trec-fine")[0] == ("What city is big ?", "location city")
    (tmp_path / "bank.csv").write_text("text,category\nwhere is my card?,card_arrival\n")
    assert icl.load_file(tmp_path / "bank.csv", "banking77") == [("where is my card?", "card arrival")]
    (tmp_path / "clinc.json").write_text(json.dumps({"train": [["hi there", "greeting"]], "test": [["yo", "greeting"]],
                                                     "oos_test": [["x", "oos"]]}))
    assert icl.load_file(tmp_path / "clinc.json", "clinc150", "test") == [("yo", "greeting")]


@pytest.mark.parametrize("name,content,fmt,match", [
    ("bad.txt", "LOC:city fine\nthis line has no label\n", "trec", "line 2"),
    ("bad2.txt", "XYZ:foo what ?\n", "trec", "COARSE"),
    ("bad.jsonl", '{"text": "a", "label": "x"}\n{not json\n', "jsonl", "line 2 .* not JSON"),
    ("miss.jsonl", '{"text": "a", "lbl": "x"}\n', "jsonl", "label_field"),
    ("bad.csv", "sentence,label\na,b\n", "csv", "lacks the columns"),
    ("bank.csv", "text,label\nwhere is my card,card_arrival\n", "banking77", "'category'"),
    ("bank2.csv", 'text,category\n"unclosed,card\n', "banking77", "no 'text' or 'category' value|not a valid CSV"),
    ("fine.txt", "LOC: what city ?\n", "trec-fine", "line 1"),
    ("empty.csv", "text,label\n", "csv", "no examples"),
    ("bad.json", '{"val": []}', "clinc150", "'train' split"),
    ("bad2.json", '{"train": [["only text"]]}', "clinc150", "item 0"),
    ("bin.jsonl", b"\xff\xfe\x00garbage", "jsonl", "not UTF-8"),
])
def test_malformed_files_give_one_clear_user_error(tmp_path, name, content, fmt, match):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError, match=match):
        icl.load_splits(str(path), fmt)


def test_load_splits_errors_and_seeded_split(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        icl.load_splits(str(tmp_path / "absent.jsonl"))
    with pytest.raises(UserError, match="format="):
        icl.load_splits(str(tmp_path))  # a folder needs a format
    with pytest.raises(UserError, match="unknown"):
        icl.load_splits(str(write_jsonl(tmp_path / "a.jsonl", synthetic(2))), "xml")
    path = write_jsonl(tmp_path / "d.jsonl", synthetic(10))
    pool, test = icl.load_splits(str(path), seed=1)
    assert len(test) == 6 and len(pool) == 24 and not set(pool) & set(test)
    assert (pool, test) == icl.load_splits(str(path), seed=1)
    assert test != icl.load_splits(str(path), seed=2)[1]


needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"the shared ICL data folder {SHARED} is absent")


@needs_shared
@pytest.mark.parametrize("fmt,folder,n_train,n_test,n_labels", [
    ("trec", "trec", 5452, 500, 6), ("trec-fine", "trec", 5452, 500, 50),
    ("banking77", "banking77", 10003, 3080, 77), ("clinc150", "clinc150", 15000, 4500, 150),
])
def test_shared_datasets_load(fmt, folder, n_train, n_test, n_labels):
    pool, test = icl.load_splits(str(SHARED / folder), fmt)
    assert (len(pool), len(test)) == (n_train, n_test)
    assert len({lab for _, lab in pool}) == n_labels
    assert all(t and lab and "_" not in lab for t, lab in pool[:200])


@needs_shared
def test_run_on_shared_trec_and_a_clinc_file():
    model = tiny_model(max_seq_len=384)
    res = icl.run(context(model, options={"dataset": SHARED / "trec", "format": "trec", "shots": "1,2",
                                          "orders": 2, "n_test": 3}))
    assert res["n_labels"] == 6 and res["n_pool"] == 5452 and res["shots"] == [1, 2]
    pool, test = icl.load_splits(str(SHARED / "clinc150" / "data_full.json"))  # suffix .json: clinc150, own test split
    assert (len(pool), len(test)) == (15000, 4500)


# End to end ------------------------------------------------------------------------------------
def test_run_on_a_tiny_model_fits_the_context_and_plots(tmp_path):
    data = write_jsonl(tmp_path / "topics.jsonl", synthetic(6))
    model = tiny_model(max_seq_len=160)
    ctx = context(model, options={"dataset": data, "shots": "0,1,2,3,40", "orders": 3, "n_test": 4})
    res = icl.run(ctx)
    assert res["shots"] == [0, 1, 2, 3] and res["dropped_shots"] == [40] and "[40]" in res["note"]
    rows = {r["shots"]: r for r in res["per_shot"]}
    assert len(rows[0]["acc"]) == len(rows[1]["acc"]) == 1 and len(rows[3]["acc"]) == 3
    assert all(r["prompt_tokens"] + 40 <= 160 for r in res["per_shot"])
    assert all(0 <= a <= 1 and a * 4 == round(a * 4) for r in res["per_shot"] for a in r["acc"])
    assert res["summary"]["acc_max_shots"] == rows[3]["mean"] and res["summary"]["chance"] == pytest.approx(1 / 3)
    json.dumps(res, allow_nan=False)
    assert icl.run(ctx) == res  # deterministic from the seed
    default = icl.run(context(model, options={"dataset": data, "orders": 2, "n_test": 2}))
    assert default["shots"][-1] == default["max_shots_fit"] and default["dropped_shots"] == []
    icl.plot([("DIFF", res), ("other", default)], tmp_path / "icl.png")
    assert (tmp_path / "icl.png").stat().st_size > 1000


@pytest.mark.parametrize("attention", ["diff", "baseline", "diff_v2"])
def test_run_under_bf16_autocast(tmp_path, attention):
    data = write_jsonl(tmp_path / "topics.jsonl", synthetic(6))
    ctx = context(tiny_model(attention, max_seq_len=160), options={"dataset": data, "shots": "0,2", "orders": 2,
                                                                    "n_test": 3})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = icl.run(ctx)
    assert res["shots"] == [0, 2] and len(res["per_shot"][1]["acc"]) == 2
    assert all(0 <= a <= 1 for r in res["per_shot"] for a in r["acc"])


def test_run_with_a_rigged_model_scores_only_the_right_label(tmp_path):
    """The model always answers "science": accuracy is exactly the share of science test inputs."""
    data = write_jsonl(tmp_path / "topics.jsonl", synthetic(6))
    ctx = context(RiggedLM(prefers("Type: science")), options={"dataset": data, "shots": "0", "n_test": 100})
    res = icl.run(ctx)
    _, test = icl.load_splits(str(data), seed=0)
    share = sum(lab == "science" for _, lab in test) / len(test)
    assert res["per_shot"][0]["acc"] == [pytest.approx(share)] and 0 < share < 1


def test_run_needs_a_dataset():
    with pytest.raises(UserError, match="dataset=PATH"):
        icl.run(context(tiny_model()))


def test_cli_eval_task_icl_writes_json_and_png(tmp_path, capsys):
    from diff_transformer.cli import main

    folder = model_folder(tmp_path / "model", max_seq_len=160)
    data = write_jsonl(tmp_path / "topics.jsonl", synthetic(6))
    assert main(["eval", str(folder), "--task", "icl", "--opt", f"dataset={data}", "--opt", "shots=1,2,99",
                 "--opt", "orders=2", "--opt", "n_test=3", "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("icl: acc_1shot")
    res = json.loads((folder / "evals" / "icl.json").read_text())
    assert res["shots"] == [1, 2] and res["dropped_shots"] == [99]
    assert (folder / "evals" / "icl.png").stat().st_size > 1000
    assert main(["eval", str(folder), "--task", "icl", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "dataset=PATH" in err[0]
