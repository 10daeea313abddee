"""The fused differential attention kernel in Triton (forward and backward); see op.py for its limits."""

from .op import differential_attention, supports

__all__ = ["differential_attention", "supports"]
