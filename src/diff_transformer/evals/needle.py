"""``needle``: multi-needle retrieval over context length × depth (the paper's Section 3.4, LWM protocol).

Each cell (context length ``c``, depth ``d``) holds ``samples`` haystacks of held-out text (or
``--opt haystack=FILE``) with ``needles`` magic-number needles (data/synthetic.py, evaluation pool);
the ``asked`` needles sit at depth ``d``, the others at uniform random depths. Each asked needle is
one prompt, scored two ways:

- ``exact``: the greedy continuation (temperature 0), whose leading digits must be exactly the
  number: a prefix, extra digits or another needle's number fail.
- ``rank``: the summed log-probability of each needle's number (its tokens ``" {number}"`` as the
  continuation of the prompt); the right number's rank among all the needles' numbers (1 = best;
  ties count against it). ``rank_acc`` is the share ranked first, ``mean_rank`` the mean rank
  (chance: (needles + 1) / 2). A graded signal where small models never generate the number.

Options: ``contexts`` (comma list; default max_seq_len / 4, / 2 and max_seq_len), ``depths``
(default 0,0.25,0.5,0.75,1), ``needles`` (4, fewer, down to 2, when the longest context cannot hold 4
in half its length), ``asked`` (1), ``samples`` (4), ``generate`` (true:
also the exact-match score), ``haystack`` (a text file).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ..data import synthetic as syn
from ..data.synthetic import make_needle_example
from ..errors import UserError
from .base import EvalContext, register
from .common import float_list, haystack_ids, int_list, positive, progress, pyplot, require_data, save_figure
from .scoring import greedy_generate

DEFAULT_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
_LEADING_NUMBER = re.compile(r"\s*(\d+)")


def exact_match(generated: str, answer: str) -> bool:
    """True when ``generated`` starts (after whitespace) with exactly the digits of ``answer``, no more."""
    m = _LEADING_NUMBER.match(generated)
    return m is not None and m.group(1) == answer


@torch.no_grad()
def candidate_logprobs(model, prompt: list[int], candidates: list[list[int]], device: torch.device,
                       amp: bool = False) -> list[float]:
    """Summed log-probability of each candidate continuation of ``prompt`` (one batched forward).

    ``model`` is any callable mapping (B, N) ids to (B, N, V) logits.
    """
    n = len(prompt)
    longest = max(len(c) for c in candidates)
    ids = torch.zeros(len(candidates), n + longest - 1, dtype=torch.long)  # (C, N + L - 1), right-padded
    for i, c in enumerate(candidates):
        seq = prompt + c[:-1]
        ids[i, : len(seq)] = torch.tensor(seq)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(ids.to(device))  # (C, N + L - 1, V)
    logp = torch.log_softmax(logits[:, n - 1:].float(), dim=-1)  # (C, L, V): position n-1+j predicts token j
    out = []
    for i, c in enumerate(candidates):
        tok = torch.tensor(c, device=logp.device)
        out.append(float(logp[i, torch.arange(len(c), device=logp.device), tok].sum()))
    return out


def rank_of(logprobs: list[float], right: int) -> int:
    """1 + the number of other candidates scoring at least as high as ``right`` (ties count against it)."""
    return 1 + sum(1 for i, lp in enumerate(logprobs) if i != right and lp >= logprobs[right])


def greedy_text(model, tokenizer, prompt: list[int], max_new: int, device: torch.device, amp: bool) -> str:
    """Greedy continuation of ``prompt`` (at most ``max_new`` tokens, stopping at EOS), decoded."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        new = greedy_generate(model, prompt, max_new, stop_ids={tokenizer.eos_id})
    return tokenizer.decode(new)


def default_needles(ctx: EvalContext, context: int, wanted: int = 4) -> int:
    """``wanted`` needles, or fewer (at least 2, so the rank score has a wrong candidate) so that needles
    and question fill at most half of ``context``.

    A byte-level tokenizer spends ~55 tokens on one needle: a 256-token model gets 2 (and a short haystack).
    """
    longest = max(syn.EVAL_CITIES, key=len)
    per_needle = len(ctx.tokenizer.encode(" " + syn.NEEDLE_TEMPLATE.format(city=longest, number=9_999_999)))
    question = len(syn.question_ids(ctx.tokenizer, longest)) + per_needle
    return max(2, min(wanted, (context // 2 - question) // per_needle))


def settings(ctx: EvalContext) -> dict:
    max_len = ctx.model.config.max_seq_len
    contexts = int_list(ctx, "contexts", sorted({max(2, max_len // 4), max(2, max_len // 2), max_len}))
    if any(c > max_len or c < 2 for c in contexts):
        raise UserError(f"--opt contexts={ctx.options.get('contexts')}: every length must lie in [2, max_seq_len={max_len}]")
    depths = float_list(ctx, "depths", DEFAULT_DEPTHS)
    if any(not 0 <= d <= 1 for d in depths):
        raise UserError(f"--opt depths={ctx.options.get('depths')}: depths are fractions in [0, 1]")
    needles = positive("needles", ctx.option("needles", default_needles(ctx, max(contexts))))
    asked = positive("asked", ctx.option("asked", 1))
    if asked > needles:
        raise UserError(f"--opt asked={asked} exceeds needles={needles}")
    return {"contexts": contexts, "depths": depths, "needles": needles, "asked": asked,
            "samples": positive("samples", ctx.option("samples", 4)), "generate": ctx.option("generate", True)}


def evaluate_needles(ctx: EvalContext, contexts: list[int], depths: list[float], needles: int, asked: int,
                     samples: int, generate: bool, desc: str = "needle") -> dict:
    """The grid of scores; the caller may hold an attention probe active (quantization does)."""
    require_data(ctx, "needle")
    rng = np.random.default_rng(ctx.seed)
    cells = [(ci, di) for ci in range(len(contexts)) for di in range(len(depths))]
    shape = (len(contexts), len(depths))
    exact = np.full(shape, np.nan)
    rank_acc = np.full(shape, np.nan)
    mean_rank = np.full(shape, np.nan)
    skipped, repeated = [], False
    for ci, di in progress(cells, ctx, desc, len(cells)):
        c, d = contexts[ci], depths[di]
        hits, firsts, ranks = [], [], []
        for _ in range(samples):
            hay, rep = haystack_ids(ctx, c, rng)
            repeated |= rep
            needle_depths = [d] * asked + rng.uniform(0, 1, needles - asked).tolist()
            try:  # one token is left for the exact-match check after the answer
                ex = make_needle_example(rng, hay, ctx.tokenizer, c - 1, needle_depths, needles, asked, "eval")
            except ValueError:  # this draw's cities make the needles too long for c
                skipped.append(c)
                continue
            cands = ex.candidate_ids()
            for j, prompt in enumerate(ex.prompts):
                lps = candidate_logprobs(ctx.model, prompt, cands, ctx.device, ctx.amp)
                r = rank_of(lps, ex.asked[j])
                ranks.append(r)
                firsts.append(r == 1)
                if generate:
                    n_new = min(len(ex.answer_ids[j]) + 1, c - len(prompt))
                    text = greedy_text(ctx.model, ctx.tokenizer, prompt, n_new, ctx.device, ctx.amp)
                    hits.append(exact_match(text, ex.answers[j]))
        if ranks:
            rank_acc[ci, di], mean_rank[ci, di] = np.mean(firsts), np.mean(ranks)
            if hits:
                exact[ci, di] = np.mean(hits)
    if np.isnan(rank_acc).all():
        raise UserError(f"no context length in {contexts} holds {needles} needles and a question: "
                        "use longer --opt contexts or fewer --opt needles")
    result = {
        "summary": {"rank_acc": float(np.nanmean(rank_acc)), "mean_rank": float(np.nanmean(mean_rank)),
                    "exact_acc": float(np.nanmean(exact)) if generate and not np.isnan(exact).all() else None},
        "contexts": contexts, "depths": depths, "needles": needles, "asked": asked, "samples": samples,
        "rank_acc": rank_acc, "mean_rank": mean_rank, "exact_acc": exact if generate else None,
        "chance_rank_acc": 1.0 / needles,
        "haystack_repeated": repeated,
    }
    if skipped:  # samples whose needles and question did not fit the context, per context length
        result["skipped_samples"] = {str(c): skipped.count(c) for c in sorted(set(skipped))}
    return result


def run(ctx: EvalContext) -> dict:
    return evaluate_needles(ctx, **settings(ctx))


def plot(results: list[tuple[str, dict]], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    metrics = [m for m in ("exact_acc", "rank_acc") if any(r.get(m) is not None for _, r in results)]
    fig, axes = plt.subplots(len(results), len(metrics), figsize=(4.2 * len(metrics), 3.2 * len(results)),
                             squeeze=False)
    for row, (label, r) in enumerate(results):
        for col, m in enumerate(metrics):
            ax = axes[row][col]
            grid = np.array([[np.nan if v is None else v for v in line] for line in r[m]], dtype=float) \
                if r.get(m) is not None else np.full((len(r["contexts"]), len(r["depths"])), np.nan)
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(r["depths"])), [f"{d:.0%}" for d in r["depths"]])
            ax.set_yticks(range(len(r["contexts"])), [str(c) for c in r["contexts"]])
            ax.set_xlabel("depth of the asked needle")
            ax.set_ylabel("context length")
            ax.set_title(f"{label}: {m.replace('_', ' ')}", fontsize=9)
            for (i, j), v in np.ndenumerate(grid):
                if not np.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.subplots_adjust(wspace=0.5, hspace=0.5)
    save_figure(fig, path)


register("needle", run, plot, description="multi-needle retrieval accuracy over context length × depth (Section 3.4)",
         options=("contexts", "depths", "needles", "asked", "samples", "generate", "haystack"))
