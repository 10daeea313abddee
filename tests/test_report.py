"""`diff-transformer report`: the page from synthesised sweep/compare folders, checked in headless Chromium.

The browser test drives Debian's ``chromium`` over the Chrome DevTools Protocol (``--remote-debugging-port``,
the ``websocket-client`` package of the ``test`` extra): the page must load, every ``<img>`` must have
decoded (naturalWidth > 0), nothing may reach the console as an error, and a screenshot is written.
Without chromium the test fails under CI (``CI`` set) and is skipped with the reason otherwise.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from diff_transformer.cli import main
from diff_transformer.config import preset
from diff_transformer.data import DataConfig
from diff_transformer.train.config import RunConfig, TrainConfig

HOSTILE = "<img src=x onerror=alert(1)>"


def _run_config(attention: str, seed: int) -> RunConfig:
    model = preset("tiny", dim=32, n_layers=2, n_heads=4, vocab_size=257, attention=attention)
    return RunConfig(model=model, train=TrainConfig(batch_size=2, seq_len=16, steps=4, seed=seed, log_every=1),
                     data=DataConfig(source="corpus", tokenizer="byte"), preset="tiny")


def write_run(run_dir: Path, attention: str, seed: int, offset: float, evals: dict | None = None) -> None:
    """A run directory as the trainer leaves it: run.json and metrics.jsonl (with instrumentation)."""
    run = _run_config(attention, seed)
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(run.to_json())
    diff = attention == "diff"
    records = []
    for step in range(0, 5):
        if step:
            records.append({"kind": "train", "step": step, "loss": 5.0 - 0.1 * step + offset, "grad_norm": 1.0,
                            "lr": 1e-3, "tokens": 32 * step, "tokens_per_s": 1000.0, "train_seconds": 0.1 * step,
                            "train_seconds_total": 0.1 * step, "step_seconds": 0.1,
                            "o_proj_in_rms": [0.8 - 0.01 * step, 0.6] if diff else [0.05, 0.07],
                            "head_norm_gain": [1.0 + 0.01 * step, 1.0] if diff else [None, None]})
        if step % 2 == 0:
            records.append({"kind": "eval", "step": step, "val_loss": 5.2 - 0.15 * step + offset,
                            "val_ppl": 1.0, "lambdas": [0.2, 0.3 + 0.01 * step] if diff else None})
    records.append({"kind": "summary", "step": 4, "tokens_per_s": 1000.0, "median_step_seconds": 0.1,
                    "train_seconds_total": 0.4, "peak_memory_mb": 100.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for task, summary in (evals or {}).items():
        (run_dir / "evals").mkdir(exist_ok=True)
        (run_dir / "evals" / f"{task}.json").write_text(json.dumps({"summary": summary, "curve": [1, 2]}))


def synthetic_sweep(root: Path) -> Path:
    (root).mkdir(parents=True)
    (root / "sweep.json").write_text(json.dumps({"reference": "baseline", "variants": ["baseline", "diff"]}))
    for seed, (ob, od) in zip((1, 2), ((0.0, 0.05), (0.02, 0.04))):
        write_run(root / "baseline" / f"seed_{seed}", "baseline", seed, ob,
                  {"needle": {"accuracy": 0.5 + seed / 10}, HOSTILE: {HOSTILE: 1.0}})
        write_run(root / "diff" / f"seed_{seed}", "diff", seed, od, {"needle": {"accuracy": 0.6 + seed / 10}})
        # A folder name that is hostile as HTML and as matplotlib mathtext.
        write_run(root / "$\\frac{<b>$" / f"seed_{seed}", "diff", seed, od)
    return root


def synthetic_compare(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "compare.json").write_text(json.dumps({"seeds": [1, 2]}))
    for seed in (1, 2):
        write_run(root / f"seed_{seed}" / "baseline", "baseline", seed, 0.0)
        write_run(root / f"seed_{seed}" / "diff", "diff", seed, 0.1 * seed)
    return root


def test_report_tables_markdown_and_escaping(tmp_path, capsys):
    folder = synthetic_sweep(tmp_path / "sweep")
    out = tmp_path / "r" / "report.html"
    assert main(["report", str(folder), str(synthetic_compare(tmp_path / "cmp")), "--out", str(out)]) == 0
    page = out.read_text()
    md = (tmp_path / "r" / "report.md").read_text()
    assert HOSTILE not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert HOSTILE not in md and "&lt;img src=x onerror=alert(1)&gt;" in md
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    assert page.count("data:image/png;base64,") == 6  # per folder: loss bands, λ, instrumentation
    assert "## compare " in md and "| diff | 1, 2 |" in md
    assert "+0.1500 [-0.485, +0.785]" in md  # the compare: 0.1, 0.2; ± 12.706 · 0.0707 / √2
    # diff − baseline per seed: 0.05 and 0.02 at the last eval: mean 0.035, std 0.0212, t(0.975, 1) = 12.706.
    assert "+0.0350 [-0.156, +0.226]" in md
    assert "| needle" not in md and "### Evaluation: needle" in md
    assert "0.6500 ± 0.0707 (n=2)" in md and "0.7500 ± 0.0707 (n=2)" in md  # baseline, diff accuracy
    assert "<b>" not in page and "$\\frac{&lt;b&gt;$" in page


def test_report_many_variants_stay_readable(tmp_path):
    """Past PER_LAYER_MAX_VARIANTS the instrumentation plot draws one line a variant (its mean over layers),
    the λ panels wrap at four a row, and every variant keeps its own colour up to twenty."""
    from diff_transformer.report import PER_LAYER_MAX_VARIANTS, _colour, load_folder, plots

    names = [f"v{i}" for i in range(PER_LAYER_MAX_VARIANTS + 3)]
    root = tmp_path / "many"
    root.mkdir()
    (root / "sweep.json").write_text(json.dumps({"reference": names[0], "variants": names}))
    for i, name in enumerate(names):
        write_run(root / name / "seed_1", "diff" if i % 2 else "baseline", 1, 0.01 * i)
    figs = dict(plots(load_folder(root)))
    assert any("mean over layers" in title for title in figs)
    assert not any("line style = layer" in title for title in figs)
    assert len({_colour(i, 20) for i in range(20)}) == 20 and _colour(3, 5) != _colour(4, 5)
    few = dict(plots(load_folder(synthetic_sweep(tmp_path / "few"))))
    assert any("line style = layer" in title for title in few)


@pytest.mark.parametrize("make,needle", [
    (lambda p: p, "holds neither sweep.json nor compare.json"),
    (lambda p: p / "missing", "is not a folder"),
])
def test_report_bad_folder_is_one_error_line(tmp_path, capsys, make, needle):
    (tmp_path / "x.txt").write_text("not a sweep")
    assert main(["report", str(make(tmp_path)), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
    assert not (tmp_path / "r.html").exists()


def test_report_corrupt_metrics_is_one_error_line(tmp_path, capsys):
    folder = synthetic_sweep(tmp_path / "sweep")
    (folder / "diff" / "seed_1" / "metrics.jsonl").write_text("{nope\n")
    assert main(["report", str(folder), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "seed_1" in err[0]


# The browser ---------------------------------------------------------------------------------------------
def _need(reason: str):
    """Fail in CI (a missing browser must not pass silently), skip with the reason on a developer machine."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)")
    pytest.skip(f"{reason} (set CI=1 to make this a failure)")


def _chromium() -> str:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    _need("no chromium binary found: install it with `apt-get install -y chromium` (or set $CHROMIUM)")


class CDP:
    """A minimal Chrome DevTools Protocol client: commands by id, events kept in order."""

    def __init__(self, ws_url: str):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=20, suppress_origin=True)
        self.next_id, self.events = 0, []

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_event(self, method: str, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events:
                if e.get("method") == method:
                    return e
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(method)


def test_report_renders_in_headless_chromium(tmp_path):
    binary = _chromium()
    try:
        import websocket  # noqa: F401
    except ImportError:
        _need("websocket-client is not installed: pip install 'diff-transformer[test]'")
    folder = synthetic_sweep(tmp_path / "sweep")
    page = tmp_path / "report.html"
    assert main(["report", str(folder), "--out", str(page)]) == 0
    profile = tmp_path / "profile"
    proc = subprocess.Popen([binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--remote-debugging-port=0", "--remote-allow-origins=*", f"--user-data-dir={profile}",
                             "--window-size=1280,2000", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 20
        while not port_file.is_file() or not port_file.read_text().strip():
            assert proc.poll() is None, f"chromium exited with {proc.returncode}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port within 20 s"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        target = next(t for t in targets if t.get("type") == "page")
        cdp = CDP(target["webSocketDebuggerUrl"])
        for domain in ("Page", "Runtime", "Log"):
            cdp.send(f"{domain}.enable")
        cdp.send("Page.navigate", url=page.resolve().as_uri())
        cdp.wait_event("Page.loadEventFired")
        state = cdp.send("Runtime.evaluate", returnByValue=True, expression=(
            "JSON.stringify({title: document.title, h1: document.querySelector('h1').textContent,"
            " tables: document.querySelectorAll('table').length,"
            " imgs: Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])})"))
        info = json.loads(state["result"]["value"])
        shot = cdp.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        png = tmp_path / "report.png"
        png.write_bytes(base64.b64decode(shot["data"]))
        cdp.send("Runtime.evaluate", expression="1")  # drain events queued meanwhile
        errors = [e for e in cdp.events if e.get("method") == "Runtime.exceptionThrown"
                  or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
                  or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
        dialogs = [e for e in cdp.events if e.get("method") == "Page.javascriptDialogOpening"]
        cdp.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert info["title"] == "diff-transformer report" and info["h1"] == "diff-transformer report"
    assert info["tables"] >= 3  # results + two evaluation tasks
    assert len(info["imgs"]) == 3 and all(c and w > 0 and h > 0 for c, w, h in info["imgs"]), info["imgs"]
    assert not errors, errors
    assert not dialogs, dialogs  # the hostile task name did not run as HTML
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
