"""Size of each built-in corpus, and its tokens and distinct token ids under the default BPE.

Runs from a plain copy of the repository (``src`` is put on the path) with the extra ``corpus``
installed; builds the shards under ``--cache`` (a temporary folder by default), about a minute on
2 CPU cores. Prints one line a corpus and one a (corpus, vocabulary size).

    python benchmarks/corpus_stats.py                     # every built-in, BPE 8192 and 4096
    python benchmarks/corpus_stats.py --sources library --vocab 8192
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diff_transformer.data import BUILTIN_CORPORA, DataConfig, open_corpus, prepare_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", nargs="+", default=list(BUILTIN_CORPORA))
    parser.add_argument("--vocab", nargs="+", type=int, default=[8192, 4096])
    parser.add_argument("--cache", default=None, help="shard cache folder (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache or tmp)
        for source in args.sources:
            docs = list(open_corpus(source).documents())
            print(f"{source}: {len(docs):,} documents, {sum(map(len, docs)):,} characters", flush=True)
        for source in args.sources:
            for vocab in args.vocab:
                ds = prepare_dataset(DataConfig(source=source, vocab_size=vocab), cache)
                ids = np.concatenate([np.asarray(ds.train), np.asarray(ds.val)])
                print(f"{source} bpe{vocab}: {len(ids):,} tokens ({len(ds.train):,} train + {len(ds.val):,} val), "
                      f"{len(np.unique(ids)):,} distinct of {ds.vocab_size} ids", flush=True)


if __name__ == "__main__":
    main()
