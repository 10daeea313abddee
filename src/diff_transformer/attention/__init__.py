"""Differential attention: the functional op, its backends, and the reference semantics."""

from .ops import BACKENDS, differential_attention, resolve_backend, softmax_attention, triton_available
from .reference import DiffAttentionMaps, attention_maps

__all__ = [
    "BACKENDS",
    "DiffAttentionMaps",
    "attention_maps",
    "differential_attention",
    "resolve_backend",
    "softmax_attention",
    "triton_available",
]
