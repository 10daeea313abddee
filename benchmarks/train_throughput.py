"""Training throughput end to end: this project's DIFF and baseline beside transformers' DiffLlama and Llama.

    python benchmarks/train_throughput.py                 # every shape of issue 11 -> results/train-throughput-<gpu>.json
    python benchmarks/train_throughput.py --shapes 542m-2k --modes eager
    python benchmarks/train_throughput.py --smoke         # tiny shapes, 2 steps, CPU or GPU: checks the script runs

One process, one precision policy for every model: fp32 master weights, bf16 autocast, fused AdamW
(CUDA; the CPU smoke uses the default AdamW), loss = cross-entropy of the fp32 logits computed here
for every model (not HF's own loss). Each model runs eager and under ``torch.compile`` (the same
for both sides). HF models are built from configs (``diff_transformer.hf.hf_config`` of the same
ModelConfig), random weights, ``attn_implementation="sdpa"``, no downloads. Times are CUDA events
over ``--steps`` steps after ``--warmup`` steps; peak memory is ``max_memory_allocated`` over the
timed steps. "work_ratio" is the useful-FLOP ratio DIFF / baseline (benchmarks/flops.py), so
1 / work_ratio is the speed ratio at which DIFF runs at the baseline's FLOP rate.

The 542M shape is a reconstruction (the issue gives only "542M params, 8 layers"): dim 2048,
8 layers, 16 heads of 128, SwiGLU 5632, vocabulary 32,000, untied: 542.4M for the baseline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from flops import model_flops_per_token  # noqa: E402

from diff_transformer.config import ModelConfig, matched_pair, preset  # noqa: E402
from diff_transformer.model import DiffTransformerLM  # noqa: E402

RESULTS = Path(__file__).parent / "results"


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    config: ModelConfig  # the DIFF side; the baseline is matched_pair's
    batch: int
    seq: int
    hf: bool = True  # also HF DiffLlama / Llama
    sdpa_row: bool = False  # also this project's DIFF with attention forced to SDPA


def shapes(smoke: bool) -> dict[str, Shape]:
    if smoke:
        tiny = preset("tiny", vocab_size=512, max_seq_len=64)
        return {"smoke": Shape("smoke", tiny, batch=2, seq=64, sdpa_row=True)}
    m542 = dict(dim=2048, n_layers=8, n_heads=16, ffn_dim=5632, vocab_size=32000)
    return {
        "542m-2k": Shape("542m-2k", ModelConfig(**m542, max_seq_len=2048), batch=8, seq=2048),
        "542m-4k": Shape("542m-4k", ModelConfig(**m542, max_seq_len=4096), batch=4, seq=4096),
        "base-4k": Shape("base-4k", preset("base", max_seq_len=4096, vocab_size=32000), batch=8, seq=4096,
                         hf=False),
        "small-1k": Shape("small-1k", preset("small", max_seq_len=1024, vocab_size=32000), batch=32, seq=1024,
                          hf=False),
        # `small` is the "8 layers, width 512, 8 heads of 64".
        "w512-512": Shape("w512-512", preset("small", max_seq_len=512, vocab_size=32000), batch=64, seq=512,
                          hf=False, sdpa_row=True),
    }


def models(shape: Shape) -> dict[str, callable]:
    """name -> a function building the model on the device (fp32 weights)."""
    diff, base = matched_pair(shape.config)
    out = {"baseline": lambda: DiffTransformerLM(base), "diff": lambda: DiffTransformerLM(diff)}
    if shape.sdpa_row:
        out["diff_sdpa"] = lambda: DiffTransformerLM(diff.replace(attn_backend="sdpa"))
    if shape.hf:
        def hf(cfg, cls_name):
            def build():
                import transformers

                from diff_transformer.hf import hf_config

                return getattr(transformers, cls_name)._from_config(hf_config(cfg), attn_implementation="sdpa")
            return build
        out["hf_llama"] = hf(base, "LlamaForCausalLM")
        out["hf_diffllama"] = hf(diff, "DiffLlamaForCausalLM")
    return out


class Timer:
    """CUDA events on a GPU, perf_counter on the CPU; milliseconds."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.b.record()
            torch.cuda.synchronize()
            self.ms = self.a.elapsed_time(self.b)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def train_rate(build, shape: Shape, device, *, compile: bool, warmup: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = build().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(model) if compile else model
    ids = torch.randint(0, shape.config.vocab_size, (shape.batch, shape.seq + 1), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = forward(ids[:, :-1])
            logits = out.logits if hasattr(out, "logits") else out  # (B, N, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm_s = time.perf_counter() - t0
    with Timer(device) as t:
        for _ in range(steps):
            loss = step()
    res = {"tokens_per_s": shape.batch * shape.seq * steps / (t.ms / 1e3), "step_ms": t.ms / steps,
           "warmup_s": warm_s, "final_loss": loss.item(),
           "params": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def work_ratio(shape: Shape) -> float:
    diff, base = matched_pair(shape.config)
    with torch.device("meta"):
        f = [model_flops_per_token(non_embedding_params=DiffTransformerLM(c).num_parameters(non_embedding=True),
                                   vocab_size=c.vocab_size, dim=c.dim, n_layers=c.n_layers, seq=shape.seq,
                                   head_dim=c.head_dim, attention=c.attention, n_heads=c.n_heads)
             for c in (diff, base)]
    return f[0] / f[1]


def ratios(rows: dict) -> dict:
    def r(a, b, key="tokens_per_s"):
        if key in rows.get(a, {}) and key in rows.get(b, {}):
            return rows[a][key] / rows[b][key]
        return None

    return {"diff_over_baseline": r("diff", "baseline"), "diff_sdpa_over_baseline": r("diff_sdpa", "baseline"),
            "hf_diffllama_over_hf_llama": r("hf_diffllama", "hf_llama"), "diff_over_hf_diffllama": r("diff", "hf_diffllama"),
            "memory_diff_over_baseline": r("diff", "baseline", "peak_gib")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shape, 2 steps (CPU or GPU): proves the script runs")
    ap.add_argument("--shapes", nargs="+", default=None, help="shape names (default: all)")
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    ap.add_argument("--models", nargs="+", default=None, help="model names (default: all of each shape)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5; compile happens here)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20)")
    ap.add_argument("--out", type=Path, default=None, help="JSON output")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("benchmarks/train_throughput.py needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    steps = args.steps if args.steps is not None else (2 if args.smoke else 20)
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    tag = gpu.split()[-1].lower() if cuda else "cpu"
    out = args.out or (Path(tempfile.gettempdir()) / f"train-throughput-{tag}-smoke.json" if args.smoke
                       else RESULTS / f"train-throughput-{tag}.json")
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    res = {"gpu": gpu, "torch": torch.__version__, "transformers": tf_version, "triton": triton_version,
           "python": platform.python_version(), "precision": "fp32 weights, bf16 autocast, AdamW "
           f"({'fused' if cuda else 'default'})", "warmup_steps": warmup, "timed_steps": steps, "shapes": {}}
    out.parent.mkdir(parents=True, exist_ok=True)
    table = shapes(args.smoke)
    for name in args.shapes or table:
        shape = table[name]
        entry = res["shapes"][name] = {"batch": shape.batch, "seq": shape.seq, "config": shape.config.to_dict(),
                                       "work_ratio_diff_over_baseline": work_ratio(shape)}
        for mode in args.modes:
            rows = entry[mode] = {}
            for mname, build in models(shape).items():
                if args.models and mname not in args.models:
                    continue
                try:
                    rows[mname] = train_rate(build, shape, device, compile=mode == "compiled", warmup=warmup,
                                             steps=steps)
                except Exception as e:  # noqa: BLE001 - out of memory, a backend or transformers missing
                    rows[mname] = {"error": f"{type(e).__name__}: {e}"[:300]}
                print(f"{name} {mode} {mname}: " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                                               for k, v in rows[mname].items()}), flush=True)
                if cuda:
                    torch.cuda.empty_cache()
                torch._dynamo.reset()
            entry[f"{mode}_ratios"] = ratios(rows)
            print(f"{name} {mode} ratios: {json.dumps(entry[f'{mode}_ratios'])}", flush=True)
            out.write_text(json.dumps(res, indent=1))  # after every shape and mode: a cut run keeps what it measured
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
