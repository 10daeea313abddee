"""benchmarks/multigpu.py --collect: the scaling record from the run folders a stopped command left."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "multigpu.py"


@pytest.fixture(scope="module")
def multigpu():
    spec = importlib.util.spec_from_file_location("multigpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(folder: Path, step_seconds: float, losses: list[float], finished: bool = True) -> None:
    """metrics.jsonl of a run of len(losses) steps of 1000 tokens at ``step_seconds`` a step."""
    folder.mkdir(parents=True)
    lines = [{"kind": "eval", "step": 0, "val_loss": 9.0}]
    lines += [{"kind": "train", "step": i + 1, "loss": loss, "tokens": 1000 * (i + 1),
               "train_seconds": step_seconds * (i + 1)} for i, loss in enumerate(losses)]
    if finished:
        lines += [{"kind": "eval", "step": len(losses), "val_loss": losses[-1]},
                  {"kind": "summary", "step": len(losses), "peak_memory_mb": 100.0}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_collect_gives_speedups_and_curves(tmp_path, multigpu):
    write_run(tmp_path / "diff-1", 0.2, [5.0, 4.0, 3.0, 2.5])
    write_run(tmp_path / "diff-ddp", 0.1, [5.0, 4.0, 3.1, 2.5])
    write_run(tmp_path / "diff-fsdp-never", 0.125, [5.0, 4.0, 3.0, 2.4], finished=False)
    (tmp_path / "cache").mkdir()  # not a run folder
    results = multigpu.collect(tmp_path, skip=2)
    assert set(results) == {"diff"} and set(results["diff"]) == {"1gpu", "ddp", "fsdp-never"}
    assert results["diff"]["1gpu"]["tokens_per_s"] == pytest.approx(5000)
    assert results["diff"]["fsdp-never"]["ok"] is False  # no summary: stopped
    section = multigpu.scaling_section({}, results)
    assert section["speedup_2_over_1"] == {"diff/ddp": pytest.approx(2.0), "diff/fsdp-never": pytest.approx(1.6)}
    assert section["meets_target"] == {"diff/ddp": True, "diff/fsdp-never": False}
    assert section["loss_curve_2_vs_1"]["diff/ddp"]["max_abs"] == pytest.approx(0.1)


def test_collect_of_an_empty_folder_is_a_user_error(tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--collect", str(tmp_path), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no run folders")
    assert not out.exists()


@pytest.mark.parametrize("spec", ["sometimes", "never/0", "auto/x", "auto,never/-1"])
def test_bad_fsdp_spec_is_a_user_error(tmp_path, spec):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--fsdp", spec, "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --fsdp") and len(proc.stderr.splitlines()) == 1
    assert not out.exists()
