"""What FSDP2 and DDP cost a training step by themselves, on one device: an upper bound on two GPUs' speed-up.

    python benchmarks/fsdp_host.py                      # base, DIFF, 32 x 1024 -> results/fsdp-host-<device>.json
    python benchmarks/fsdp_host.py --models diff,baseline --variants none,ddp,fsdp:auto/1,fsdp:auto/5
    python benchmarks/fsdp_host.py --smoke              # tiny, CPU or GPU: checks the script runs

One process joins a process group of one, and each variant wraps a fresh model with the trainer's own
``parallelize`` (per-block ``torch.compile`` first, as ``train.compile`` does on CUDA) and steps it the
trainer's way: bf16 autocast on CUDA, fp32 cross-entropy, backward, the loss all-reduce, global-norm
clipping whose result the host reads (the trainer decides on it, so every step synchronises there), then
the fused AdamW (CUDA). Variants: ``none`` (one GPU, as the trainer runs it), ``ddp``, and
``fsdp:RESHARD/BLOCKS`` (``train.fsdp_reshard``, ``train.fsdp_blocks_per_unit``). With one process the
collectives are copies, so what a variant adds to ``none`` is its own work, most of it on the host.

Each variant runs at the global batch and at half of it (what each of two ranks runs). Per step (median
over ``--steps`` after ``--warmup``): ``dispatch_ms``, host time to enqueue forward, backward and clipping;
``wait_ms``, the wait for the GPU at the clipping read (near 0: the host is the bottleneck); ``optim_ms``,
AdamW to the end of the step. ``bound_2gpu`` is the step time of ``none`` at the global batch over the
variant's at half of it: two GPUs, each running half the rows, take at least that long a step (more with
communication not hidden and ranks out of step), so it bounds their speed-up over one GPU from above.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from diff_transformer.config import matched_pair, preset  # noqa: E402
from diff_transformer.model import DiffTransformerLM  # noqa: E402
from diff_transformer.train.config import TrainConfig  # noqa: E402
from diff_transformer.train.optim import build_optimizer  # noqa: E402
from diff_transformer.train.parallelize import DistInfo, parallelize  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="base")
    p.add_argument("--models", default="diff", help="of the matched pair: diff, baseline or both")
    p.add_argument("--batch-size", type=int, default=32, help="global batch in sequences (even)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--variants", default="none,ddp,fsdp:auto/1,fsdp:auto/5,fsdp:never/10",
                   help="none, ddp, fsdp:RESHARD/BLOCKS (RESHARD: auto, always, never)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="per-block torch.compile as train.compile (auto: on CUDA)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 + 3 steps")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    for v in args.variants.split(","):
        if parse_variant(v) is None:
            p.error(f"--variants: {v!r} is not none, ddp or fsdp:RESHARD/BLOCKS (e.g. fsdp:auto/5)")
    if args.batch_size < 2 or args.batch_size % 2:
        p.error(f"--batch-size {args.batch_size}: give an even number of sequences (half of it is one rank's)")
    if not set(args.models.split(",")) <= {"diff", "baseline"}:
        p.error(f"--models {args.models!r}: give diff, baseline or diff,baseline")
    return args


def parse_variant(spec: str) -> tuple[str, str, int] | None:
    """``none`` | ``ddp`` | ``fsdp:RESHARD/BLOCKS`` -> (mode, reshard, blocks per unit); None if malformed."""
    if spec in ("none", "ddp"):
        return spec, "auto", 1
    mode, _, rest = spec.partition(":")
    reshard, _, blocks = rest.partition("/")
    if mode != "fsdp" or reshard not in ("auto", "always", "never") or not (blocks or "1").isdigit() \
            or int(blocks or 1) < 1:
        return None
    return "fsdp", reshard, int(blocks or 1)


def time_variant(model_cfg, spec: str, rows: int, seq: int, device: torch.device, compile_blocks: bool,
                 warmup: int, steps: int) -> dict:
    """Median phase times of the trainer's step for one wrapped model at ``rows`` x ``seq`` tokens."""
    mode, reshard, blocks = parse_variant(spec)
    amp = device.type == "cuda"
    cfg = TrainConfig(batch_size=rows, seq_len=seq, device=str(device))
    model = DiffTransformerLM(model_cfg, seed=0).to(device)
    wrapped = parallelize(model, mode, DistInfo(device=device), mixed_precision=amp, compile=compile_blocks,
                          reshard=reshard, blocks_per_unit=blocks)
    optimizer = build_optimizer(model, cfg)
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, model_cfg.vocab_size, (rows, seq + 1), generator=gen).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    phases = {"dispatch_ms": [], "wait_ms": [], "optim_ms": [], "step_ms": []}
    losses = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            logits = wrapped(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        loss_mean = loss.detach().clone()
        dist.all_reduce(loss_mean)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        t1 = time.perf_counter()
        loss_value, _ = float(loss_mean), float(norm)  # the trainer reads both before it steps
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        losses.append(loss_value)
        if step >= warmup:
            for key, value in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                phases[key].append(value * 1e3)
    row = {k: statistics.median(v) for k, v in phases.items()}
    row.update(tokens_per_s=rows * seq / (row["step_ms"] / 1e3), rows=rows,
               peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
               first_loss=losses[0], last_loss=losses[-1], finite=all(math.isfinite(v) for v in losses))
    del wrapped, model, optimizer, logits, loss
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()  # each variant compiles its own blocks, as a fresh trainer process would
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    compile_blocks = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    if args.smoke:
        base, batch, seq, warmup, steps = preset("tiny", vocab_size=512), 4, 32, 2, 3
    else:
        base, batch, seq, warmup, steps = preset(args.preset), args.batch_size, args.seq_len, args.warmup, args.steps
        base = base.replace(max_seq_len=max(base.max_seq_len, seq))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        pair = dict(zip(("diff", "baseline"), matched_pair(base)))
        results = {}
        for name in args.models.split(","):
            rows = {}
            for spec in args.variants.split(","):
                for n_rows in (batch, batch // 2):
                    r = time_variant(pair[name], spec, n_rows, seq, device, compile_blocks, warmup, steps)
                    rows[f"{spec}@{n_rows}"] = r
                    print(f"{name} {spec:>14} rows {n_rows:3d}: step {r['step_ms']:7.1f} ms (dispatch "
                          f"{r['dispatch_ms']:6.1f}, wait {r['wait_ms']:6.1f}, optim {r['optim_ms']:5.1f}) "
                          f"{r['tokens_per_s']:,.0f} tok/s", flush=True)
            one = rows.get(f"none@{batch}")
            bounds = {spec: one["step_ms"] / rows[f"{spec}@{batch // 2}"]["step_ms"]
                      for spec in args.variants.split(",") if one is not None and spec != "none"}
            results[name] = {"runs": rows, "bound_2gpu": bounds}
            print(f"{name}: two GPUs' speed-up over one is at most", json.dumps({k: round(v, 3) for k, v in bounds.items()}))
    finally:
        dist.destroy_process_group()
    record = {
        "what": "one process (a process group of one): each variant's training step at the global batch and at "
                "half of it; bound_2gpu = step(none, global batch) / step(variant, half)",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "preset": "tiny (smoke)" if args.smoke else args.preset,
        "global_batch": batch, "seq_len": seq, "compile": compile_blocks, "warmup": warmup, "steps": steps,
        "dtype": "bf16 autocast, fp32 master weights (FSDP2: bf16 params, fp32 reductions)" if device.type == "cuda" else "fp32",
        "command": "python benchmarks/fsdp_host.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "results": results}
    tag = "smoke" if args.smoke else (torch.cuda.get_device_name(device).split()[-1].lower() if device.type == "cuda" else "cpu")
    out = args.out or RESULTS / f"fsdp-host-{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
