"""benchmarks/fsdp_host.py: each variant's step at the global batch and at half of it, in one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fsdp_host.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                               "PYTHONPATH": str(SCRIPT.parents[1] / "src")})


def test_smoke_times_every_variant_and_bounds_two_gpus(tmp_path):
    out = tmp_path / "host.json"
    proc = run("--smoke", "--variants", "none,ddp,fsdp:never/2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    rows = record["results"]["diff"]["runs"]
    assert set(rows) == {f"{v}@{n}" for v in ("none", "ddp", "fsdp:never/2") for n in (4, 2)}
    for row in rows.values():
        assert row["finite"] and row["step_ms"] > 0 and row["dispatch_ms"] <= row["step_ms"]
        assert row["tokens_per_s"] == row["rows"] * 32 / (row["step_ms"] / 1e3)
    # Every variant trains the same model on the same rows: the same first loss (fp32 on the CPU).
    first = {k: v["first_loss"] for k, v in rows.items() if k.endswith("@4")}
    assert max(first.values()) - min(first.values()) < 1e-5, first
    bounds = record["results"]["diff"]["bound_2gpu"]
    assert set(bounds) == {"ddp", "fsdp:never/2"}
    assert bounds["ddp"] == rows["none@4"]["step_ms"] / rows["ddp@2"]["step_ms"]


def test_bad_arguments_name_the_fix(tmp_path):
    for args, needle in [(["--variants", "fsdp:sometimes/2"], "fsdp:RESHARD/BLOCKS"),
                         (["--variants", "fsdp:auto/0"], "fsdp:RESHARD/BLOCKS"),
                         (["--batch-size", "3"], "even number"), (["--models", "gpt"], "diff,baseline")]:
        proc = run(*args, "--out", str(tmp_path / "x.json"))
        assert proc.returncode == 2 and needle in proc.stderr, (args, proc.stderr)
        assert not (tmp_path / "x.json").exists()
