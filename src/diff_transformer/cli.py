"""``diff-transformer``: argument parsing only; the work happens in train/, api.py and the model.

Exit codes: 0 done; 2 bad input (one line ``error: ...`` naming the problem and the fix, and
nothing on disk overwritten); 3 training diverged (non-finite steps, no rollback left); 75 preempted
(SIGTERM: the step was finished and a checkpoint saved; run the same command again to resume; for
``eval --task`` and ``eval-compare``, the finished tasks were written); 130 interrupted with Ctrl-C
(during training: after the same save as SIGTERM).
"""


from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from .errors import UserError

EXIT_INTERRUPTED = 130

DESCRIPTION = ("The Differential Transformer and its matched baseline: train, compare, evaluate, sample, and "
               "export to / import from Hugging Face transformers.")
EPILOG = ("Exit codes: 0 done, 2 bad input (one 'error:' line, nothing changed), 3 training diverged, "
          "75 stopped by SIGTERM (rerun to resume), 130 Ctrl-C. See COMMAND --help.")


def _add_config_args(p: argparse.ArgumentParser, preset_help: str) -> argparse._MutuallyExclusiveGroup:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help=preset_help)
    src.add_argument("--config", type=Path, help="a run config JSON file (as written to RUN_DIR/run.json)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a field: model.X, train.X, data.X or an unambiguous bare name "
                        "(e.g. --set lr=1e-3 model.n_layers=2 data.source=corpus.txt)")
    p.add_argument("--data-cache", type=Path, default=None,
                   help="token shard cache (default $DIFF_TRANSFORMER_CACHE or ~/.cache/diff-transformer)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return src


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default=None, metavar="NAME[,NAME...]",
                   help="evaluation tasks, comma-separated, or 'all' (writes evals/<task>.json and .png)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a task option (repeatable), e.g. --opt context=512 --opt data=texts/")
    p.add_argument("--data-cache", type=Path, default=None, help="token shard cache (as for train)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice of the tasks")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diff-transformer", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train one model into a run directory (resumes a stopped run)")
    source = _add_config_args(p, "model preset (tiny, small, base, paper-*); with train/data defaults")
    source.add_argument("--init-from", type=Path, metavar="MODEL_DIR",
                        help="fine-tune: start from a model folder's weights, config and tokenizer "
                             "(e.g. from `diff-transformer import`); set the data with --set data.source=...")
    p.add_argument("--out", type=Path, required=True, help="run directory (new, empty, or this same run to resume)")
    p.add_argument("--resume", nargs="?", const="require", default="auto", metavar="PATH",
                   help="resume: without PATH the run in --out (it must have a checkpoint); with PATH that "
                        "checkpoint or run directory (checkpoints of --out after its step are replaced). Without "
                        "--resume a run in --out with the same config resumes too")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="train the matched DIFF model and baseline over several seeds")
    _add_config_args(p, "model preset (default tiny: the embedded default, about 10 minutes on 2 CPU cores)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 1 2 3)")
    p.add_argument("--variants", default=None, metavar="A,B",
                   help="compare two named variants (diff_transformer.variants), A minus B (default: the matched pair)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/compare-<preset>)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, splitting the CPU cores (default 1; 2 on a 2-core CPU trains about "
                        "1.4-3.9x faster, but DIFF's losses then differ from --jobs 1 by up to ~0.03: fp32 rounding)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sweep", help="train named variants over seeds (and lrs); paired comparison to a reference")
    _add_config_args(p, "model preset (default tiny, with compare's CPU-sized training budget)")
    p.add_argument("--variants", required=True,
                   help="comma-separated variant names (diff_transformer.variants), e.g. baseline,diff,diff-no-norm")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds (default 1 2 3)")
    p.add_argument("--lrs", type=float, nargs="+", default=None, help="peak learning rates to sweep (default: the config's)")
    p.add_argument("--reference", default=None,
                   help="variant every other is compared with, paired by seed (default baseline if swept, else the first)")
    p.add_argument("--jobs", type=int, default=None,
                   help="training processes at once (default: one per --gpus entry, else 1); several may share a GPU")
    p.add_argument("--gpus", default=None,
                   help="comma-separated GPU ids; process slot i gets CUDA_VISIBLE_DEVICES=gpus[i %% len(gpus)]")
    p.add_argument("--out", type=Path, required=True, help="sweep folder (new, empty, or this same sweep to resume)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="one self-contained HTML page (and report.md) from sweep or compare folders")
    p.add_argument("dirs", type=Path, nargs="+", metavar="DIR", help="sweep or compare output folders")
    p.add_argument("--out", type=Path, default=Path("report.html"), help="HTML file to write (report.md goes beside it)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("eval", help="validation loss of a run's newest checkpoint, or evaluation tasks (--task)")
    p.add_argument("run_dir", type=Path, help="run directory, one of its checkpoints/step_* folders, or (with --task) a model folder")
    p.add_argument("--batches", type=int, default=None, help="validation batches (default: the run's eval_batches)")
    _add_eval_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("eval-compare", help="evaluation tasks on several models side by side (groups of seeds too)")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run/checkpoint/model folders; join several seeds of one model with commas (A1,A2 B1,B2)")
    p.add_argument("--label", nargs="+", default=None, help="one name per RUN group (default: the attention kind)")
    p.add_argument("--out", type=Path, required=True, help="folder for evals.md, evals.json and the plots")
    p.add_argument("--reuse", action="store_true",
                   help="read a task's result a run already holds in its evals/ (e.g. evaluated on another "
                        "machine) instead of running it again; runs holding every task need no checkpoint")
    _add_eval_args(p)
    p.set_defaults(func=cmd_eval_compare)

    p = sub.add_parser("generate", help="sample text from a trained model, streaming tokens to stdout")
    p.add_argument("run_dir", type=Path, help="run directory, checkpoint folder or model folder")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100,
                   help="tokens to generate at most (stops earlier at end-of-text; default 100)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature >= 0; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the K most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling: the smallest set of tokens with probability >= P, P in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--compile", action="store_true",
                   help="decode with the compiled static-cache step (CUDA graphs on cuda); the first run compiles")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="write a trained model as a Hugging Face transformers folder")
    p.add_argument("run_dir", type=Path, help="run directory, checkpoint folder or model folder")
    p.add_argument("--format", choices=["hf"], default="hf",
                   help="hf: DiffLlamaForCausalLM (DIFF V1) or LlamaForCausalLM (baseline), exact")
    p.add_argument("--out", type=Path, required=True, help="new folder (must not exist, or be empty)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="read a transformers DiffLlama or Llama folder into a model folder")
    p.add_argument("src", type=Path, help="transformers folder (config.json + safetensors weights)")
    p.add_argument("--out", type=Path, required=True,
                   help="new model folder (must not exist, or be empty): use it with generate, "
                        "diff_transformer.load or DiffTransformerLM.from_pretrained")
    p.set_defaults(func=cmd_import)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diff-transformer")
    except PackageNotFoundError:
        return "(not installed)"


# Commands ----------------------------------------------------------------------------------------
def _check_device(device: str) -> None:
    """--device names a device this machine has (one line instead of torch's traceback)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r} is not a device: use cpu or cuda[:N]") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"--device {device}: this machine has no such CUDA device (torch.cuda.is_available() is "
                        f"{torch.cuda.is_available()}); use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: use cpu or cuda[:N]")


def _run_config(args, from_preset):
    """The RunConfig named by --config or --preset (None if neither), before --set."""
    from .train.config import RunConfig

    if args.config is not None:
        return RunConfig.from_json(args.config)
    if args.preset is not None:
        return from_preset(args.preset)
    return None


def _train_defaults(name: str):
    from .config import preset
    from .data import DataConfig
    from .train.config import RunConfig, TrainConfig

    return RunConfig(model=preset(name), train=TrainConfig(), data=DataConfig(), preset=name)


def _fine_tune_defaults(folder: Path):
    """A run that starts from ``folder``'s model: its config, its weights (train.init_from), its tokenizer."""
    from .data import DataConfig
    from .serialization import load_config
    from .train.config import RunConfig, TrainConfig

    try:
        model = load_config(folder)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"--init-from {folder}: {e}") from None
    return RunConfig(model=model, train=TrainConfig(init_from=str(folder)),
                     data=DataConfig(tokenizer=f"saved:{folder}"), preset=None)


def cmd_train(args) -> int:
    from .train import rundir
    from .train.config import apply_overrides
    from .train.trainer import run_training

    run = _fine_tune_defaults(args.init_from) if args.init_from is not None else _run_config(args, _train_defaults)
    if run is None:
        run = rundir.read_run_config(args.out) if args.out.is_dir() else None
        if run is None:
            raise UserError("train needs --preset NAME or --config FILE (or an --out folder holding a run to resume)")
    run = apply_overrides(run, args.overrides)
    result = run_training(run, args.out, resume=args.resume, data_cache=args.data_cache,
                          progress=not args.no_progress)
    if os.environ.get("RANK", "0") != "0":
        return 0
    if result.status == "already_complete":
        print(f"{args.out} is already complete at step {result.step}; nothing to do")
    else:
        print(f"done: {result.step} steps, val loss {result.final_val_loss:.4f}, "
              f"{result.tokens_per_s:,.0f} tokens/s; run in {args.out}")
    return 0


def cmd_compare(args) -> int:
    from .train.compare import DEFAULT_SEEDS, compare, default_run
    from .train.config import apply_overrides

    run = apply_overrides(_run_config(args, default_run) or default_run("tiny"), args.overrides)
    out = args.out or Path("runs") / f"compare-{run.preset or 'custom'}"
    variants = args.variants.split(",") if args.variants else None
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: give a positive number of concurrent runs")
    compare(run, out, seeds=args.seeds or DEFAULT_SEEDS, variants=variants, data_cache=args.data_cache,
            progress=not args.no_progress, n_parallel=args.jobs)
    return 0


def cmd_sweep(args) -> int:
    from .train.compare import default_run
    from .train.config import apply_overrides
    from .train.sweep import SweepStopped, sweep

    run = apply_overrides(_run_config(args, default_run) or default_run("tiny"), args.overrides)
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
    jobs = len(gpus or [0]) if args.jobs is None else args.jobs
    try:
        _, failures = sweep(run, args.out, variants=args.variants.split(","), seeds=args.seeds, lrs=args.lrs,
                            reference=args.reference, jobs=jobs, gpus=gpus, data_cache=args.data_cache)
    except SweepStopped as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    return 1 if failures else 0


def cmd_report(args) -> int:
    from .report import write_report

    html, md = write_report(args.dirs, args.out)
    print(f"wrote {html} and {md}")
    return 0


def cmd_eval(args) -> int:
    from .train.evaluate import evaluate_run

    _check_device(args.device)
    if args.task is not None or args.opt:
        from .evals.runner import evaluate_path, parse_options

        options = parse_options(args.opt)
        if args.batches is not None:
            options.setdefault("batches", str(args.batches))
        with _warnings_to_stderr():
            evaluate_path(args.run_dir, args.task or "perplexity", device=args.device, data_cache=args.data_cache,
                          options=options, seed=args.seed, progress=not args.no_progress, echo=print)
        return 0
    res = evaluate_run(args.run_dir, max_batches=args.batches, data_cache=args.data_cache, device=args.device)
    print(f"{res['checkpoint']}: step {res['step']}, val loss {res['val_loss']:.4f}, "
          f"perplexity {res['val_ppl']:.2f} ({res['tokens']:,} tokens)")
    return 0


def cmd_eval_compare(args) -> int:
    from .evals.runner import evaluate_runs, parse_options

    if args.task is None:
        raise UserError("eval-compare needs --task NAME[,NAME...] or --task all")
    options = parse_options(args.opt)
    groups_paths = [[Path(p) for p in g.split(",") if p] for g in args.runs]
    if args.label is not None and len(args.label) != len(groups_paths):
        raise UserError(f"--label gives {len(args.label)} names for {len(groups_paths)} RUN groups: give one per group")
    labels = args.label or _default_labels(groups_paths)
    if len(set(labels)) != len(labels):
        raise UserError(f"two groups share the label {labels}: name them with --label")
    with _warnings_to_stderr():
        evaluate_runs(dict(zip(labels, groups_paths)), args.task, out=args.out, device=args.device,
                      data_cache=args.data_cache, options=options, seed=args.seed, progress=not args.no_progress,
                      reuse=args.reuse)
    print(f"wrote {args.out / 'evals.md'}, {args.out / 'evals.json'} and the plots")
    return 0


def _default_labels(groups: list[list[Path]]) -> list[str]:
    """The attention kind of each group's first model when they differ, else the folder names."""
    from .api import resolve_model_dir
    from .serialization import load_config

    kinds = []
    for g in groups:
        if not g:
            raise UserError("an empty RUN group (two commas in a row?)")
        try:
            kinds.append(load_config(resolve_model_dir(g[0])).attention)
        except (FileNotFoundError, ValueError):
            kinds.append(None)
    if None not in kinds and len(set(kinds)) == len(kinds):
        return [{"diff": "DIFF", "diff_v2": "DIFF V2", "baseline": "baseline"}.get(k, k) for k in kinds]
    return [g[0].name for g in groups]


def _warnings_to_stderr():
    """Warnings (e.g. no matplotlib, so no PNG) as one ``warning: ...`` line each."""
    import contextlib
    import warnings

    @contextlib.contextmanager
    def scope():
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            previous = warnings.showwarning
            warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)
            try:
                yield
            finally:
                warnings.showwarning = previous

    return scope()


def cmd_generate(args) -> int:
    import torch

    from .api import load

    if not args.prompt:
        raise UserError("--prompt is empty: give some text to continue")
    if args.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature must be a number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k <= 0:
        raise UserError(f"--top-k must be a positive number of tokens, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must lie in (0, 1], got {args.top_p}")
    if not 0 <= args.seed < 2**63:
        raise UserError(f"--seed must lie in [0, 2**63), got {args.seed}")
    _check_device(args.device)
    model, tokenizer = load(args.run_dir, device=args.device)
    limit = model.config.max_seq_len
    if args.max_new_tokens >= limit:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be below the model's max_seq_len {limit}")
    ids = tokenizer.encode(args.prompt)[-(limit - args.max_new_tokens):]  # keep the prompt's end when too long
    prompt = torch.tensor([ids], dtype=torch.long, device=args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    new: list[int] = []
    shown = ""
    for token in model.stream(prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, eos_token_id=tokenizer.eos_id, generator=gen, compile=args.compile):
        tid = int(token[0])
        if tid == tokenizer.eos_id:
            break
        new.append(tid)
        text = tokenizer.decode(new)  # decode the whole tail: a token may complete a multi-byte character
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write(tokenizer.decode(new)[len(shown):] + "\n")
    return 0


def cmd_export(args) -> int:
    from .api import load_model_dir, resolve_model_dir, tokenizer_dir
    from .hf import export_hf

    model_dir = resolve_model_dir(args.run_dir)  # verifies a checkpoint's hashes once
    model, _ = load_model_dir(model_dir)
    result = export_hf(model, tokenizer_dir(model_dir), args.out)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"exported {result.architecture} to {result.out_dir} ({', '.join(result.files)})")
    return 0


def cmd_import(args) -> int:
    from .data.tokenizer import BPETokenizer
    from .fileio import require_new_folder, staged_folder
    from .hf import import_hf

    out = args.out
    require_new_folder(out)
    model, tokenizer_json = import_hf(args.src)
    tokenizer, note = None, f"{args.src} has no tokenizer.json; {out} holds the model only"
    if tokenizer_json is not None:
        import tokenizers

        try:
            tokenizer, note = BPETokenizer(tokenizers.Tokenizer.from_file(str(tokenizer_json))), None
        except Exception as e:  # UserError, or tokenizers' bare Exception for a malformed file
            note = f"the tokenizer was not imported ({str(e)[:200]}); {out} holds the model only"
    with staged_folder(out) as tmp:  # renamed into place when whole
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
    if note:
        print(f"note: {note}", file=sys.stderr)
    print(f"imported {model.config.attention} model ({model.num_parameters():,} parameters) to {out}")
    return 0


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import warnings

    warnings.formatwarning = _format_warning  # one "warning: ..." line, not a source location
    from .evals.runner import EvalStopped
    from .train.trainer import Preempted, TrainingDiverged

    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except (Preempted, EvalStopped) as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
