"""Sampling with the KV cache: greedy, temperature, top-k and top-p (nucleus).

Two decode paths after the same eager prefill: eager (the cache grows by one position a step) and
compiled (``compile=True``, gpt-fast's recipe): the cache is read as a whole with the later slots
masked and written at a position held in a device tensor (``model.forward(positions=...)``), so one
step has the same shapes at every position; ``torch.compile`` traces it once and on CUDA
(``mode="reduce-overhead"``) replays it as a CUDA graph, removing the per-kernel launch cost that
bounds batch-1 decoding. Sampling stays eager on the compiled step's logits, so a given generator
draws the same random stream on both paths.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

# A compiled decode step per model, and the cache it was last used with (reused while batch, length
# and dtype match: on CUDA its tensors have static addresses, so a new cache means re-recording graphs).
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
CACHE_ROUND = 256  # the compiled path rounds the cache length up to this: fewer distinct shapes to compile


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 means greedy (argmax)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream(
    model,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    compile: bool = False,
) -> Iterator[Tensor]:
    """Prefill ``input_ids`` (B, N) once, then yield one (B,) token per step from the cache.

    Stops after ``max_new_tokens`` or once every row has produced ``eos_token_id``. ``compile``: decode
    with the compiled static-cache step (see the module docstring; the first call compiles).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (B, N) with N >= 1, got {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        return
    b, n = input_ids.shape
    if compile:
        step_fn, cache = compiled_decoder(model, b, n + max_new_tokens)
        cache.length = 0
    else:
        cache = model.new_cache(b, n + max_new_tokens)
    logits = model(input_ids, cache=cache)[:, -1]  # the prefill, eager on both paths
    position = torch.full((1,), n, dtype=torch.long, device=input_ids.device)  # the next token's slot
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            token = token.masked_fill(done, eos_token_id)
            done |= token == eos_token_id
        yield token
        if step + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
            return
        if compile:
            logits = step_fn(token[:, None], position)
            position += 1
            cache.advance(1)
        else:
            logits = model(token[:, None], cache=cache)[:, -1]


def compiled_decoder(model, batch: int, min_len: int) -> tuple[Callable[[Tensor, Tensor], Tensor], "KVCache"]:  # noqa: F821
    """(step, cache) for ``model``'s compiled decode path: ``step(token (B, 1), position (1,))`` returns
    the next logits (B, V) for the token at ``position``, writing its keys and values into ``cache``
    (at least ``min_len`` slots, rounded up to CACHE_ROUND).

    The step is compiled once per model (and again per new shape); on CUDA with
    ``mode="reduce-overhead"``, i.e. CUDA graphs, so its logits are overwritten by the next step's:
    read them before calling again (``stream`` samples from them at once). The cache is the model's
    one compiled-path cache, reused by the next call of the same shape: one compiled stream per model
    at a time (interleaving two ``stream(compile=True)`` generators of one model mixes their caches).
    """
    if model.config.attn_backend == "triton":
        raise ValueError("the compiled decode step attends through SDPA under a mask, which the Triton kernel does "
                         "not take: decode with model.config.attn_backend 'auto' or 'sdpa' (auto already leaves "
                         "single-token decoding to SDPA)")
    from .model import activation_dtype

    length = -(-min_len // CACHE_ROUND) * CACHE_ROUND
    dtype = activation_dtype(model.embed_tokens.weight)  # what new_cache would hold here
    state = _COMPILED.get(model)
    if state is None:
        cuda = model.embed_tokens.weight.is_cuda

        def step(token: Tensor, position: Tensor, cache) -> Tensor:
            return model(token, cache, positions=position)[:, -1]

        compiled = torch.compile(step, mode="reduce-overhead" if cuda else None, fullgraph=True)
        state = _COMPILED[model] = {"fn": compiled, "cache": None, "cuda": cuda}
    cache = state["cache"]
    if cache is None or (len(cache.k[0]), cache.max_len, cache.k[0].dtype) != (batch, length, dtype):
        # A finished generation's slots need no clearing: the prefill overwrites the prompt's and every
        # later slot is masked until written (and holds finite values, so weight 0 gives 0).
        cache = state["cache"] = model.new_cache(batch, length)
        if state["cuda"]:
            for t in cache.k + cache.v:  # as model parameters: CUDA graphs may mutate them in place
                torch._dynamo.mark_static_address(t)
    fn = state["fn"]

    def run(token: Tensor, position: Tensor) -> Tensor:
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may be overwritten
        return fn(token, position, cache)

    return run, cache
