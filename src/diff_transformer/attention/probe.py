"""See inside the attention of a running model: logits, maps, and a hook to change the logits.

While an :class:`AttentionProbe` is active (``with probe:``), every call of the public ops
``differential_attention`` and ``softmax_attention`` (attention/ops.py) is computed by the
reference math of reference.py instead of its backend (fp32, explicit N×M matrices, autocast off
inside) and reported to the probe as one :class:`ProbeCall`: the fp32 scaled logits, the softmax
maps and λ. A ``logits_transform`` (e.g. quantization) is applied to the logits before the softmax,
so the model's output changes accordingly. Inactive, the ops pay one global lookup.

The ops know no model, so they cannot know which layer called them: :meth:`AttentionProbe.watch`
installs forward pre-hooks on the attention modules that set ``probe.layer`` before each call.
The model itself never sees the probe.

Only the two ops' standard arguments are understood; a call passing any other non-None keyword
(e.g. an attention bias) raises :class:`ProbeUnsupported` rather than being silently dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .reference import _expand_kv, softmax_logits

_ACTIVE: AttentionProbe | None = None  # the probe in effect, read by the ops on every call


class ProbeUnsupported(RuntimeError):
    """The probe cannot reproduce this call exactly (an argument it does not know)."""


@dataclass
class ProbeCall:
    """One attention call seen by the probe. Tensors are fp32 and live only as long as you keep them."""

    layer: int | None  # set by the watch() hooks; None if the calling module is not watched
    kind: str  # "differential" or "softmax"
    logits1: Tensor  # (B, H, N, M) scaled scores s·q1k1ᵀ (s·qkᵀ for softmax), -inf where masked, before the transform
    attn1: Tensor  # (B, H, N, M) softmax of the (transformed) logits1
    logits2: Tensor | None = None  # (B, H, N, M) s·q2k2ᵀ of a differential call
    attn2: Tensor | None = None  # (B, H, N, M)
    lam: Tensor | None = None  # fp32 λ: 0-d (V1) or (B, H, N) (V2)

    def combined(self) -> Tensor:
        """(B, H, N, M) the map the values are multiplied by: A1 − λ·A2 (differential) or A (softmax)."""
        if self.kind == "softmax":
            return self.attn1
        lam = self.lam[..., None] if self.lam.dim() == 3 else self.lam  # (B, H, N, 1) or 0-d
        return self.attn1 - lam * self.attn2


class AttentionProbe:
    """Route the attention ops through the reference math and report each call.

    Args:
        callback: called with every :class:`ProbeCall`; reduce there to keep memory flat.
        logits_transform: ``f(logits, mask) -> logits`` applied to each (B, H, N, M) fp32 logits
            tensor before its softmax; ``mask`` is the (N, M) bool of visible entries (None when not
            causal). Masked entries must stay -inf.
        keep: also append every call to ``self.calls`` (small inputs only: O(layers·N²) memory).
    """

    def __init__(self, callback: Callable[[ProbeCall], None] | None = None,
                 logits_transform: Callable[[Tensor, Tensor | None], Tensor] | None = None, keep: bool = False):
        self.callback = callback
        self.logits_transform = logits_transform
        self.keep = keep
        self.calls: list[ProbeCall] = []
        self.layer: int | None = None
        self._previous: list[AttentionProbe | None] = []

    def __enter__(self) -> AttentionProbe:
        global _ACTIVE
        self._previous.append(_ACTIVE)
        _ACTIVE = self
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        _ACTIVE = self._previous.pop()

    def watch(self, modules: Sequence[torch.nn.Module]) -> Callable[[], None]:
        """Set ``self.layer = i`` before each forward of ``modules[i]``; returns a function that unhooks."""
        handles = [m.register_forward_pre_hook(functools.partial(self._set_layer, i)) for i, m in enumerate(modules)]

        def remove() -> None:
            for h in handles:
                h.remove()

        return remove

    def _set_layer(self, index: int, module, args) -> None:
        self.layer = index

    # What the ops call while active --------------------------------------------------------
    def _logits(self, q: Tensor, k: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
        """(raw logits, transformed logits), both (B, H, N, M) fp32."""
        raw = softmax_logits(q, k, causal=causal, scale=scale)
        if self.logits_transform is None:
            return raw, raw
        mask = None
        if causal:
            n, m = q.shape[-2], k.shape[-2]
            mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(diagonal=m - n)
        return raw, self.logits_transform(raw, mask)

    def _report(self, call: ProbeCall) -> None:
        if self.callback is not None:
            self.callback(call)
        if self.keep:
            self.calls.append(call)

    def differential(self, q1, q2, k1, k2, v, lam, *, causal: bool = True, scale: float | None = None,
                     backend: str = "auto", **extra) -> Tensor:
        _refuse(extra)
        scale = q1.shape[-1] ** -0.5 if scale is None else scale
        with torch.autocast(q1.device.type, enabled=False):  # fp32 logits even inside bf16 autocast
            l1, t1 = self._logits(q1, k1, causal, scale)
            l2, t2 = self._logits(q2, k2, causal, scale)
            a1, a2 = t1.softmax(-1), t2.softmax(-1)  # (B, H, N, M) fp32
            lam = lam.float()
            lam_b = lam[..., None] if lam.dim() == 3 else lam  # (B, H, N, 1) for V2
            out = torch.matmul(a1 - lam_b * a2, _expand_kv(v, q1.shape[1]).float())  # (B, H, N, dv)
        self._report(ProbeCall(self.layer, "differential", l1, a1, l2, a2, lam))
        return out.to(v.dtype)

    def softmax(self, q, k, v, *, causal: bool = True, scale: float | None = None, backend: str = "auto",
                **extra) -> Tensor:
        _refuse(extra)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        with torch.autocast(q.device.type, enabled=False):
            l1, t1 = self._logits(q, k, causal, scale)
            a1 = t1.softmax(-1)
            out = torch.matmul(a1, _expand_kv(v, q.shape[1]).float())
        self._report(ProbeCall(self.layer, "softmax", l1, a1))
        return out.to(v.dtype)


def _refuse(extra: dict) -> None:
    given = sorted(k for k, val in extra.items() if val is not None)
    if given:
        raise ProbeUnsupported(f"the attention probe does not support the argument(s) {given}")


def probed(kind: str):
    """Decorator for the public ops: while a probe is active, hand the call (all arguments) to it."""

    def wrap(op):
        @functools.wraps(op)
        def op_or_probe(*args, **kwargs):
            if _ACTIVE is None:
                return op(*args, **kwargs)
            return getattr(_ACTIVE, kind)(*args, **kwargs)

        return op_or_probe

    return wrap
