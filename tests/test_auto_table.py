"""``auto``'s backend table: the shipped table, the choice it drives, the fallback, and building one
from timings as ``benchmarks/attention.py --auto-table`` does (synthetic timings, no GPU)."""

import copy
import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch

from diff_transformer.attention import auto_table
from diff_transformer.attention.auto_table import AUTO_MAX_KEYS, AUTO_MIN_QUERIES, choose

KEY_LENGTHS = [1, 15, 16, 512, 1024, 2047, 2048, 2049, 4096, 4097, 8192, 8193, 16384, 16385, 65536]


def thresholds_choice(variant, mode, n, m):
    """What ``auto`` chose before the table, for every head dim."""
    return "triton" if m <= AUTO_MAX_KEYS[variant, mode] and n >= AUTO_MIN_QUERIES else "sdpa"


def table(*entries, meta=None):
    """A table document from (variant, mode, head_dim, [(max_keys, backend), ...]) tuples."""
    return {"format": 1, "meta": meta or {}, "entries": [
        {"variant": v, "mode": m, "head_dim": d, "ranges": [{"max_keys": k, "backend": b} for k, b in rs]}
        for v, m, d, rs in entries]}


def everywhere(backend, head_dim=128):
    """One backend at every key length for every variant and mode."""
    return [(v, m, head_dim, [(None, backend)]) for v, m in AUTO_MAX_KEYS]


def write(path, doc):
    path.write_text(json.dumps(doc))
    return path


# The shipped table -------------------------------------------------------------------------------
def test_shipped_table_loads_with_its_metadata():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning here means the shipped table fell back
        t = auto_table.load()
    assert t.fallback_reason is None and auto_table.TABLE.fallback_reason is None
    meta = t.document["meta"]
    assert {"gpu", "torch", "triton", "date", "command"} <= set(meta)
    assert meta["gpu"] == "NVIDIA H200"
    for key in AUTO_MAX_KEYS:
        assert list(t.ranges[key]) == [128, 64]
    # Built by `attention.py --auto-table --write-table` on an H200: every entry measured from 512 to 16K keys.
    assert all(e["measured_n"] == [512, 1024, 2048, 4096, 8192, 16384] for e in t.document["entries"])


@pytest.mark.parametrize("which", ["shipped", "fallback"])
def test_table_keeps_the_thresholds_at_every_shape(which):
    """The fallback is the thresholds auto used before the table. At head dim 128 the H200 measurement
    of the shipped table found the same winners at every N (2026-11-30)."""
    t = auto_table.TABLE if which == "shipped" else auto_table.parse(auto_table.thresholds_document())
    for (variant, mode) in AUTO_MAX_KEYS:
        for d in (128,) if which == "shipped" else (16, 32, 64, 128):
            for m in KEY_LENGTHS:
                for n in {1, 15, 16, min(m, 512), m}:
                    assert choose(variant, mode, d, n, m, t) == thresholds_choice(variant, mode, n, m), \
                        (variant, mode, d, n, m)


def test_shipped_table_at_head_dim_64():
    """What the H200 measured at d = 64 (benchmarks/results/auto-table-h200-build.json): the V1 kernel wins
    training up to 16K keys; V2's training only up to 2K, where d = 128 keeps it to 4K."""
    t = auto_table.TABLE
    assert choose("v1", "train", 64, 4096, 16384, t) == "triton"
    assert choose("v1", "train", 64, 4096, 16385, t) == "sdpa"
    assert choose("v2", "train", 64, 2048, 2048, t) == "triton"
    assert choose("v2", "train", 64, 4096, 4096, t) == "sdpa"
    assert choose("v2", "train", 128, 4096, 4096, t) == "triton"


# The choice follows the table --------------------------------------------------------------------
def test_choice_follows_the_ranges_and_the_nearest_head_dim():
    t = auto_table.parse(table(
        *[(v, m, 64, [(1024, "triton"), (4096, "sdpa"), (None, "triton")]) for v, m in AUTO_MAX_KEYS],
        *everywhere("sdpa", head_dim=128)))
    for m, want in ((1, "triton"), (16, "triton"), (1024, "triton"), (1025, "sdpa"), (4096, "sdpa"),
                    (4097, "triton"), (10**6, "triton")):
        assert choose("v1", "train", 64, 16, m, t) == want, m
    assert choose("v2", "infer", 32, 64, 100, t) == "triton"  # nearest: 64
    assert choose("v2", "infer", 16, 64, 2000, t) == "sdpa"
    assert choose("v1", "train", 128, 64, 100, t) == "sdpa"
    assert choose("v1", "train", 256, 64, 100, t) == "sdpa"  # nearest: 128
    assert choose("v1", "train", 96, 64, 100, t) == "sdpa"  # 128/96 < 96/64
    # Equally far from 64 and 256 (ratio 2): the larger wins.
    t2 = auto_table.parse(table(*everywhere("triton", head_dim=64), *everywhere("sdpa", head_dim=256)))
    assert choose("v1", "infer", 128, 64, 100, t2) == "sdpa"
    # Decoding (fewer than AUTO_MIN_QUERIES queries) takes SDPA whatever the table says.
    assert choose("v1", "train", 64, AUTO_MIN_QUERIES - 1, 100, t) == "sdpa"
    assert choose("v1", "train", 64, AUTO_MIN_QUERIES, 100, t) == "triton"
    with pytest.raises(ValueError, match="variant"):
        choose("v3", "train", 64, 16, 100, t)


def test_choice_reads_variant_and_mode_from_the_inputs(monkeypatch):
    """``choose_for`` (what the kernel's ``supports`` asks): V1 when dv = 2d, training when a backward
    follows; the module's table by default."""
    monkeypatch.setattr(auto_table, "TABLE", auto_table.parse(table(
        ("v1", "train", 64, [(None, "triton")]), ("v1", "infer", 64, [(None, "sdpa")]),
        ("v2", "train", 64, [(None, "sdpa")]), ("v2", "infer", 64, [(None, "triton")]))))
    q, k = torch.randn(1, 2, 32, 64, requires_grad=True), torch.randn(1, 2, 32, 64)
    v1, v2 = torch.randn(1, 2, 32, 128), torch.randn(1, 2, 32, 64)
    assert auto_table.choose_for(q, k, k, v1) == "triton"
    assert auto_table.choose_for(q, k, k, v2) == "sdpa"
    with torch.no_grad():
        assert auto_table.choose_for(q, k, k, v1) == "sdpa"
        assert auto_table.choose_for(q, k, k, v2) == "triton"
    assert auto_table.choose_for(q.detach(), k, k, v2) == "triton"  # no input needs a gradient: inference


# A broken table falls back -----------------------------------------------------------------------
def _broken_documents():
    good = table(*everywhere("triton"))
    cases = {"not a table": [1, 2], "format 2": {**good, "format": 2}, "no meta": {"format": 1, "entries": []},
             "entries not a list": {**good, "entries": {"v1": 1}},
             "an entry not an object": {**good, "entries": ["v1"]},
             "a key missing": {**good, "entries": good["entries"][:3]}}
    for name, edit in {
        "unknown variant": lambda e: e.update(variant="v3"),
        "unknown mode": lambda e: e.update(mode=["train"]),
        "head_dim true": lambda e: e.update(head_dim=True),
        "head_dim 0": lambda e: e.update(head_dim=0),
        "head_dim text": lambda e: e.update(head_dim="128"),
        "no ranges": lambda e: e.update(ranges=[]),
        "ranges not a list": lambda e: e.update(ranges={"max_keys": None, "backend": "sdpa"}),
        "a range not an object": lambda e: e.update(ranges=[None]),
        "unknown backend": lambda e: e["ranges"][0].update(backend="flash"),
        "last range limited": lambda e: e.update(ranges=[{"max_keys": 4096, "backend": "sdpa"}]),
        "limit not increasing": lambda e: e.update(ranges=[{"max_keys": 4096, "backend": "triton"},
                                                            {"max_keys": 4096, "backend": "sdpa"},
                                                            {"max_keys": None, "backend": "triton"}]),
        "limit a float": lambda e: e.update(ranges=[{"max_keys": 2048.5, "backend": "triton"},
                                                     {"max_keys": None, "backend": "sdpa"}]),
        "null limit not last": lambda e: e.update(ranges=[{"max_keys": None, "backend": "triton"},
                                                           {"max_keys": None, "backend": "sdpa"}]),
    }.items():
        doc = copy.deepcopy(good)
        edit(doc["entries"][0])
        cases[name] = doc
    cases["a duplicate entry"] = {**good, "entries": good["entries"] + good["entries"][:1]}
    return cases


BROKEN = _broken_documents()


@pytest.mark.parametrize("name", list(BROKEN))
def test_malformed_table_falls_back_to_the_thresholds(tmp_path, name):
    with pytest.raises(ValueError):
        auto_table.parse(BROKEN[name])
    with pytest.warns(UserWarning, match="falls back"):
        t = auto_table.load(write(tmp_path / "t.json", BROKEN[name]))
    assert t.fallback_reason
    assert choose("v1", "infer", 64, 512, 2048, t) == "triton" and choose("v1", "infer", 64, 512, 2049, t) == "sdpa"


@pytest.mark.parametrize("content", [None, b"", b"{not json", b"\xff\xfe\x00", b"[" * 100000])
def test_missing_or_unreadable_table_falls_back(tmp_path, content):
    path = tmp_path / "t.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.warns(UserWarning, match="falls back"):
        t = auto_table.load(path)
    assert t.fallback_reason and t.ranges == auto_table.parse(auto_table.thresholds_document()).ranges


# Building a table from timings, and the benchmark's check ------------------------------------------
def rows_from(winners, head_dim=128, ns=(512, 1024, 2048, 4096, 8192, 16384)):
    """Synthetic benchmark rows: at each N the winner takes 1.0 ms and the other backend 1.2 ms."""
    rows = []
    for (variant, mode), pick in winners.items():
        for n in ns:
            fast = pick(n)
            ms = {"triton": 1.0 if fast == "triton" else 1.2, "sdpa": 1.0 if fast == "sdpa" else 1.2}
            rows.append({"variant": variant, "mode": mode, "head_dim": head_dim, "N": n, "ms": ms})
    return rows


def test_build_table_makes_contiguous_ranges(tmp_path):
    rows = rows_from({
        ("v1", "train"): lambda n: "triton" if n <= 8192 else "sdpa",
        ("v1", "infer"): lambda n: "triton" if 1024 <= n <= 2048 else "sdpa",
        ("v2", "train"): lambda n: "triton",
        ("v2", "infer"): lambda n: "sdpa",
    }, head_dim=64)
    rows[0]["ms"]["triton"] = None  # v1 train at 512: the kernel failed, so SDPA wins there
    doc = auto_table.build_table(rows, {"gpu": "test"})
    ranges = {(e["variant"], e["mode"]): [(r["max_keys"], r["backend"]) for r in e["ranges"]] for e in doc["entries"]}
    assert ranges == {
        ("v1", "train"): [(512, "sdpa"), (8192, "triton"), (None, "sdpa")],
        ("v1", "infer"): [(512, "sdpa"), (2048, "triton"), (None, "sdpa")],
        ("v2", "train"): [(16384, "triton"), (None, "sdpa")],  # past the longest N measured: SDPA
        ("v2", "infer"): [(None, "sdpa")],
    }
    assert all(e["head_dim"] == 64 and e["measured_n"] == [512, 1024, 2048, 4096, 8192, 16384]
               for e in doc["entries"])
    # Written and read back, the table picks the winner at every measured shape.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = auto_table.load(write(tmp_path / "t.json", doc))
    for r in rows:
        assert choose(r["variant"], r["mode"], 64, r["N"], r["N"], t) == auto_table.check_auto({**r["ms"]})["best"]


def test_build_table_from_the_thresholds_reproduces_the_seed():
    """Timings where the kernel wins exactly up to AUTO_MAX_KEYS (at the N issue 6 measured) build the
    shipped d=128 entries."""
    rows = rows_from({key: (lambda n, key=key: "triton" if n <= AUTO_MAX_KEYS[key] else "sdpa")
                      for key in AUTO_MAX_KEYS}, ns=(2048, 4096, 8192, 16384))
    built = auto_table.parse(auto_table.build_table(rows, {}))
    for key in AUTO_MAX_KEYS:
        assert built.ranges[key][128] == auto_table.TABLE.ranges[key][128]


def test_build_table_refuses_timings_missing_a_variant():
    rows = rows_from({("v1", "train"): lambda n: "triton"})
    with pytest.raises(ValueError, match="no entry"):
        auto_table.build_table(rows, {})


def test_auto_check_flags_more_than_three_percent():
    ok = auto_table.check_auto({"triton": 10.0, "sdpa": 12.0, "auto": 10.29})
    assert ok == {"best": "triton", "best_ms": 10.0, "auto_ratio": pytest.approx(1.029), "auto_ok": True}
    slow = auto_table.check_auto({"triton": 10.0, "sdpa": 12.0, "auto": 10.31})
    assert slow["best"] == "triton" and slow["auto_ratio"] == pytest.approx(1.031) and not slow["auto_ok"]
    assert not auto_table.check_auto({"triton": 10.0, "sdpa": 12.0, "auto": 12.0})["auto_ok"]  # took the loser
    assert auto_table.check_auto({"triton": 10.0, "sdpa": 9.0, "auto": 8.9})["auto_ok"]  # faster than both: noise
    failed = auto_table.check_auto({"triton": None, "sdpa": 9.0, "auto": None})
    assert failed["best"] == "sdpa" and failed["auto_ratio"] is None and not failed["auto_ok"]
    assert auto_table.check_auto({"triton": None, "sdpa": 9.0, "auto": 9.1})["auto_ok"]


def test_benchmark_writes_a_table_that_auto_reads(tmp_path, monkeypatch):
    """``benchmarks/attention.py --auto-table --write-table`` end to end, with synthetic timings in place
    of the GPU: the kernel is faster up to N = 2048, and auto takes 1.05x the faster once (d=64, V2
    inference at N = 512)."""
    pytest.importorskip("triton")
    path = Path(__file__).parents[1] / "benchmarks" / "attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def inputs(variant, d, n, tokens):
        q = torch.empty(1, 1, n, d, requires_grad=True)
        return tokens // n, (q, q, q, q, torch.empty(1, 1, n, 2 * d if variant == "v1" else d), torch.tensor(0.5))

    def time_op(backend, inputs, mode):
        n, d = inputs[0].shape[-2:]
        slow_auto = d == 64 and n == 512 and inputs[4].shape[-1] == d and mode == "infer"
        return {"triton": 1.0 if n <= 2048 else 1.2, "sdpa": 1.1, "auto": 1.05 if slow_auto else 1.0}[backend]

    monkeypatch.setattr(bench, "auto_inputs", inputs)
    monkeypatch.setattr(bench, "time_op", time_op)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Test GPU")
    with pytest.raises(SystemExit):
        bench.main(["--write-table", str(tmp_path / "t.json")])
    argv = ["--auto-table", "--write-table", str(tmp_path / "t.json"), "--out", str(tmp_path / "r.json")]
    assert bench.main(argv) == 0

    res = json.loads((tmp_path / "r.json").read_text())
    assert len(res["shapes"]) == 2 * 2 * 2 * 6 and res["gpu"] == "Test GPU"
    assert [r for r in res["shapes"] if not r["auto_ok"]] == [
        r for r in res["shapes"] if (r["head_dim"], r["variant"], r["mode"], r["N"]) == (64, "v2", "infer", 512)]
    assert not res["auto_ok_all"] and res["worst_auto_ratio"] == pytest.approx(1.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = auto_table.load(tmp_path / "t.json")
    assert t.document["meta"]["command"].startswith("python benchmarks/attention.py --auto-table")
    assert {key: dict(by_dim) for key, by_dim in t.ranges.items()} == {
        key: {128: ((2048, "triton"), (None, "sdpa")), 64: ((2048, "triton"), (None, "sdpa"))}
        for key in AUTO_MAX_KEYS}
