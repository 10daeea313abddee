"""Feed randomly mutated checkpoints, model folders, tokenizer folders and cache manifests to every loader
(through ``diff_transformer.cli.main``); for test_hardening.py, run in a child process under a memory limit.

    python tests/fuzz_loaders.py ROOT SEED CASES

``ROOT`` holds ``run/`` (a trained run), ``model/`` (a model folder), ``cache/`` (its data cache) and
``corpus/``. Prints one JSON line per case: the loader, the mutation, the exit code (or "raised"/"hang"),
stderr's last lines, whether the mutated folder stayed byte-identical, and the seconds taken.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

from diff_transformer.cli import main
from diff_transformer.train import checkpoint as ckpt

from conftest import snapshot  # tests/ is this script's folder, so on sys.path

TINY = ["model.dim=64", "model.n_layers=2", "data.tokenizer=byte", "batch_size=4", "seq_len=16",
        "eval_every=3", "eval_batches=2", "ckpt_every=3", "log_every=1", "warmup_steps=2"]
WRONG_VALUES = ["x", "", -1, 0, 2.5, 10**12, 10**30, -(10**30), 1e308, None, True, [], [1, "a"], {}, {"a": 1},
                "../../etc/hostname", "/etc/hostname", "\x00", 1 << 63]


class Hang(BaseException):  # not caught by the code under test
    pass


def mutate_json(data, rng: random.Random):
    """Replace one value somewhere in ``data`` (objects and lists, to depth 3) by a wrong one."""
    node, depth = data, 0
    while isinstance(node, (dict, list)) and node and depth < 3:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = rng.choice(keys)
        if not isinstance(node[key], (dict, list)) or rng.random() < 0.4 or depth == 2:
            node[key] = rng.choice(WRONG_VALUES)
            return data
        node, depth = node[key], depth + 1
    return rng.choice(WRONG_VALUES) if rng.random() < 0.3 else data


def mutate_file(path: Path, rng: random.Random) -> str:
    data = path.read_bytes()
    how = rng.choice(["flip", "truncate", "json", "json", "empty"]) if path.suffix == ".json" else \
        rng.choice(["flip", "truncate", "empty", "header"])
    if how == "flip" and data:
        i = rng.randrange(len(data))
        data = data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:]
    elif how == "truncate":
        data = data[:rng.randrange(max(1, len(data)))]
    elif how == "empty":
        data = b""
    elif how == "header" and len(data) > 8:  # a safetensors header length that lies
        data = rng.choice([0, 7, 1 << 40, len(data)]).to_bytes(8, "little") + data[8:]
    elif how == "json":
        try:
            data = json.dumps(mutate_json(json.loads(data), rng)).encode()
        except ValueError:
            how = "json-unparsable"
    path.write_bytes(data)
    return f"{how} {path.name}"


def reseal(folder: Path, escape: str | None = None) -> None:
    try:
        manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    except ValueError:  # an unparsable manifest: only the marker is made to match it
        (folder / ckpt.MARKER).write_text(json.dumps({"manifest_sha256": ckpt.sha256(folder / ckpt.MANIFEST)}))
        return
    files = manifest["files"] if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else {}
    files = {n: {"sha256": ckpt.sha256(folder / n) if (folder / n).is_file() else "0" * 64} for n in files}
    if escape:
        files[escape] = {"sha256": "0" * 64}
    (folder / ckpt.MANIFEST).write_text(json.dumps({"step": manifest.get("step") if isinstance(manifest, dict) else 0,
                                                    "files": files}))
    (folder / ckpt.MARKER).write_text(json.dumps({"manifest_sha256": ckpt.sha256(folder / ckpt.MANIFEST)}))


def one_case(root: Path, work: Path, rng: random.Random) -> dict:
    base = ["--data-cache", str(root / "cache"), "--no-progress"]
    train = ["train", "--preset", "tiny", *base, "--set", *TINY, f"data.source={root / 'corpus'}"]
    kind = rng.choice(["checkpoint", "checkpoint", "model", "tokenizer", "cache", "config"]
                      + (["hf"] if (root / "hf").is_dir() else []))
    if kind == "checkpoint":
        folder = work / "run" / "checkpoints" / "step_00000006"
        shutil.copytree(root / "run" / "checkpoints" / "step_00000006", folder)
        shutil.copytree(root / "run" / "tokenizer", work / "run" / "tokenizer")
        shutil.copy(root / "run" / "run.json", work / "run" / "run.json")
        target = rng.choice(sorted(p for p in folder.iterdir() if p.name != ckpt.MARKER))
        what = mutate_file(target, rng)
        if rng.random() < 0.7 or target.name == ckpt.MANIFEST:
            escape = rng.choice([None, None, "../../run.json", "/etc/hostname", "sub/x"])
            reseal(folder, escape)
            what += f", resealed{' + ' + escape if escape else ''}"
        watched = work / "run"
        argv = rng.choice([["generate", str(folder), "--prompt", "a", "--max-new-tokens", "2"],
                           ["eval", str(folder), *base[:2]], ["export", str(folder), "--out", str(work / "out")],
                           [*train, "steps=9", "--out", str(work / "out"), "--resume", str(folder)]])
    elif kind == "model":
        folder = work / "model"
        shutil.copytree(root / "model", folder)
        target = rng.choice(sorted(folder.iterdir()))
        what = mutate_file(target, rng)
        watched = folder
        argv = rng.choice([["generate", str(folder), "--prompt", "a", "--max-new-tokens", "2"],
                           ["export", str(folder), "--out", str(work / "out")],
                           ["train", "--init-from", str(folder), *base, "--set", f"data.source={root / 'corpus'}",
                            "batch_size=4", "seq_len=16", "steps=1", "eval_batches=1", "--out", str(work / "out")]])
    elif kind == "tokenizer":
        folder = work / "tok"
        shutil.copytree(root / "model", folder)
        for p in folder.iterdir():
            if not p.name.startswith("tokenizer"):
                p.unlink()
        target = rng.choice(sorted(folder.iterdir()))
        what = mutate_file(target, rng)
        watched = folder
        argv = [*train, f"data.tokenizer=saved:{folder}", "steps=1", "--out", str(work / "out")]
    elif kind == "hf":  # a transformers folder given to import
        folder = work / "hf"
        shutil.copytree(root / "hf", folder)
        what = mutate_file(rng.choice(sorted(folder.iterdir())), rng)
        watched = folder
        argv = ["import", str(folder), "--out", str(work / "out")]
    elif kind == "config":  # a run.json given to --config (and read back from --out on a resume)
        folder = work / "cfg"
        folder.mkdir()
        shutil.copy(root / "run" / "run.json", folder / "run.json")
        what = mutate_file(folder / "run.json", rng)
        watched = folder
        argv = ["train", "--config", str(folder / "run.json"), *base, "--set", f"data.source={root / 'corpus'}",
                "steps=1", "--out", str(work / "out")]
    else:
        cache = work / "cache"
        shutil.copytree(root / "cache", cache)
        folder = next(p for p in cache.iterdir() if p.is_dir() and p.name.startswith("corpus-byte-"))
        what = mutate_file(folder / "manifest.json", rng)
        if rng.random() < 0.7 and (folder / "manifest.sha256").is_file():
            (folder / "manifest.sha256").write_text(ckpt.sha256(folder / "manifest.json"))
            what += ", rehashed"
        watched = cache
        argv = [a if a != str(root / "cache") else str(cache) for a in train] + ["steps=1", "--out", str(work / "out")]
    before = snapshot(watched, dirs=True)
    err, out = io.StringIO(), io.StringIO()
    t0 = time.monotonic()
    signal.alarm(60)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)
    except Hang:
        code = "hang"
    except BaseException:  # noqa: BLE001 - a traceback is what this looks for
        code = "raised"
        err.write(traceback.format_exc())
    finally:
        signal.alarm(0)
    return {"loader": argv[0], "kind": kind, "mutation": what, "code": code, "stderr": err.getvalue()[-3000:],
            "stdout": out.getvalue()[-500:],
            "unchanged": snapshot(watched, dirs=True) == before, "seconds": round(time.monotonic() - t0, 2)}


def on_alarm(signum, frame):
    raise Hang()


if __name__ == "__main__":
    root, seed, cases = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    signal.signal(signal.SIGALRM, on_alarm)
    rng = random.Random(seed)
    for i in range(cases):
        work = root / f"case{i}"
        work.mkdir()
        print(json.dumps({"case": i, **one_case(root, work, rng)}), flush=True)
        shutil.rmtree(work, ignore_errors=True)
