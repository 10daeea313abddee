"""``train.profile_steps=N``: trace N optimizer steps with ``torch.profiler`` (torchtitan's profiling
option, for one short window instead of a period).

The window starts after ``WAIT`` steps of the session (allocator, compile and data warm-up) and ``WARMUP``
profiler warm-up steps. Each rank writes, into ``RUN/profile/``:

- ``rank<r>.trace.json``: the Chrome trace (open in https://ui.perfetto.dev or chrome://tracing);
- ``rank<r>.txt``: the operators with the most self time (device time first on CUDA), as a table;
- ``rank<r>.json``: the same operators and the window's totals, for scripts.

Profiling slows the traced steps; their step times are recorded as usual, so leave it off when
measuring tokens/s.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

WAIT, WARMUP = 3, 2  # session steps skipped, then profiler warm-up steps, before the traced window
TOP = 40  # operators listed


def steps_needed(profile_steps: int) -> int:
    """Session steps before the trace is written: a run shorter than this never writes one."""
    return WAIT + WARMUP + profile_steps


def _self_time(event, cuda: bool) -> float:
    """Self device time on CUDA (µs; the attribute's name differs across torch versions), else self CPU."""
    if cuda:
        for name in ("self_device_time_total", "self_cuda_time_total"):
            value = getattr(event, name, None)
            if value is not None:
                return float(value)
    return float(event.self_cpu_time_total)


def write_report(prof, folder: Path, rank: int, steps: int, cuda: bool) -> Path:
    """The trace, the table and the JSON summary of ``prof``'s window for ``rank``; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(folder / f"rank{rank}.trace.json"))
    events = sorted(prof.key_averages(), key=lambda e: _self_time(e, cuda), reverse=True)
    total = sum(_self_time(e, cuda) for e in events)
    rows = [{"op": e.key, "calls": int(e.count), "self_us": _self_time(e, cuda),
             "self_cpu_us": float(e.self_cpu_time_total)} for e in events[:TOP]]
    clock = "device" if cuda else "CPU"
    summary = {"rank": rank, "steps": steps, "clock": clock, "self_us_total": total,
               "self_us_per_step": total / max(steps, 1), "top": rows}
    (folder / f"rank{rank}.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"{steps} traced steps, rank {rank}: self {clock} time by operator (the top {TOP}; "
             f"{total / 1e3 / max(steps, 1):.2f} ms a step in all)",
             f"{'op':<60} {'calls':>8} {'self ms':>10} {'share':>7}"]
    for r in rows:
        share = r["self_us"] / total if total else 0.0
        lines.append(f"{r['op'][:60]:<60} {r['calls']:>8} {r['self_us'] / 1e3:>10.3f} {share:>7.1%}")
    (folder / f"rank{rank}.txt").write_text("\n".join(lines) + "\n")
    return folder


def profiler(profile_steps: int, folder: Path, rank: int, device: torch.device, log=print):
    """A context whose value has ``.step()`` (call it after every optimizer step); a no-op when
    ``profile_steps`` is 0. Writes the report once the window has been traced."""
    if not profile_steps:
        return contextlib.nullcontext(_NoProfiler())
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def ready(prof) -> None:
        out = write_report(prof, folder, rank, profile_steps, cuda)
        if rank == 0:
            log(f"profile of {profile_steps} steps written to {out} (rank<r>.txt, .json, .trace.json)")

    return profile(activities=activities, on_trace_ready=ready, record_shapes=False,
                   schedule=schedule(wait=WAIT, warmup=WARMUP, active=profile_steps, repeat=1))


class _NoProfiler:
    def step(self) -> None:
        pass
