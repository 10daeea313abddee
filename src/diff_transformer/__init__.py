"""diff-transformer: the Differential Transformer (V1 and V2) with a matched softmax baseline."""

from .api import load
from .attention import differential_attention
from .config import PRESETS, ConfigError, ModelConfig, matched_pair, preset
from .model import DiffAttention, DiffAttentionV2, Attention, DiffTransformerLM, KVCache, parameter_report

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "Attention",
    "ConfigError",
    "DiffAttention",
    "DiffAttentionV2",
    "DiffTransformerLM",
    "KVCache",
    "ModelConfig",
    "differential_attention",
    "load",
    "matched_pair",
    "parameter_report",
    "preset",
]
