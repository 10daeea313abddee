"""Cost of the trainer's log-step instrumentation (o_proj input RMS, head-norm gain): one optimizer step with
the hooks on plus the one device-to-host fetch, against the same step with them off, interleaved.

    OMP_NUM_THREADS=1 python benchmarks/instrumentation.py [--steps 30] [--device cpu]

Non-log steps pay only a Python flag test per layer; this measures a log step.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from diff_transformer.config import preset
from diff_transformer.data import DataConfig, prepare_dataset
from diff_transformer.train.config import RunConfig, TrainConfig
from diff_transformer.train.trainer import Trainer, default_cache_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--preset", default="tiny")
    args = ap.parse_args()
    import time

    import torch

    run = RunConfig(model=preset(args.preset), train=TrainConfig(batch_size=8, seq_len=128, steps=args.steps,
                                                                 device=args.device),
                    data=DataConfig(tokenizer="byte"), preset=args.preset)
    dataset = prepare_dataset(run.data, default_cache_dir())
    run = run.replace(model=run.model.replace(vocab_size=dataset.vocab_size))
    trainer = Trainer(run, dataset, Path(tempfile.mkdtemp()), progress=False, log=lambda m: None)
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {"off": [], "on": []}
    for i in range(args.steps):
        for key in (("off", "on") if i % 2 else ("on", "off")):
            sync()
            t0 = time.perf_counter()
            trainer._instrumenting = key == "on"
            trainer.train_step()
            trainer._instrumenting = False
            if key == "on":
                trainer.instruments()
            trainer.optimizer.zero_grad(set_to_none=True)
            sync()
            times[key].append(time.perf_counter() - t0)
    for key, v in times.items():
        v.sort()
        print(f"instrumentation {key:>3}: min {v[0] * 1e3:.1f} ms, lower quartile {v[len(v) // 4] * 1e3:.1f} ms, "
              f"median {v[len(v) // 2] * 1e3:.1f} ms ({trainer.device}, preset {args.preset}, 8 x 128 tokens)")


if __name__ == "__main__":
    main()
