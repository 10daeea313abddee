"""Decoding tokens/s with the KV cache: eager vs compiled (static cache + CUDA graphs), DIFF vs baseline,
and transformers' ``generate`` with its static cache beside.

    python benchmarks/decode.py              # 542M shape, batch 1 and 32 -> results/decode-<gpu>.json
    python benchmarks/decode.py --smoke      # tiny model, CPU or GPU: checks the script runs

bf16 weights, greedy. Decode rate = B·(new − 1) / (t(generate new) − t(generate 1)): the prefill and the
first token are subtracted, so it is the per-step rate. Each measurement is the median of ``--repeats``
after one warm-up call (which compiles). "same_tokens" checks the compiled path's greedy tokens
against the eager path's (bf16 on a GPU: a near-tie may flip a token; on the CPU test in fp32 they
must be equal, tests/test_decode.py). HF rows: ``cache_implementation="static"``; "eager" with
``generation_config.disable_compile = True``, "compiled" as transformers does by itself on a GPU with a
static cache (it compiles the forward, ``mode="reduce-overhead"``, unless ``disable_compile`` is set: a
row without that flag is a compiled one, which the first H200 run labelled eager).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from diff_transformer.config import ModelConfig, matched_pair, preset
from diff_transformer.model import DiffTransformerLM

RESULTS = Path(__file__).parent / "results"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    """Median seconds of fn() over ``repeats`` calls, after one warm-up call."""
    fn()
    ts = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def decode_rate(gen, prompt, new: int, device, repeats: int) -> dict:
    """gen(prompt, n) -> tokens; the per-step decode rate from generating ``new`` and 1 token."""
    t_new = timed(lambda: gen(prompt, new), device, repeats)
    t_one = timed(lambda: gen(prompt, 1), device, repeats)
    b = prompt.shape[0]
    return {"tokens_per_s": b * (new - 1) / max(t_new - t_one, 1e-9), "generate_s": t_new, "prefill_s": t_one}


def agreement(eager: torch.Tensor, compiled: torch.Tensor, prompt_len: int) -> dict:
    """How far the compiled path's greedy tokens follow the eager path's: equal throughout
    (``same_tokens``), the first new-token index where some row differs (None if none) and the share
    of new tokens equal. Once a near-tie flips one token the two continuations part, so the first
    mismatch says more than the share; random-weight models have many near-ties."""
    a, b = eager[:, prompt_len:], compiled[:, prompt_len:]
    n = min(a.shape[1], b.shape[1])
    equal = a[:, :n] == b[:, :n]
    differs = (~equal).any(dim=0).nonzero()
    return {"same_tokens": bool(a.shape == b.shape and equal.all()),
            "first_mismatch": int(differs[0]) if len(differs) else None,
            "equal_share": float(equal.float().mean()) if n else 1.0}


@torch.no_grad()
def mismatch_margin(model, eager: torch.Tensor, compiled: torch.Tensor, prompt_len: int, first: int) -> dict:
    """At the first differing new token: is it a near-tie? One forward over the common prefix gives the
    logits both paths chose from; per differing row, the compiled token's rank among them and the top-1
    minus top-2 logit gap, also in units of one rounding step of the top logit in the model's dtype. A
    compiled token that is the runner-up within a step or two is a near-tie flip; anything else points at
    a defect of the static path."""
    pos = prompt_len + first  # the token index both paths predicted differently
    logits = model(eager[:, :pos])[:, -1].float()  # (B, V)
    rows = (eager[:, pos] != compiled[:, pos]).nonzero().flatten().tolist()
    top2 = logits.topk(2, dim=-1)
    eps = torch.finfo(next(model.parameters()).dtype).eps
    out = []
    for r in rows:
        gap = float(top2.values[r, 0] - top2.values[r, 1])
        top = float(top2.values[r, 0].abs())
        step = 2.0 ** math.floor(math.log2(top)) * eps if top > 0 else eps  # one ulp of the top logit
        rank = int((logits[r] > logits[r, compiled[r, pos]]).sum())  # 0 = top choice, 1 = runner-up
        out.append({"row": r, "compiled_token_rank": rank, "top2_gap": gap, "gap_in_rounding_steps": gap / step})
    return {"rows_differing": len(rows), "first_rows": out[:8],
            "all_runner_up_within_2_steps": bool(out) and all(o["compiled_token_rank"] == 1
                                                              and o["gap_in_rounding_steps"] <= 2 for o in out)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 32 (smoke: 1 2)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt length (default 512; smoke 8)")
    ap.add_argument("--new", type=int, default=None, help="new tokens (default 128; smoke 6)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per figure (default 3; smoke 1)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("benchmarks/decode.py needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    smoke = args.smoke
    batches = args.batches or ([1, 2] if smoke else [1, 32])
    plen = args.prompt or (8 if smoke else 512)
    new = args.new or (6 if smoke else 128)
    repeats = args.repeats or (1 if smoke else 3)
    if smoke:
        cfg = preset("tiny", vocab_size=512, max_seq_len=64)
    else:  # the 542M shape of benchmarks/train_throughput.py
        cfg = ModelConfig(dim=2048, n_layers=8, n_heads=16, ffn_dim=5632, vocab_size=32000, max_seq_len=4096)
    dtype = torch.bfloat16 if cuda else torch.float32  # CPU smoke in fp32 (bf16 matmuls are slow there)
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    tag = gpu.split()[-1].lower() if cuda else "cpu"
    out = args.out or (Path(tempfile.gettempdir()) / f"decode-{tag}-smoke.json" if smoke else RESULTS / f"decode-{tag}.json")
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        transformers, tf_version = None, None
    res = {"gpu": gpu, "torch": torch.__version__, "transformers": tf_version, "python": platform.python_version(),
           "dtype": str(dtype), "prompt": plen, "new_tokens": new, "repeats": repeats, "config": cfg.to_dict(),
           "rows": {}}
    out.parent.mkdir(parents=True, exist_ok=True)
    diff_cfg, base_cfg = matched_pair(cfg)
    for name, mcfg in (("baseline", base_cfg), ("diff", diff_cfg)):
        torch.manual_seed(0)
        model = DiffTransformerLM(mcfg).to(device=device, dtype=dtype).eval()
        for b in batches:
            prompt = torch.randint(0, cfg.vocab_size, (b, plen), device=device)
            row = {}
            for mode in ("eager", "compiled"):
                gen = lambda p, n, c=mode == "compiled": model.generate(p, n, temperature=0, compile=c)  # noqa: E731
                try:
                    row[mode] = decode_rate(gen, prompt, new, device, repeats)
                except Exception as e:  # noqa: BLE001 - out of memory or a compile failure: recorded
                    row[mode] = {"error": f"{type(e).__name__}: {e}"[:300]}
            try:
                eager_tokens = model.generate(prompt, new, temperature=0)
                compiled_tokens = model.generate(prompt, new, temperature=0, compile=True)
                row.update(agreement(eager_tokens, compiled_tokens, plen))
                if row["first_mismatch"] is not None:
                    row["first_mismatch_margin"] = mismatch_margin(model, eager_tokens, compiled_tokens, plen,
                                                                   row["first_mismatch"])
            except Exception as e:  # noqa: BLE001
                row["same_tokens"] = f"{type(e).__name__}: {e}"[:300]
            if "tokens_per_s" in row["eager"] and "tokens_per_s" in row["compiled"]:
                row["compiled_over_eager"] = row["compiled"]["tokens_per_s"] / row["eager"]["tokens_per_s"]
            res["rows"][f"{name}_b{b}"] = row
            print(f"{name} b={b}: {json.dumps(row)}", flush=True)
            out.write_text(json.dumps(res, indent=1))
        del model
        torch._dynamo.reset()
        if cuda:
            torch.cuda.empty_cache()
    for b in batches:
        r = res["rows"]
        for mode in ("eager", "compiled"):
            d, base = r[f"diff_b{b}"].get(mode, {}), r[f"baseline_b{b}"].get(mode, {})
            if "tokens_per_s" in d and "tokens_per_s" in base:
                res.setdefault("ratios", {})[f"diff_over_baseline_{mode}_b{b}"] = d["tokens_per_s"] / base["tokens_per_s"]

    if transformers is not None and not args.no_hf:
        from diff_transformer.hf import hf_config

        for name, mcfg, cls in (("hf_llama", base_cfg, "LlamaForCausalLM"), ("hf_diffllama", diff_cfg, "DiffLlamaForCausalLM")):
            torch.manual_seed(0)
            hf = getattr(transformers, cls)._from_config(hf_config(mcfg), attn_implementation="sdpa")
            hf = hf.to(device=device, dtype=dtype).eval()
            hf.generation_config.cache_implementation = "static"
            hf.generation_config.pad_token_id = 0
            for mode in ("eager", "compiled"):
                # transformers compiles the forward itself for a static cache on a GPU; on the CPU it needs
                # a compile_config that asks for all devices.
                hf.generation_config.disable_compile = mode == "eager"
                if mode == "compiled" and not cuda:
                    hf.generation_config.compile_config = transformers.CompileConfig(mode=None)
                    hf.generation_config.compile_config._compile_all_devices = True
                for b in batches:
                    prompt = torch.randint(0, cfg.vocab_size, (b, plen), device=device)

                    def gen(p, n):
                        return hf.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=n, min_new_tokens=n,
                                           do_sample=False)
                    try:
                        row = decode_rate(gen, prompt, new, device, repeats)
                    except Exception as e:  # noqa: BLE001 - transformers' API or a compile failure: recorded
                        row = {"error": f"{type(e).__name__}: {e}"[:300]}
                    res["rows"][f"{name}_{mode}_b{b}"] = row
                    print(f"{name} {mode} b={b}: {json.dumps(row)}", flush=True)
                    out.write_text(json.dumps(res, indent=1))
            del hf
            torch._dynamo.reset()
            if cuda:
                torch.cuda.empty_cache()
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
