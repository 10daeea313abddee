"""Helpers of the evaluation-task tests: a rigged fake LM, a tiny real model and an EvalContext."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from diff_transformer import DiffTransformerLM, ModelConfig
from diff_transformer.data.tokenizer import ByteTokenizer
from diff_transformer.evals.base import EvalContext


class RiggedLM(nn.Module):
    """A causal "model" whose next-token distribution is ``rule(ids_so_far) -> {token: logprob}``; the
    remaining probability is spread evenly over the other tokens. Its cache only remembers the ids
    (generation works; a SharedPrefix does not)."""

    def __init__(self, rule: Callable[[list[int]], dict[int, float]], vocab_size: int = 257, max_seq_len: int = 512):
        super().__init__()
        self.rule = rule
        self.config = SimpleNamespace(vocab_size=vocab_size, max_seq_len=max_seq_len)
        self.dummy = nn.Parameter(torch.zeros(1))

    def new_cache(self, batch: int, max_len: int, dtype=None):
        return _History(batch)

    def forward(self, input_ids, cache=None):
        assert cache is None or isinstance(cache, _History), "RiggedLM takes only its own cache (no shared prefix)"
        b, n = input_ids.shape
        v = self.config.vocab_size
        out = torch.empty(b, n, v)
        for i in range(b):
            before = cache.ids[i] if cache is not None else []
            row = before + input_ids[i].tolist()
            for t in range(n):
                given = self.rule(row[:len(before) + t + 1])
                rest = max(1e-12, 1 - sum(math.exp(lp) for lp in given.values()))
                out[i, t] = math.log(rest / (v - len(given)))
                for tok, lp in given.items():
                    out[i, t, tok] = lp
            if cache is not None:
                cache.ids[i] = row
        return out


class _History:
    """RiggedLM's "KV cache": the ids seen so far, per row (enough for model.generate / stream)."""

    def __init__(self, batch: int):
        self.ids = [[] for _ in range(batch)]


def prefers(text: str, tokenizer=None, logprob: float = math.log(0.9)):
    """A rule that continues every prompt ending in a prefix of ``text``'s tail with ``text``'s next token:
    the model "answers" ``text`` after the prompt marker, wherever it is asked."""
    tokenizer = tokenizer or ByteTokenizer()
    want = tokenizer.encode(text)

    def rule(ids: list[int]) -> dict[int, float]:
        for j in range(len(want), 0, -1):  # longest suffix of ids that is a proper prefix of want (+ marker)
            if ids[-j:] == want[:j] and j < len(want):
                return {want[j]: logprob}
        return {}

    return rule


def tiny_model(attention: str = "diff", vocab_size: int = 257, max_seq_len: int = 256, seed: int = 0,
               **extra) -> DiffTransformerLM:
    cfg = ModelConfig(**{**dict(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, ffn_dim=64,
                                max_seq_len=max_seq_len, attention=attention, attn_backend="reference"), **extra})
    model = DiffTransformerLM(cfg, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # larger random weights than the init, so that scores differ between inputs
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def context(model, tokenizer=None, options: dict | None = None, seed: int = 0, tmp: Path | None = None) -> EvalContext:
    return EvalContext(model=model, tokenizer=tokenizer or ByteTokenizer(), device=torch.device("cpu"),
                       model_dir=tmp or Path("."), run_dir=None, val_tokens=None, val_documents=None,
                       options={k: str(v) for k, v in (options or {}).items()}, seed=seed, progress=False)


def answering(policy: Callable[[str], str], marker: str = "Answer:", logprob: float = math.log(0.9)):
    """A rule for RiggedLM (byte ids) that answers ``" " + policy(prompt) + "\n"`` after the last ``marker``,
    where ``prompt`` is the text up to and including that marker."""
    mark = marker.encode()

    def rule(ids: list[int]) -> dict[int, float]:
        text = bytes(i for i in ids if i < 256)
        at = text.rfind(mark)
        if at < 0:
            return {}
        prompt, produced = text[:at + len(mark)], text[at + len(mark):]
        target = (" " + policy(prompt.decode("utf-8", "replace")) + "\n").encode()
        if target.startswith(produced) and len(produced) < len(target):
            return {target[len(produced)]: logprob}
        return {}

    return rule


def model_folder(folder: Path, attention: str = "diff", max_seq_len: int = 512, tokenizer=None) -> Path:
    """A model folder (config, weights, tokenizer) of a tiny random model, for the CLI."""
    tokenizer = tokenizer or ByteTokenizer()
    tiny_model(attention, vocab_size=tokenizer.vocab_size, max_seq_len=max_seq_len).save_pretrained(folder)
    tokenizer.save(folder)
    return folder
