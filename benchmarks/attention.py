"""Differential attention on a GPU: the fused Triton kernel against every SDPA path.

    python benchmarks/attention.py                  # kernel check + attention tables -> results/attention-<gpu>.json
    python benchmarks/attention.py --model          # also the base-preset model: training, memory, decoding, HF DiffLlama
    python benchmarks/attention.py --sweep --model  # first search launch shapes (for NOTES.md), then all of it

``auto``'s table (attention/auto_table.json; issue 11: auto within 3% of the faster backend at every
shape), at head dims 64 and 128, N 512 to 16K, both variants, training (forward+backward) and
inference (forward): in two invocations, since ``auto`` reads its table when the package is imported

    python benchmarks/attention.py --auto-table --write-table src/diff_transformer/attention/auto_table.json
    python benchmarks/attention.py --auto-table     # auto with the new table -> results/auto-table-<gpu>.json

The first times the kernel, SDPA (its own pattern choice) and ``auto`` through the public op, writes
results/auto-table-<gpu>-build.json and a new table from the faster backend at each shape; the second
times the same shapes again and checks ``auto`` (``auto_ok`` per shape, ``auto_ok_all``). Run from the
repository with the package importable from src/ (PYTHONPATH=src or an editable install), so the
second run reads the table the first one wrote.

Shapes follow issue 6: bf16, 32K tokens a batch (B = 32768 / N); the baseline has 16 heads of d=128;
DIFF V1 has 8 differential heads (q/k d=128, v 256); DIFF V2 has 32 query heads in 16 pairs over 16
kv heads of width 128. Times are medians of ``triton.testing.do_bench``.

TFLOP/s are useful work (benchmarks/flops.py, SPEC.md's "Work floor"): the matrix products a path
must do, not what it executes. A DIFF V1 head (d, 2d) costs 6N²d forward and 10N²d backward against
4N²d and 10N²d for two baseline heads, causal halving all; so a DIFF path at the baseline's TFLOP/s
runs forward at 1.5× and forward+backward at 16/14 = 1.14× the baseline's time. Every row reports
the time ratio to the reference ("x") and the work ratio ("work_x"). ``diff_plain_four`` is the best
DIFF V1 a user could write without this library: four SDPA calls in bf16 with a trainable bf16 λ.
"""

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from diff_transformer.attention import auto_table, differential_attention, resolve_backend, sdpa
from diff_transformer.attention.triton import op

sys.path.insert(0, str(Path(__file__).parent))
from flops import attention_flops, model_flops_per_token  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DTYPE = torch.bfloat16


def bench(fn, grad_to_none=None) -> float:
    """Median milliseconds of fn()."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def rand(*shape, grad=True):
    return torch.randn(*shape, device="cuda", dtype=DTYPE).requires_grad_(grad)


def fwd_bwd(fn, inputs):
    """Closures timing fn(*inputs) alone and with its backward."""
    out = fn(*inputs)
    g = torch.randn_like(out)

    def fwd():
        with torch.no_grad():
            fn(*inputs)

    def both():
        fn(*inputs).backward(g)

    return fwd, both


def peak_mib(fn) -> float:
    """Peak extra memory of one fn() over what is allocated before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def plain_diff_v1(q1, q2, k1, k2, v, lam):
    """DIFF V1 as a user would write it on SDPA: the value in halves of width d (flash and cuDNN want
    equal widths), four causal calls, (A1 − λ A2) V in bf16 with λ a trainable bf16 scalar."""
    v1, v2 = v.chunk(2, dim=-1)  # (B, H, N, d) each
    sdpa_ = lambda q, k, v_: F.scaled_dot_product_attention(q, k, v_, is_causal=True)  # noqa: E731
    o1 = torch.cat((sdpa_(q1, k1, v1), sdpa_(q1, k1, v2)), dim=-1)  # (B, H, N, 2d)
    o2 = torch.cat((sdpa_(q2, k2, v1), sdpa_(q2, k2, v2)), dim=-1)  # (B, H, N, 2d)
    return o1 - lam * o2


# Paths -----------------------------------------------------------------------------------------
def v1_paths(n, tokens):
    b, h, d = tokens // n, 8, 128
    q1, q2, k1, k2 = (rand(b, h, n, d) for _ in range(4))
    v = rand(b, h, n, 2 * d)
    lam = torch.tensor(0.5, device="cuda", requires_grad=True)
    lam_bf16 = torch.tensor(0.5, device="cuda", dtype=DTYPE, requires_grad=True)
    base_q, base_k, base_v = (rand(b, 16, n, d) for _ in range(3))
    diff_in = (q1, q2, k1, k2, v, lam)
    base_w = attention_flops(b, 16, n, d, d)
    diff_w = attention_flops(b, h, n, d, 2 * d, branches=2)
    return b, {
        "sdpa_default": (lambda q, k, v_: F.scaled_dot_product_attention(q, k, v_, is_causal=True),
                         (base_q, base_k, base_v), base_w),
        "sdpa_cudnn": ("cudnn", (base_q, base_k, base_v), base_w),
        "sdpa_flash": ("flash", (base_q, base_k, base_v), base_w),
        "diff_plain_four": (plain_diff_v1, (q1, q2, k1, k2, v, lam_bf16), diff_w),
        "diff_sdpa_four": (lambda *t: sdpa.differential_attention(*t, causal=True, pattern="four"), diff_in, diff_w),
        "diff_sdpa_two": (lambda *t: sdpa.differential_attention(*t, causal=True, pattern="two"), diff_in, diff_w),
        "diff_triton": (lambda *t: differential_attention(*t, causal=True, backend="triton"), diff_in, diff_w),
    }


def v2_paths(n, tokens):
    b, h, d = tokens // n, 16, 128
    q1, q2, k, v = (rand(b, h, n, d) for _ in range(4))
    lam = torch.rand(b, h, n, device="cuda").requires_grad_()
    q_all = rand(b, 2 * h, n, d)
    diff_in = (q1, q2, k, k, v, lam)
    diff_w = attention_flops(b, h, n, d, d, branches=2)
    return b, {
        "sdpa_2h_heads": (lambda q, k_, v_: F.scaled_dot_product_attention(q, k_, v_, is_causal=True, enable_gqa=True),
                          (q_all, k, v), attention_flops(b, 2 * h, n, d, d)),
        "diff_sdpa_stacked": (lambda *t: sdpa.differential_attention(*t, causal=True, pattern="stacked"), diff_in,
                              diff_w),
        "diff_triton": (lambda *t: differential_attention(*t, causal=True, backend="triton"), diff_in, diff_w),
    }


def run_path(fn, inputs):
    if fn in ("cudnn", "flash"):
        backend = SDPBackend.CUDNN_ATTENTION if fn == "cudnn" else SDPBackend.FLASH_ATTENTION

        def fn(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    fwd, both = fwd_bwd(fn, inputs)
    grads = [t for t in inputs if t.requires_grad]
    return fwd, both, grads


def attention_tables(ns, tokens):
    rows = []
    for variant, make in (("v1", v1_paths), ("v2", v2_paths)):
        for n in ns:
            b, paths = make(n, tokens)
            row = {"variant": variant, "N": n, "B": b, "paths": {}}
            for name, (fn, inputs, (fl_f, fl_b)) in paths.items():
                try:
                    fwd, both, grads = run_path(fn, inputs)
                    t_f, t_b = bench(fwd), bench(both, grads)
                    mem = peak_mib(both)
                except (RuntimeError, triton.runtime.errors.OutOfResources) as e:  # a backend missing here
                    row["paths"][name] = {"error": str(e).splitlines()[0][:200]}
                    continue
                row["paths"][name] = {"fwd_ms": t_f, "fwd_bwd_ms": t_b, "fwd_flops": fl_f, "bwd_flops": fl_b,
                                      "fwd_tflops": fl_f / t_f * 1e-9, "fwd_bwd_tflops": (fl_f + fl_b) / t_b * 1e-9,
                                      "peak_mib": mem}
            ref = "sdpa_default" if variant == "v1" else "sdpa_2h_heads"
            r = row["paths"]
            for name, p in r.items():
                if "fwd_ms" in p and "fwd_ms" in r.get(ref, {}):
                    p["fwd_x"] = p["fwd_ms"] / r[ref]["fwd_ms"]
                    p["fwd_bwd_x"] = p["fwd_bwd_ms"] / r[ref]["fwd_bwd_ms"]
                    p["fwd_work_x"] = p["fwd_flops"] / r[ref]["fwd_flops"]
                    p["fwd_bwd_work_x"] = (p["fwd_flops"] + p["bwd_flops"]) / (r[ref]["fwd_flops"] + r[ref]["bwd_flops"])
            if "fwd_ms" in r.get("diff_triton", {}) and "fwd_ms" in r.get("diff_plain_four", {}):
                # the least target: the kernel beats the plain 4-call SDPA DIFF by >= 15% (ratio >= 1.15)
                row["plain_four_over_triton_fwd_bwd"] = r["diff_plain_four"]["fwd_bwd_ms"] / r["diff_triton"]["fwd_bwd_ms"]
            rows.append(row)
            print(f"{variant} N={n:6d} B={b:3d} " + "  ".join(
                f"{k}: {p['fwd_ms']:.2f}/{p['fwd_bwd_ms']:.2f} ms ({p.get('fwd_bwd_x', 0):.2f}x time, "
                f"{p.get('fwd_bwd_work_x', 0):.2f}x work, {p['fwd_tflops']:.0f}/{p['fwd_bwd_tflops']:.0f} TFLOP/s)"
                if "fwd_ms" in p else f"{k}: n/a" for k, p in r.items()), flush=True)
            del paths
            torch.cuda.empty_cache()
    return rows


# auto's table ----------------------------------------------------------------------------------------
AUTO_HEAD_DIMS = (64, 128)
AUTO_NS = (512, 1024, 2048, 4096, 8192, 16384)


def auto_inputs(variant, d, n, tokens):
    """(B, DIFF inputs) at the tables' width for head dim d: V1 1024/d heads (v 2d, 0-d λ), V2 2048/d
    query pairs over as many kv heads (v d, per-token λ)."""
    b = tokens // n
    if variant == "v1":
        h = 1024 // d
        q1, q2, k1, k2 = (rand(b, h, n, d) for _ in range(4))
        return b, (q1, q2, k1, k2, rand(b, h, n, 2 * d), torch.tensor(0.5, device="cuda", requires_grad=True))
    h = 2048 // d
    q1, q2, k, v = (rand(b, h, n, d) for _ in range(4))
    return b, (q1, q2, k, k, v, torch.rand(b, h, n, device="cuda").requires_grad_())


def time_op(backend, inputs, mode) -> float:
    """Median ms of the public op with ``backend``: forward+backward ("train") or forward under no_grad ("infer")."""
    op = lambda *t: differential_attention(*t, causal=True, backend=backend)  # noqa: E731
    if mode == "train":
        _, both, grads = run_path(op, inputs)
        return bench(both, grads)
    with torch.no_grad():  # auto reads the inference table, and the kernel keeps no O2 for a backward
        return bench(lambda: op(*inputs))


def auto_shapes(head_dims, ns, tokens):
    """Backends triton, sdpa (its own pattern choice) and auto at every shape: median ms, auto's choice,
    and ``auto_table.check_auto`` (the faster backend, auto's ratio to it, ``auto_ok``)."""
    rows = []
    for d in head_dims:
        for variant in ("v1", "v2"):
            for n in ns:
                b, inputs = auto_inputs(variant, d, n, tokens)
                q1, _, k1, k2, v, _ = inputs
                for mode in ("train", "infer"):
                    with torch.set_grad_enabled(mode == "train"):
                        choice = resolve_backend("auto", q1, k1, k2, v)
                    ms, errors = {}, {}
                    for backend in ("triton", "sdpa", "auto"):
                        try:
                            ms[backend] = time_op(backend, inputs, mode)
                        except (RuntimeError, triton.runtime.errors.OutOfResources) as e:  # recorded, loses
                            ms[backend] = None
                            errors[backend] = str(e).splitlines()[0][:200]
                    row = {"variant": variant, "mode": mode, "head_dim": d, "N": n, "B": b, "ms": ms,
                           "auto_choice": choice, **auto_table.check_auto(ms)}
                    if errors:
                        row["errors"] = errors
                    rows.append(row)
                    ratio = "n/a" if row["auto_ratio"] is None else f"{row['auto_ratio']:.3f}x"
                    print(f"auto {variant} {mode:5s} d={d:3d} N={n:5d} B={b:3d}  " + "  ".join(
                        f"{k} {t:.3f}" if t is not None else f"{k} failed" for k, t in ms.items())
                        + f" ms; auto took {choice}, {ratio} the faster" + ("" if row["auto_ok"] else "  NOT OK"),
                        flush=True)
                del inputs, q1, k1, k2, v
                torch.cuda.empty_cache()
    return rows


def auto_table_bench(args, meta) -> int:
    """``--auto-table``: time, check auto, and with ``--write-table`` write a table from the winners."""
    built = args.write_table is not None
    out = args.out or RESULTS / f"auto-table-{meta['gpu'].split()[-1].lower()}{'-build' if built else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    used = auto_table.TABLE
    res = {**meta, "head_dims": list(AUTO_HEAD_DIMS), "ns": list(AUTO_NS), "tolerance": auto_table.AUTO_TOLERANCE,
           "table_used": {"meta": used.document["meta"], "fallback_reason": used.fallback_reason,
                          "entries": used.document["entries"]}}
    if used.fallback_reason:
        print(f"auto runs on its built-in thresholds: {used.fallback_reason}", flush=True)
    res["shapes"] = auto_shapes(AUTO_HEAD_DIMS, AUTO_NS, args.tokens)
    bad = [r for r in res["shapes"] if not r["auto_ok"]]
    res["auto_ok_all"] = not bad
    res["worst_auto_ratio"] = max((r["auto_ratio"] for r in res["shapes"] if r["auto_ratio"] is not None),
                                  default=None)
    out.write_text(json.dumps(res, indent=1))
    worst = res["worst_auto_ratio"]
    print(f"auto within {auto_table.AUTO_TOLERANCE:.0%} of the faster backend at {len(res['shapes']) - len(bad)} "
          f"of {len(res['shapes'])} shapes (worst {'n/a' if worst is None else f'{worst:.3f}x'}); wrote {out}",
          flush=True)
    if built:
        table_meta = {k: meta[k] for k in ("gpu", "torch", "triton", "dtype", "tokens_per_batch", "date", "command")}
        doc = auto_table.build_table(res["shapes"], table_meta)
        args.write_table.parent.mkdir(parents=True, exist_ok=True)
        args.write_table.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote the auto table {args.write_table}; check it with the same command without --write-table",
              flush=True)
        if args.write_table.resolve() != auto_table.TABLE_PATH.resolve():
            print(f"note: auto reads {auto_table.TABLE_PATH}, not the table just written", flush=True)
    return 0


# Correctness on the GPU ------------------------------------------------------------------------
def kernel_check():
    """Max relative error of the kernel (compiled, tuned launch shapes) vs the fp32 reference."""
    out = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for variant, d, dv in (("v1", 128, 256), ("v2", 128, 128), ("v1", 64, 128)):
        for n, m, causal in ((1, 1, True), (17, 17, True), (130, 130, True), (130, 130, False), (1000, 1000, True),
                             (3, 300, True)):
            h, h_kv = 4, 2
            r = lambda *s: torch.randn(*s, device="cuda", generator=g).to(DTYPE).requires_grad_()  # noqa: E731
            q1, q2, k1 = r(2, h, n, d), r(2, h, n, d), r(2, h_kv, m, d)
            k2 = k1 if variant == "v2" else r(2, h_kv, m, d)
            v = r(2, h_kv, m, dv)
            lam = (torch.rand(2, h, n, device="cuda") if variant == "v2" else torch.tensor(0.6, device="cuda"))
            lam.requires_grad_()
            ins = list({id(t): t for t in (q1, q2, k1, k2, v, lam)}.values())
            o = differential_attention(q1, q2, k1, k2, v, lam, causal=causal, backend="triton")
            go = torch.randn_like(o)
            gr = torch.autograd.grad(o, ins, go)
            up = [t.detach().float().requires_grad_() for t in (q1, q2, k1, k2, v, lam)]
            if variant == "v2":
                up[3] = up[2]
            ro = differential_attention(*up, causal=causal, backend="reference")
            rg = torch.autograd.grad(ro, list({id(t): t for t in up}.values()), go.float())
            # ‖b‖ floored at 0.1·sqrt(numel): exactly-zero gradients (N = M = 1) compare absolutely.
            errs = [((a.float() - b).norm() / b.norm().clamp_min(0.1 * b.numel() ** 0.5)).item()
                    for a, b in zip((o, *gr), (ro, *rg))]
            finite = all(torch.isfinite(t).all().item() for t in (o, *gr))
            out.append({"variant": variant, "d": d, "dv": dv, "N": n, "M": m, "causal": causal,
                        "rel_err_out_and_grads": errs, "finite": finite})
            print(f"check {variant} d={d} N={n} M={m} causal={causal}: max rel err {max(errs[:-1]):.2e} "
                  f"dlam {errs[-1]:.2e} finite={finite}", flush=True)
    return out


# Launch-shape sweep ----------------------------------------------------------------------------
FWD_CANDIDATES = {
    "v1": [(128, 64, 128, 8, 3), (128, 128, 128, 8, 2), (64, 64, None, 8, 3)],
    "v2": [(128, 64, None, 8, 3), (128, 64, None, 8, 2)],
}
# Backward: a starting point, then coordinate steps (field, candidates) taken in turn, keeping the best.
BWD_START = {
    "v1": dict(pre=(16, 4), dkdv=(64, 32, 4, 2), dq=(128, 32, 8, 3), atomic_dq=False, dv_pass=None),
    "v2": dict(pre=(16, 4), dkdv=(32, 64, 4, 2), dq=(128, 32, 8, 3), atomic_dq=False, dv_pass=None),
}
BWD_STEPS = {
    "v1": [("dv_pass", [(64, 64, 8, 2), (32, 64, 4, 2), (32, 128, 8, 2), (64, 32, 4, 2)]),
           ("dkdv", [(32, 64, 4, 2), (64, 64, 8, 2), (32, 128, 8, 2), (64, 32, 4, 3)]),
           ("dq", [(128, 64, 8, 2), (64, 64, 4, 2)])],
    "v2": [("dkdv", [(32, 128, 8, 2), (64, 64, 4, 2)]),
           ("dv_pass", [(32, 128, 8, 2), (64, 128, 8, 2), (64, 64, 4, 2)]),
           ("dkdv", [(32, 128, 8, 2), (64, 128, 8, 2), (64, 64, 4, 2)])],
}


def _timed(fn) -> float:
    try:
        return bench(fn)
    except Exception as e:  # noqa: BLE001 - out of shared memory or registers: not a candidate
        print(f"  skipped: {type(e).__name__}", flush=True)
        return float("inf")


def sweep(n=8192, tokens=32768):
    """Coordinate search over launch shapes at one N: the forward's candidates, then BWD_STEPS in turn.

    Returns (every timing, the best (FwdConfig, BwdConfig) for each variant).
    """
    b = tokens // n
    results, best = [], {}
    for variant, h, d, dv in (("v1", 8, 128, 256), ("v2", 16, 128, 128)):
        q1, q2, k1 = rand(b, h, n, d, grad=False), rand(b, h, n, d, grad=False), rand(b, h, n, d, grad=False)
        k2 = None if variant == "v2" else rand(b, h, n, d, grad=False)
        v = rand(b, h, n, dv, grad=False)
        lam = torch.rand(b, h, n, device="cuda") if variant == "v2" else torch.tensor(0.5, device="cuda")
        s = d**-0.5

        def record(kind, cfg, t):
            results.append({"variant": variant, "kind": kind, "config": str(cfg), "ms": t})
            print(f"sweep {variant} {kind} {cfg}: {t:.3f} ms", flush=True)
            return t

        fwd_times = {}
        for c in map(lambda c: op.FwdConfig(*c), FWD_CANDIDATES[variant]):
            fwd_times[c] = record("fwd", c, _timed(
                lambda: op.forward(q1, q2, k1, k2, v, lam, causal=True, scale=s, config=c)))
        fwd_best = min(fwd_times, key=fwd_times.get)
        o, lse1, lse2, o2 = op.forward(q1, q2, k1, k2, v, lam, causal=True, scale=s, config=fwd_best)
        do = torch.randn_like(o)

        def run_bwd(c):
            return _timed(lambda: op.backward(do, q1, q2, k1, k2, v, lam, o, o2, lse1, lse2, causal=True,
                                              scale=s, config=c))

        cur = op.BwdConfig(**BWD_START[variant])
        times = {cur: record("bwd", cur, run_bwd(cur))}
        for field, candidates in BWD_STEPS[variant]:
            for value in candidates:
                c = dataclasses.replace(cur, **{field: value})
                if c not in times:
                    times[c] = record("bwd", c, run_bwd(c))
            cur = min(times, key=times.get)
        best[variant] = (fwd_best, cur)
        print(f"best {variant}: {fwd_best} {fwd_times[fwd_best]:.3f} ms, {cur} {times[cur]:.3f} ms", flush=True)
        del q1, q2, k1, k2, v, o, o2, do
        torch.cuda.empty_cache()
    return results, best


def use_configs(best) -> None:
    """Make the op launch the sweep's winners (V1: dv = 2d, V2: dv = d) for the rest of this process."""
    fwd_default, bwd_default = op.fwd_config, op.bwd_config

    def fwd(d, dv, dtype, device):
        key = "v1" if dv == 2 * d else "v2"
        return best[key][0] if key in best and d == 128 and dtype != torch.float32 else fwd_default(d, dv, dtype, device)

    def bwd(d, dv, dtype, device):
        key = "v1" if dv == 2 * d else "v2"
        return best[key][1] if key in best and d == 128 and dtype != torch.float32 else bwd_default(d, dv, dtype, device)

    op.fwd_config, op.bwd_config = fwd, bwd


def kernel_profile(n=8192, tokens=32768):
    """CUDA time of each kernel in one fused forward+backward (torch.profiler), per variant."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for variant, make in (("v1", v1_paths), ("v2", v2_paths)):
        _, paths = make(n, tokens)
        fn, inputs, _ = paths["diff_triton"]  # (fn, inputs, (fwd, bwd) FLOPs)
        _, both, _ = run_path(fn, inputs)
        both()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                both()
            torch.cuda.synchronize()
        rows = {e.key: e.device_time_total / 5 / 1e3 for e in prof.key_averages() if e.device_time_total > 0}
        out[variant] = dict(sorted(rows.items(), key=lambda kv: -kv[1])[:12])
        print(f"profile {variant} N={n} (ms per fwd+bwd):", json.dumps(out[variant], indent=1), flush=True)
        del paths
        torch.cuda.empty_cache()
    return out


# The model -------------------------------------------------------------------------------------
def model_bench(seq=4096, batch=8, steps=8):
    """Training tokens/s and peak memory of the base preset (DIFF vs baseline, DIFF on SDPA, HF DiffLlama);
    decoding tokens/s with the KV cache at batch 1 and 32 after a 2K prompt."""
    from diff_transformer.config import matched_pair, preset
    from diff_transformer.model import DiffTransformerLM

    diff_cfg, base_cfg = matched_pair(preset("base", max_seq_len=seq))
    res = {"seq": seq, "batch": batch}
    ids = torch.randint(0, diff_cfg.vocab_size, (batch, seq + 1), device="cuda")

    def train_rate(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(ids[:, :-1])
                if hasattr(logits, "logits"):
                    logits = logits.logits
                loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        return {"tokens_per_s": batch * seq * steps / dt, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}

    models = {
        "baseline": base_cfg,
        "diff_auto": diff_cfg,
        "diff_sdpa": diff_cfg.replace(attn_backend="sdpa"),
        "diff_triton": diff_cfg.replace(attn_backend="triton"),
        "diff_v2_auto": diff_cfg.replace(attention="diff_v2"),
        "diff_v2_triton": diff_cfg.replace(attention="diff_v2", attn_backend="triton"),
    }
    for name, cfg in models.items():
        model = DiffTransformerLM(cfg).cuda()
        res[name] = train_rate(model)
        print(f"train {name}: {res[name]}", flush=True)
        del model
        torch.cuda.empty_cache()
    try:
        from transformers import DiffLlamaConfig, DiffLlamaForCausalLM

        hf_cfg = DiffLlamaConfig(vocab_size=diff_cfg.vocab_size, hidden_size=diff_cfg.dim,
                                 intermediate_size=diff_cfg.ffn_dim, num_hidden_layers=diff_cfg.n_layers,
                                 num_attention_heads=diff_cfg.n_heads, num_key_value_heads=diff_cfg.n_kv_heads,
                                 head_dim=diff_cfg.head_dim, max_position_embeddings=seq, tie_word_embeddings=False)
        hf = DiffLlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa").cuda()
        res["hf_diffllama_sdpa"] = train_rate(hf)
        print(f"train hf_diffllama_sdpa: {res['hf_diffllama_sdpa']}", flush=True)
        del hf
    except Exception as e:  # noqa: BLE001 - transformers missing or changed
        res["hf_diffllama_sdpa"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    torch.cuda.empty_cache()

    # Useful work per token (benchmarks/flops.py): the matrices, and attention's causal N² by the work floor.
    with torch.device("meta"):
        f_diff, f_base = (model_flops_per_token(
            non_embedding_params=DiffTransformerLM(c).num_parameters(non_embedding=True), vocab_size=c.vocab_size,
            dim=c.dim, n_layers=c.n_layers, seq=seq, head_dim=c.head_dim, attention=c.attention, n_heads=c.n_heads)
            for c in (diff_cfg, base_cfg))
    res["flop_ratio_diff_over_base"] = f_diff / f_base
    res["speed_ratio_diff_over_base"] = res["diff_auto"]["tokens_per_s"] / res["baseline"]["tokens_per_s"]
    res["speed_ratio_allowed_by_flops"] = f_base / f_diff
    res["memory_ratio_diff_over_base"] = res["diff_auto"]["peak_gib"] / res["baseline"]["peak_gib"]

    # Decoding.
    for name, cfg in (("baseline", base_cfg), ("diff_triton", diff_cfg.replace(attn_backend="triton")),
                      ("diff_sdpa", diff_cfg.replace(attn_backend="sdpa"))):
        model = DiffTransformerLM(cfg).cuda().to(DTYPE).eval()
        for b in (1, 32):
            prompt = torch.randint(0, cfg.vocab_size, (b, 2048), device="cuda")
            new = 64
            with torch.no_grad():
                for _ in range(2):  # the first pass compiles kernels and builds per-length attention plans
                    cache = model.new_cache(b, 2048 + new + 1)
                    logits = model(prompt, cache)
                    tok = logits[:, -1:].argmax(-1)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(new):
                        tok = model(tok, cache)[:, -1:].argmax(-1)
                    torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
            res[f"decode_{name}_b{b}"] = {"tokens_per_s": b * new / dt, "cache_mib": cache.nbytes() / 2**20}
            print(f"decode {name} b={b}: {res[f'decode_{name}_b{b}']}", flush=True)
        del model
        torch.cuda.empty_cache()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", type=int, nargs="+", default=[2048, 4096, 8192, 16384], help="sequence lengths")
    ap.add_argument("--tokens", type=int, default=32768, help="tokens a batch (B = tokens / N)")
    ap.add_argument("--sweep", action="store_true", help="first search the kernels' launch shapes and use the best")
    ap.add_argument("--model", action="store_true", help="also benchmark the base-preset model")
    ap.add_argument("--model-only", action="store_true", help="only the base-preset model benchmark")
    ap.add_argument("--auto-table", action="store_true",
                    help="only time triton, sdpa and auto at head dims 64/128, N 512-16K, and check auto")
    ap.add_argument("--write-table", type=Path, default=None,
                    help="with --auto-table: write a new auto table from the faster backend at each shape")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON output (default results/attention-<gpu>.json; results/auto-table-<gpu>[-build].json)")
    args = ap.parse_args(argv)
    if args.write_table is not None and not args.auto_table:
        ap.error("--write-table needs --auto-table")
    if not torch.cuda.is_available():
        print("benchmarks/attention.py needs a CUDA GPU; none is visible here.", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name()
    meta = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "dtype": str(DTYPE), "tokens_per_batch": args.tokens, "date": datetime.date.today().isoformat(),
            "command": " ".join(["python benchmarks/attention.py", *(argv if argv is not None else sys.argv[1:])])}
    if args.auto_table:
        return auto_table_bench(args, meta)
    out = args.out or RESULTS / f"attention-{gpu.split()[-1].lower()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    res = dict(meta)

    def save():  # after every stage, so a run cut short keeps what it measured
        out.write_text(json.dumps(res, indent=1))

    if args.sweep:
        res["sweep"], best = sweep()
        res["chosen_configs"] = {k: [str(c) for c in v] for k, v in best.items()}
        use_configs(best)
        save()
    if args.model_only:
        res["model"] = model_bench()
        save()
        print(f"wrote {out}")
        return 0
    res["check"] = kernel_check()
    save()
    res["attention"] = attention_tables(args.ns, args.tokens)
    save()
    res["kernel_profile_ms"] = kernel_profile()
    save()
    if args.model:
        res["model"] = model_bench()
        save()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
