"""`diff-transformer export` and `import`: a trained run to transformers and back, from the command line."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from diff_transformer import load  # noqa: E402
from diff_transformer.cli import main  # noqa: E402

SETTINGS = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "data.vocab_size=300", "batch_size=4",
            "seq_len=32", "steps=3", "eval_every=3", "eval_batches=1", "ckpt_every=3", "warmup_steps=1"]


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", params=["diff", "baseline"])
def run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"hfcli-{request.param}")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(6):  # a few documents of varied text for a small BPE
        (corpus / f"d{i}.txt").write_text(" ".join(f"word{(i * 7 + j) % 53} and more text {j}" for j in range(400)))
    out = root / "run"
    args = ["train", "--preset", "tiny", "--no-progress", "--data-cache", str(root / "cache"), "--set", *SETTINGS,
            f"data.source={corpus}", f"model.attention={request.param}", "--out", str(out)]
    assert main(args) == 0
    return root, out, request.param


def test_export_loads_in_transformers_with_same_logits_and_tokens(run, capsys):
    root, out, attention = run
    export = root / "hf"
    assert main(["export", str(out), "--format", "hf", "--out", str(export)]) == 0
    arch = "DiffLlamaForCausalLM" if attention == "diff" else "LlamaForCausalLM"
    assert arch in capsys.readouterr().out
    ours, tok = load(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(export)
    text = "word3 and more text 12 word40"
    ids = tok.encode(text)
    assert hf_tok(text)["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= 1e-4


def test_import_gives_a_model_folder_that_generates_the_same(run, capsys):
    root, out, _ = run
    export, imported = root / "hf2", root / "imported"
    assert main(["export", str(out), "--out", str(export)]) == 0
    assert main(["import", str(export), "--out", str(imported)]) == 0
    ours, tok = load(out)
    back, back_tok = load(imported)
    x = torch.tensor([tok.encode("word5 and more")])
    with torch.no_grad():
        assert (back(x) - ours(x)).abs().max().item() <= 1e-5
    assert back_tok.encode("word5 and more") == tok.encode("word5 and more")
    capsys.readouterr()
    assert main(["generate", str(imported), "--prompt", "word5 and", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    from_import = capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "word5 and", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == from_import


@pytest.mark.parametrize("command", ["export", "import"])
def test_existing_out_folder_is_refused_untouched(run, command, capsys):
    root, out, _ = run
    target = root / f"taken-{command}"
    target.mkdir(exist_ok=True)
    (target / "keep.txt").write_text("mine")
    before = tree_hash(root)
    src = out if command == "export" else root / "hf"
    if command == "import" and not src.exists():
        assert main(["export", str(out), "--out", str(src)]) == 0
        before = tree_hash(root)
    assert main([command, str(src), "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "choose a new --out folder" in err[0]
    assert tree_hash(root) == before


def test_export_refuses_what_transformers_cannot_represent(tmp_path, capsys):
    from diff_transformer import DiffTransformerLM, ModelConfig
    from diff_transformer.data.tokenizer import ByteTokenizer

    folder = tmp_path / "v2"
    cfg = ModelConfig(vocab_size=ByteTokenizer().vocab_size, dim=32, n_layers=1, n_heads=2, attention="diff_v2")
    DiffTransformerLM(cfg).save_pretrained(folder)
    ByteTokenizer().save(folder)
    assert main(["export", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert "V2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


FINE_TUNE = ["batch_size=4", "seq_len=32", "steps=2", "eval_every=2", "eval_batches=1", "ckpt_every=2", "warmup_steps=1"]


def test_fine_tune_an_imported_model(run, capsys):
    """`train --init-from` starts from the imported weights: its step-0 validation loss is the source run's
    final one (same tokenizer, same held-out documents, same evaluation batches)."""
    from diff_transformer.train import rundir

    root, out, _ = run
    export, imported, tuned = root / "hf3", root / "imported3", root / "tuned"
    assert main(["export", str(out), "--out", str(export)]) == 0
    assert main(["import", str(export), "--out", str(imported)]) == 0
    args = ["train", "--init-from", str(imported), "--no-progress", "--data-cache", str(root / "cache"),
            "--set", f"data.source={root / 'corpus'}", *FINE_TUNE, "--out", str(tuned)]
    assert main(args) == 0
    source_final = [m for m in rundir.read_metrics(out) if m["kind"] == "eval"][-1]
    tuned_evals = [m for m in rundir.read_metrics(tuned) if m["kind"] == "eval"]
    assert tuned_evals[0]["step"] == 0 and source_final["step"] == 3
    assert abs(tuned_evals[0]["val_loss"] - source_final["val_loss"]) < 1e-4
    assert tuned_evals[-1]["step"] == 2
    before = tree_hash(root)
    capsys.readouterr()
    assert main([*args[:-2], "--set", "model.n_layers=1", "--out", str(root / "tuned-bad")]) == 2
    assert "another config" in capsys.readouterr().err and tree_hash(root) == before
