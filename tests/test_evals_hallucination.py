"""The hallucination proxies: item builders, outcome rules, and runs with rigged models whose answers
are known (right, a look-alike copy, always unknown, context or memory), then a tiny real model."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from diff_transformer.data.tokenizer import ByteTokenizer
from diff_transformer.errors import UserError
from diff_transformer.evals import hallucination as hal

from evals_helpers import RiggedLM, answering, context, model_folder, tiny_model

OPTS = {"n_items": 5, "n_facts": 6, "records": 5, "lookalikes": 2}


def records(prompt: str) -> dict[str, dict[str, str]]:
    out = {}
    for key, body in re.findall(r"ID (\d+): (.*)\.", prompt):
        out[key] = dict(part.split(" ", 1) for part in body.split(", "))
    return out


def asked(prompt: str) -> tuple[str, str]:
    field, key = re.search(r"What is the (\w+) of ID (\d+)\?", prompt).groups()
    return field, key


def one_edit(a: str, b: str) -> bool:
    return a != b and (sum(x != y for x, y in zip(a, b)) == 1 or sorted(a) == sorted(b))


def right(prompt: str) -> str:
    if "of ID " not in prompt:
        return story_answer(prompt)
    field, key = asked(prompt)
    return records(prompt).get(key, {}).get(field, "unknown")


def copy_lookalike(prompt: str) -> str:
    if "of ID " not in prompt:
        return memory(prompt)
    field, key = asked(prompt)
    return next(rec[field] for k, rec in records(prompt).items() if one_edit(k, key))


def any_value(prompt: str) -> str:
    if "of ID " not in prompt:
        return memory(prompt)
    field, _ = asked(prompt)
    return next(iter(records(prompt).values()))[field]


def story_answer(prompt: str) -> str:
    told = re.search(r" is ([^.\n]+)\.\n", prompt)
    return told.group(1) if told else memory(prompt)


def memory(prompt: str) -> str:
    subject = re.search(r"(?:What|Who) is (.+)\?", prompt).group(1)
    return next(common for _, s, common, _ in hal.FACTS if s == subject)


def run_with(policy, **extra) -> dict:
    model = RiggedLM(answering(policy), max_seq_len=2048)
    return hal.run(context(model, options={**OPTS, **extra}))


# Items and outcomes ----------------------------------------------------------------------------
def test_kv_items_have_lookalikes_and_remove_only_the_asked_record():
    for removed in (False, True):
        item = hal.make_kv_item(random.Random(3), removed=removed, n_records=6, n_lookalikes=3)
        assert item == hal.make_kv_item(random.Random(3), removed=removed, n_records=6, n_lookalikes=3)
        recs = records(item["prompt"])
        field, key = asked(item["prompt"])
        looks = [k for k in recs if one_edit(k, key)]
        assert len(looks) == 3 and sorted(recs[k][field] for k in looks) == sorted(item["distractors"])
        assert item["value"] not in item["distractors"] and len(set(item["distractors"])) == 3
        assert (key in recs) is not removed and len(recs) == 6 - removed
        assert item["answer"] == ("unknown" if removed else recs[key][field] == item["value"] and item["value"])
    assert all(one_edit(k, "4821") and len(k) == 4 for k in hal.lookalike_keys("4821", 10, random.Random(0), set()))


@pytest.mark.parametrize("condition,answer,outcome", [
    ("present", "Lyon", "correct"), ("present", " lyon.\nmore", "correct"), ("present", "Porto", "hallucination"),
    ("present", "unknown", "abstain"), ("present", "Mars", "other"), ("present", "", "other"),
    ("removed", "unknown", "correct"), ("removed", "Lyon", "hallucination"), ("removed", "Porto", "hallucination"),
    ("removed", "Mars", "hallucination"), ("removed", "", "other"),
])
def test_outcomes(condition, answer, outcome):
    item = {"condition": condition, "value": "Lyon", "answer": "unknown" if condition == "removed" else "Lyon",
            "distractors": ["Porto", "Graz"]}
    assert hal.kv_outcome(item, answer) == outcome


# Rigged models ---------------------------------------------------------------------------------
def test_a_model_that_reads_the_right_record_is_right_everywhere():
    res = run_with(right)
    for cond in ("present", "removed"):
        for way in ("loglik", "greedy"):
            assert res["kv"][cond][way] == {"correct": 1.0, "hallucination": 0.0, "abstain": 0.0, "other": 0.0}
    assert res["counterfactual"]["follow_context_loglik"] == res["counterfactual"]["follow_context_greedy"] == 1.0
    assert res["counterfactual"]["knows_fact"] == 1.0 and res["counterfactual"]["memory_greedy"] == 0.0
    assert "PROXY" in res["note"]
    json.dumps(res, allow_nan=False)


def test_copying_a_lookalike_counts_as_hallucination():
    res = run_with(copy_lookalike)
    for cond in ("present", "removed"):
        for way in ("loglik", "greedy"):
            assert res["kv"][cond][way]["hallucination"] == 1.0 and res["kv"][cond][way]["correct"] == 0.0


def test_unknown_is_right_only_when_the_record_was_removed():
    res = run_with(lambda p: "unknown" if "of ID " in p else memory(p))
    for way in ("loglik", "greedy"):
        assert res["kv"]["present"][way]["abstain"] == 1.0 and res["kv"]["present"][way]["correct"] == 0.0
        assert res["kv"]["removed"][way]["correct"] == 1.0
    assert res["counterfactual"]["follow_context_loglik"] == 0.0 and res["counterfactual"]["memory_greedy"] == 1.0


def test_giving_any_value_for_a_missing_record_is_a_hallucination():
    res = run_with(any_value)
    assert res["kv"]["removed"]["loglik"]["hallucination"] == 1.0
    assert res["kv"]["removed"]["greedy"]["hallucination"] == 1.0


# Real model ------------------------------------------------------------------------------------
def test_run_on_a_tiny_model_and_plot(tmp_path):
    model = tiny_model("diff", max_seq_len=1024)
    res = hal.run(context(model, options={"n_items": 2, "n_facts": 3, "max_new_tokens": 4}))
    assert res == hal.run(context(model, options={"n_items": 2, "n_facts": 3, "max_new_tokens": 4}))
    for cond in ("present", "removed"):
        for way in ("loglik", "greedy"):
            assert sum(res["kv"][cond][way].values()) == pytest.approx(1.0)
        assert res["kv"][cond]["loglik"]["other"] == 0.0  # a choice is always one of the candidates
    assert set(res["summary"]) >= {"kv_present_acc", "kv_removed_hallucination", "follow_context"}
    json.dumps(res, allow_nan=False)
    hal.plot([("DIFF", res), ("baseline", res)], tmp_path / "hal.png")
    assert (tmp_path / "hal.png").stat().st_size > 1000


def test_documents_shrink_to_fit_the_context_or_fail_clearly():
    res = hal.run(context(tiny_model(max_seq_len=256), options={"n_items": 2, "n_facts": 2}))
    assert res["settings"]["records"] == 2 and res["settings"]["lookalikes"] == 1  # byte ids: 2 records fit
    assert hal.run(context(tiny_model(max_seq_len=2048), options={"n_items": 2, "n_facts": 2}))["settings"]["records"] == 6
    with pytest.raises(UserError, match="records=N"):
        hal.run(context(tiny_model(max_seq_len=256), options={"n_items": 1, "records": 4}))
    with pytest.raises(UserError, match="longer context"):
        hal.run(context(tiny_model(max_seq_len=128), options={"n_items": 1}))
    with pytest.raises(UserError, match="lookalikes"):
        hal.make_kv_item(random.Random(0), removed=False, n_records=2, n_lookalikes=2)


def test_cli_eval_task_hallucination(tmp_path, capsys):
    from diff_transformer.cli import main

    folder = model_folder(tmp_path / "model", attention="baseline", max_seq_len=512)
    assert main(["eval", str(folder), "--task", "hallucination", "--opt", "n_items=2", "--opt", "n_facts=2",
                 "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("hallucination: kv_present_acc")
    res = json.loads((folder / "evals" / "hallucination.json").read_text())
    assert "PROXY" in res["note"] and res["kv"]["removed"]["n"] == 2
    assert (folder / "evals" / "hallucination.png").stat().st_size > 1000


@pytest.mark.parametrize("attention", ["diff", "baseline", "diff_v2"])
def test_scorers_under_bf16_autocast(attention):
    """The CUDA evaluation runs under bf16 autocast, where an fp32 KV cache made DIFF's op refuse bf16
    queries. Greedy answers are those of the uncached bf16 forward; the run completes."""
    model = tiny_model(attention, max_seq_len=1024)
    tok = ByteTokenizer()
    item = hal.make_kv_item(random.Random(0), removed=False, n_records=3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        text = hal.generate(model, tok, item["prompt"], max_new_tokens=5)
        ids = torch.tensor([tok.encode(item["prompt"])])
        for _ in range(5):  # no cache: the whole sequence again at every step
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert hal.choose(model, tok, item["prompt"], hal.kv_candidates(item)) in hal.kv_candidates(item)
        res = hal.run(context(model, options={"n_items": 1, "n_facts": 2, "max_new_tokens": 3}))
    new = ids[0, -5:].tolist()
    assert text == tok.decode(new[:new.index(tok.eos_id)] if tok.eos_id in new else new)
    assert sum(res["kv"]["removed"]["greedy"].values()) == pytest.approx(1.0)
