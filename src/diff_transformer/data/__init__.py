"""Corpora, tokenizers and token shards: everything between text on disk and training batches."""

from .batches import Batches, eval_batches
from .config import DataConfig
from .corpora import BUILTIN_CORPORA, Corpus, open_corpus
from .mix import NeedleMix, build_mix
from .shards import Dataset, prepare_dataset
from .tokenizer import EOS_TEXT, BPETokenizer, ByteTokenizer, TiktokenTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "BUILTIN_CORPORA",
    "BPETokenizer",
    "Batches",
    "ByteTokenizer",
    "Corpus",
    "DataConfig",
    "Dataset",
    "EOS_TEXT",
    "NeedleMix",
    "TiktokenTokenizer",
    "Tokenizer",
    "build_mix",
    "eval_batches",
    "load_tokenizer",
    "open_corpus",
    "prepare_dataset",
]
