"""Activation memory kept for the backward, DIFF against its baseline, counted exactly on any device.

    python benchmarks/activation_memory.py                       # sdpa and triton paths -> results/activation-memory.json
    TRITON_INTERPRET=1 python benchmarks/activation_memory.py    # on a CPU: the fused kernel's path through the interpreter

Peak training memory is parameters, gradients and optimizer state (the same for a matched pair) plus what
autograd keeps between the forward and the backward, plus transients. This counts the second term exactly:
every tensor saved for the backward (``torch.autograd.graph.saved_tensors_hooks``), by storage, in one
training forward of the `base` preset's layer shapes under bf16 autocast, minus the parameters and their
autocast copies (a cost per step, not per token). The difference per token and layer, times the tokens
and layers of a step, is DIFF's extra activation memory at that step; ``--plain-norm`` counts it with
RMSNorm differentiated through its plain ops (the code before ``model._RMSNormFunction``), for the
before/after. On an H200 the `base`/4K peak difference was 3.13 GiB (benchmarks/results/
train-throughput-h200.json, eager) where this count gives 3.13 GiB for the code of that run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

from diff_transformer.config import matched_pair, preset
from diff_transformer.model import DiffTransformerLM, RMSNorm, _rms_normalize

RESULTS = Path(__file__).parent / "results"


def saved_bytes_per_token_layer(cfg, device, n: int = 64, batch: int = 1) -> dict:
    """Bytes autograd keeps per token and layer in one forward (activations only), by dtype and last dim."""
    torch.manual_seed(0)
    model = DiffTransformerLM(cfg).to(device)
    ids = torch.randint(0, cfg.vocab_size, (batch, n), device=device)
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages.setdefault(s.data_ptr(), (s.nbytes(), t.dtype, t.shape[-1] if t.dim() else 0))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            model(ids)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters()}
    per = batch * n * cfg.n_layers
    total, by = 0, {}
    for ptr, (nbytes, dtype, last) in storages.items():
        if ptr in params or any(nbytes == 2 * torch.Size(s).numel() for s in shapes if len(s) == 2):
            continue  # a parameter or its bf16 autocast copy
        total += nbytes
        key = f"{str(dtype).removeprefix('torch.')}[..., {last}]"
        by[key] = by.get(key, 0) + nbytes / per
    return {"bytes_per_token_layer": total / per, "by_dtype_and_last_dim": dict(sorted(by.items()))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", default=None,
                    help="DIFF's attention backends to count (default: sdpa, and triton where it runs)")
    ap.add_argument("--plain-norm", action="store_true", help="RMSNorm through autograd of its plain ops (before)")
    ap.add_argument("--tokens", type=int, default=8 * 4096, help="tokens a step for the projection (base/4K: 32768)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    backends = args.backends or (["sdpa", "triton"] if device.type == "cuda" or interpreting else ["sdpa"])
    if args.plain_norm:
        RMSNorm.forward = lambda self, x: self.weight * _rms_normalize(x, self.eps)[0]
    cfg = preset("base", vocab_size=512, max_seq_len=4096)  # the vocabulary only changes embedding/head
    diff, base = matched_pair(cfg)
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()})",
           "torch": torch.__version__, "triton_interpret": interpreting, "plain_norm": args.plain_norm,
           "config": cfg.to_dict(), "projection_tokens": args.tokens, "models": {}}
    res["models"]["baseline"] = saved_bytes_per_token_layer(base, device)
    for backend in backends:
        res["models"][f"diff_{backend}"] = row = saved_bytes_per_token_layer(diff.replace(attn_backend=backend), device)
        extra = row["bytes_per_token_layer"] - res["models"]["baseline"]["bytes_per_token_layer"]
        row["extra_over_baseline_bytes_per_token_layer"] = extra
        row["extra_gib_at_projection"] = extra * args.tokens * cfg.n_layers / 2**30
    for name, row in res["models"].items():
        print(f"{name}: {row['bytes_per_token_layer']:,.0f} B a token a layer"
              + (f"; DIFF − baseline {row['extra_over_baseline_bytes_per_token_layer']:,.0f} B "
                 f"= {row['extra_gib_at_projection']:.2f} GiB at {args.tokens:,} tokens x {cfg.n_layers} layers"
                 if "extra_gib_at_projection" in row else ""))
    out = args.out or RESULTS / "activation-memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
