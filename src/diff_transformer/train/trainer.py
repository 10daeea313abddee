"""The training loop, and ``run_training``: data + run directory + trainer for one run.

The trainer wires objects built elsewhere (model, optimizer, data batches, checkpoints,
parallelism) and keeps the step as its state. The step is also the data position: batch ``s`` is a
pure function of (seed, s), so resuming needs no data-loader state.

Exit codes (``cli.py`` returns them): 0 done, 2 bad input (:class:`UserError`), 3 training
diverged (:class:`TrainingDiverged`), 75 preempted (:class:`Preempted`: SIGTERM arrived, the step
was finished and a checkpoint saved; run the same command again to resume).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..data import Batches, build_mix, prepare_dataset
from ..errors import UserError
from ..config import validate_size
from ..model import DiffTransformerLM
from ..serialization import WEIGHTS_NAME, load_config, load_state
from . import checkpoint as ckpt
from . import profiling, rundir
from .config import RunConfig
from .evaluate import validation_loss
from .optim import build_optimizer, lr_at, set_lr
from .parallelize import (DistInfo, all_reduce, barrier, choose, destroy_distributed, gradient_sync, init_distributed,
                          parallelize, reshard_all)

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT); the step is finished and saved as for SIGTERM
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; the run saved a checkpoint and resumes when rerun


class Preempted(Exception):
    """SIGTERM arrived: the current step was finished and a checkpoint saved."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, step: int, path: Path, signame: str = "SIGTERM"):
        super().__init__(f"stopped by {signame} after step {step}; checkpoint {path} saved: rerun the same command to resume")
        self.step, self.path = step, path
        if signame == "SIGINT":
            self.exit_code = EXIT_INTERRUPTED  # Ctrl-C: the shell's code for it, after the same save as SIGTERM


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps and no rollback left."""

    exit_code = EXIT_DIVERGED


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def default_cache_dir() -> Path:
    return Path(os.environ.get("DIFF_TRANSFORMER_CACHE") or Path.home() / ".cache" / "diff-transformer")


# Peak memory ------------------------------------------------------------------------------------
def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # Linux: "5" resets the process's peak RSS (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or on the CPU the process's peak resident memory, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_initial_weights(model: DiffTransformerLM, folder) -> None:
    """Start ``model`` from the weights of a model folder (e.g. an imported transformers model)."""
    folder = Path(folder)
    try:
        config = load_config(folder)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"train.init_from={folder}: {e}") from None
    ours, theirs = model.config.replace(attn_backend="auto"), config.replace(attn_backend="auto")
    if ours != theirs:
        diffs = [k for k, v in ours.to_dict().items() if theirs.to_dict()[k] != v]
        raise UserError(f"train.init_from={folder} holds a model of another config (differs in {diffs}): "
                        "leave the model.* settings alone when fine-tuning (`train --init-from` takes them from the folder)")
    try:
        state = load_file(str(folder / WEIGHTS_NAME))
    except (FileNotFoundError, SafetensorError) as e:
        raise UserError(f"train.init_from={folder}: cannot read {WEIGHTS_NAME} ({e}); weights are read from "
                        "safetensors only") from None
    try:
        load_state(model, state, source=str(folder / WEIGHTS_NAME))
    except ValueError as e:
        raise UserError(str(e)) from None


@dataclass
class TrainResult:
    run_dir: Path
    status: Literal["completed", "preempted", "already_complete"]
    step: int
    num_parameters: int
    metrics: list[dict] = field(default_factory=list)
    tokens_per_s: float | None = None  # training steps only (no eval or checkpoint time), this session
    peak_memory_mb: float | None = None
    median_step_seconds: float | None = None  # median optimizer-step time of this session

    @property
    def final_val_loss(self) -> float | None:
        evals = [m for m in self.metrics if m.get("kind") == "eval"]
        return evals[-1]["val_loss"] if evals else None


class Trainer:
    """Trains ``run.model`` on ``dataset`` into ``run_dir``. Use :func:`run_training` for a whole run."""

    def __init__(self, run: RunConfig, dataset, run_dir, *, dist: DistInfo | None = None, progress: bool = True,
                 log: Callable[[str], None] | None = None):
        self.run, self.cfg = run, run.train
        self.dataset, self.run_dir = dataset, Path(run_dir)
        self.dist = dist or DistInfo()
        self.progress = progress and self.dist.is_main
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        cfg, info = self.cfg, self.dist
        if cfg.batch_size % (info.world_size * cfg.grad_accum):
            raise UserError(f"train.batch_size={cfg.batch_size} must be divisible by world_size x grad_accum "
                            f"= {info.world_size} x {cfg.grad_accum}: change train.batch_size")
        if len(dataset.train) < cfg.seq_len + 1:
            raise UserError(f"the training split has {len(dataset.train)} tokens, fewer than one sequence "
                            f"(train.seq_len={cfg.seq_len} + 1): lower train.seq_len or use a larger corpus")
        if len(dataset.val) < cfg.seq_len + 1:
            raise UserError(f"the validation split has {len(dataset.val)} tokens, fewer than one sequence "
                            f"(train.seq_len={cfg.seq_len} + 1): lower train.seq_len or raise data.val_fraction")
        self.device = info.device
        self.amp = cfg.dtype == "bf16" or (cfg.dtype == "auto" and self.device.type == "cuda")
        self.mode = choose(cfg.parallel, info)
        validate_size(run.model, training=True, device=self.device,
                      shards=info.world_size if self.mode == "fsdp" else 1)
        self.model = DiffTransformerLM(run.model, seed=cfg.seed)
        if cfg.init_from is not None:
            load_initial_weights(self.model, cfg.init_from)
        self.model = self.model.to(self.device)
        self.compiled = cfg.compile if isinstance(cfg.compile, bool) else self.device.type == "cuda"
        self.wrapped = parallelize(self.model, self.mode, info, mixed_precision=self.amp,
                                   activation_checkpointing=cfg.activation_checkpointing, compile=self.compiled,
                                   reshard=cfg.fsdp_reshard, blocks_per_unit=cfg.fsdp_blocks_per_unit)
        self.forward = self.wrapped
        # Evaluation runs outside DDP (no gradients to synchronise); FSDP needs its wrapper.
        self._eval_model = self.wrapped if self.mode != "ddp" else self.model
        self.optimizer = build_optimizer(self.model, cfg)  # after fully_shard, over the sharded parameters
        self.batches = Batches(dataset.train, cfg.batch_size, cfg.seq_len, cfg.seed,
                               mix=build_mix(run.data.mix, dataset.tokenizer, cfg.seq_len))
        self.total_steps = cfg.total_steps
        self.step = 0
        self.metrics: list[dict] = []
        self.bad_total = 0
        self.consecutive_bad = 0
        self.last_rollback_to: int | None = None
        self.last_saved_step: int | None = None
        self._good_since_rollback = True  # no periodic save of a rolled-back state before a good step
        self._stop_requested = False
        self._stop_signal = "SIGTERM"
        self._train_time = 0.0
        self._train_time_total = 0.0  # over every session of the run (resumes continue it)
        self._step_times: list[float] = []  # this session's step times (s), for the median speed
        self._session_tokens = 0
        self._tb = None
        # Per layer, o_proj's summed input mean squares and their count, as buffers of o_proj (kept out of
        # the state dict). One hook for every layer, torch.compile traces it into each block's graph: a
        # per-layer closure or a graph break made the compiled block code recompile per layer, past
        # torch.compile's limit of 8 (DIFF at `base` then trained at 0.63x its eager speed on an H200).
        self._instrumenting = False
        for layer in self.model.layers:
            o_proj = layer.self_attn.o_proj
            for name in ("_sq_sum", "_sq_count"):
                o_proj.register_buffer(name, torch.zeros((), device=self.device), persistent=False)
            o_proj.register_forward_pre_hook(self._o_proj_pre_hook)

    # State ------------------------------------------------------------------------------------
    def _opts(self, strict: bool = True) -> StateDictOptions:
        return StateDictOptions(full_state_dict=True, cpu_offload=True, strict=strict)

    def model_state(self) -> dict[str, torch.Tensor]:
        state = get_model_state_dict(self.model, options=self._opts())
        if self.run.model.tie_embeddings:
            state.pop("lm_head.weight", None)
        return state

    def trainer_state(self) -> dict:
        return {"step": self.step, "tokens_seen": self.step * self.cfg.tokens_per_step,
                "train_seconds_total": self._train_time_total,
                "bad_steps_total": self.bad_total, "consecutive_bad_steps": self.consecutive_bad,
                "last_rollback_to": self.last_rollback_to, "world_size": self.dist.world_size,
                "data_key": (getattr(self.dataset, "manifest", None) or {}).get("key"),
                "metrics": self.metrics, "run": self.run.to_dict()}

    def load_weights(self, checkpoint: ckpt.Checkpoint) -> None:
        """Model and optimizer state from ``checkpoint`` (all ranks read the same files)."""
        if checkpoint.model_config != self.run.model:
            ours, theirs = self.run.model.to_dict(), checkpoint.model_config.to_dict()
            diffs = [f"model.{k}: {theirs[k]!r} in the checkpoint, {ours[k]!r} in this run"
                     for k in sorted(ours) if ours[k] != theirs.get(k)]
            raise ckpt.CheckpointError(f"checkpoint {checkpoint.path} is of another model config "
                                       f"({'; '.join(diffs[:3])}): resume it with its own settings or start a new run")
        tied = self.run.model.tie_embeddings
        opt, state = checkpoint.optimizer_state, checkpoint.trainer_state
        params = {n for g in opt["param_groups"] for n in g["params"]}
        if (not opt["state"] and state["step"] > state.get("bad_steps_total", 0)) or (
                opt["state"] and params - set(opt["state"])):
            raise ckpt.CheckpointError(f"checkpoint {checkpoint.path}: {ckpt.OPTIM_TENSORS} lacks the AdamW moments of "
                                       f"{len(params - set(opt['state']))} of {len(params)} parameters after "
                                       f"{state['step']} steps: resume from another checkpoint")
        try:
            set_model_state_dict(self.model, checkpoint.model_state, options=self._opts(strict=not tied))
            set_optimizer_state_dict(self.model, self.optimizer, checkpoint.optimizer_state, options=self._opts())
        except (KeyError, RuntimeError, ValueError) as e:
            raise ckpt.CheckpointError(f"checkpoint {checkpoint.path} does not fit this model/optimizer ({e})") from None

    def restore(self, checkpoint: ckpt.Checkpoint) -> None:
        """Continue from ``checkpoint``: weights, optimizer, RNG, step (= data position), metrics."""
        self.load_weights(checkpoint)
        state = checkpoint.trainer_state
        self.step = int(state["step"])
        self.metrics = list(state.get("metrics", []))
        self.bad_total = int(state.get("bad_steps_total", 0))
        self.consecutive_bad = int(state.get("consecutive_bad_steps", 0))
        self.last_rollback_to = state.get("last_rollback_to")
        self._train_time_total = float(state.get("train_seconds_total") or max(
            (m.get("train_seconds_total") or 0.0 for m in self.metrics), default=0.0))
        self.last_saved_step = self.step
        checkpoint.restore_rng()
        if self.dist.is_main and self.step < self.total_steps:  # a finished run keeps its summary record
            rundir.rewrite_metrics(self.run_dir, self.metrics)

    def save(self) -> Path:
        """Checkpoint the current step (every rank gathers; rank 0 writes, then commits after a barrier)."""
        path = ckpt.checkpoint_path(self.run_dir, self.step)
        if self.last_saved_step == self.step:
            return path
        t0 = time.perf_counter()
        model_state = self.model_state()
        optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=self._opts())
        if self.dist.is_main:
            with self._save_errors(path, model_state, optim_state):
                ckpt.write_checkpoint(path, model_config=self.run.model, model_state=model_state,
                                      optimizer_state=optim_state, trainer_state=self.trainer_state(),
                                      tokenizer=self.dataset.tokenizer)
        barrier(self.dist)
        if self.dist.is_main:
            with self._save_errors(path, model_state, optim_state):
                ckpt.commit(path)
            ckpt.prune(self.run_dir, self.cfg.keep_last)
        barrier(self.dist)
        self.last_saved_step = self.step
        if self.dist.is_main:  # gather, write and hashing time: what a save costs at this size
            size = sum((path / n).stat().st_size for n in (ckpt.WEIGHTS_NAME, ckpt.OPTIM_TENSORS))
            self.log(f"checkpoint {path.name} saved: {_size(size)} of tensors in {time.perf_counter() - t0:.1f} s")
        return path

    @contextlib.contextmanager
    def _save_errors(self, path: Path, model_state: dict, optim_state: dict):
        """A full disk or a file size limit during a save: remove the partial folder, then one UserError
        naming the space a save needs (the previous checkpoints are untouched)."""
        try:
            yield
        except (OSError, SafetensorError) as e:
            if not (path / ckpt.MARKER).exists():
                shutil.rmtree(path, ignore_errors=True)
            reason = getattr(e, "strerror", None) or str(e)
            reason = re.search(r'message: "([^"]*)"', reason).group(1) if 'message: "' in reason else reason
            one = sum(t.numel() * t.element_size() for t in model_state.values()) + sum(
                t.numel() * t.element_size() for s in optim_state["state"].values() for t in s.values()
                if isinstance(t, torch.Tensor))
            keep = self.cfg.keep_last
            raise UserError(f"cannot save checkpoint {path} ({reason}): a save needs about "
                            f"{_size(one * (keep + 1))} in {path.parent} (train.keep_last + 1 = {keep + 1} checkpoints "
                            f"of about {_size(one)}; older ones are pruned only after the new one is complete); "
                            "free some space and rerun the same command to resume") from None

    # Instrumentation --------------------------------------------------------------------------
    def _o_proj_pre_hook(self, module: torch.nn.Module, args: tuple) -> None:
        """On log steps, add the mean square of ``o_proj``'s input to the module's sums (on the device)."""
        if self._instrumenting:
            module._sq_sum.add_(args[0].detach().float().square().mean())
            module._sq_count.add_(1)

    @torch.no_grad()
    def _reset_instruments(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.o_proj._sq_sum.zero_()
            layer.self_attn.o_proj._sq_count.zero_()

    @torch.no_grad()
    def instruments(self) -> dict:
        """Per layer: RMS of the input to ``o_proj`` over this step's micro-batches (this rank's rows) and
        the mean of the per-head norm's weight (None without one). One device-to-host transfer."""
        layers = self.model.layers
        values, has_norm = [], []
        for layer in layers:
            o_proj = layer.self_attn.o_proj
            values.append((o_proj._sq_sum / o_proj._sq_count).sqrt())  # nan when nothing was recorded
            norm = layer.self_attn.head_norm
            has_norm.append(norm is not None)
            if norm is not None:
                w = norm.weight.full_tensor() if hasattr(norm.weight, "full_tensor") else norm.weight
                values.append(w.detach().float().mean())
        self._reset_instruments()
        flat = torch.stack(values).tolist() if values else []
        rms, gains, k = [], [], 0
        for norm in has_norm:
            rms.append(flat[k] if math.isfinite(flat[k]) else None)
            k += 1
            gains.append(flat[k] if norm else None)
            k += norm
        return {"o_proj_in_rms": rms, "head_norm_gain": gains}

    # Metrics ----------------------------------------------------------------------------------
    def record(self, entry: dict) -> None:
        self.metrics.append(entry)
        if not self.dist.is_main:
            return
        try:
            with open(self.run_dir / rundir.METRICS_FILE, "a") as f:
                f.write(json.dumps(rundir.json_safe(entry), sort_keys=True, allow_nan=False) + "\n")
        except OSError as e:
            raise UserError(f"cannot write {self.run_dir / rundir.METRICS_FILE} ({e.strerror or e}): free some space "
                            "(or fix the folder's permissions) and rerun the same command to resume") from None
        if self._tb is not None:
            for key, value in entry.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(f"{entry['kind']}/{key}", value, entry["step"])
            for i, lam in enumerate(entry.get("lambdas") or []):
                self._tb.add_scalar(f"lambda/layer_{i}", lam, entry["step"])
            for key in ("o_proj_in_rms", "head_norm_gain"):
                for i, value in enumerate(entry.get(key) or []):
                    if value is not None:
                        self._tb.add_scalar(f"{key}/layer_{i}", value, entry["step"])

    def _open_tensorboard(self) -> None:
        if not self.dist.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step or None)

    # Steps ------------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def _rows(self, x: torch.Tensor) -> list[torch.Tensor]:
        """This rank's micro-batches of a step's batch, moved to the device."""
        micro = x.shape[0] // self.cfg.grad_accum
        return [t.to(self.device, non_blocking=True) for t in x.split(micro)]

    def _loss(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        with self._autocast():
            logits = self.forward(x)  # (B, N, V)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction=reduction)

    def train_step(self) -> tuple[float, float]:
        """One optimizer step on batch ``self.step``: (loss, grad norm), both global over ranks."""
        cfg, info = self.cfg, self.dist
        x, y = self.batches.batch(self.step, info.rank, info.world_size)  # (B / world, N) each
        xs, ys = self._rows(x), self._rows(y)
        loss_sum = torch.zeros((), device=self.device)
        for i, (xm, ym) in enumerate(zip(xs, ys)):
            with gradient_sync(self.wrapped, self.mode, sync=i == len(xs) - 1):
                loss = self._loss(xm, ym)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        loss_mean = all_reduce(loss_sum / cfg.grad_accum, info) / info.world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or math.inf)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        return float(loss_mean), float(grad_norm)

    def evaluate(self) -> dict:
        """Validation loss (mean over tokens) on the fixed validation windows.

        Every rank scores every window, in micro-batches of the training micro-batch size: the loss is
        then the same number on any world size, and FSDP's ranks stay in lockstep."""
        cfg = self.cfg
        micro = max(1, cfg.batch_size // (self.dist.world_size * cfg.grad_accum))
        val_loss, _ = validation_loss(self._eval_model, self.dataset.val, micro, cfg.seq_len,
                                      cfg.eval_batches * cfg.batch_size // micro, self.device, self.amp)
        if self.mode == "fsdp":
            reshard_all(self.model)  # blocks that keep their gathered weights for a backward got none
        return {"kind": "eval", "step": self.step, "val_loss": val_loss,
                "val_ppl": math.exp(min(val_loss, 700.0)), "lambdas": self.lambdas()}

    @torch.no_grad()
    def lambdas(self) -> list[float] | None:
        """Each layer's λ (DIFF V1), gathered from shards under FSDP."""
        if self.run.model.attention != "diff":
            return None
        if self.mode != "fsdp" or self.run.model.lambda_mode != "learned":  # fixed/zero λ: no sharded vectors
            return self.model.lambdas()
        lams = []
        for layer in self.model.layers:
            attn = layer.self_attn
            vals = [getattr(attn, f"lambda_{n}").full_tensor() for n in ("q1", "k1", "q2", "k2")]
            lams.append(attn.combine_lambda(*vals, attn.lambda_init))
        return torch.stack(lams).tolist()

    def _handle_bad_steps(self) -> None:
        first = self.step - self.consecutive_bad + 1
        reason = (f"{self.consecutive_bad} consecutive steps ({first}..{self.step}) had a non-finite loss or gradient")
        hint = "lower train.lr, raise train.warmup_steps or train.grad_clip, or check the data"
        if self.cfg.on_bad_steps == "stop":
            raise TrainingDiverged(f"{reason}; stopping (train.on_bad_steps=stop): {hint}")
        path = ckpt.latest_valid(self.run_dir, self.log)
        if path is None:
            raise TrainingDiverged(f"{reason} and there is no checkpoint to roll back to: {hint}")
        if self.last_rollback_to == ckpt.step_of(path):
            raise TrainingDiverged(f"{reason} again after rolling back to step {self.last_rollback_to}: {hint}")
        self.load_weights(ckpt.load_checkpoint(path, verified=True))
        self.last_rollback_to = ckpt.step_of(path)
        self.consecutive_bad = 0
        self._good_since_rollback = False
        self.log(f"warning: {reason}; rolled the weights back to checkpoint {path.name} and continue with the next batches")
        self.record({"kind": "event", "step": self.step, "event": "rollback", "to_step": self.last_rollback_to})

    def _check_val_loss(self) -> None:
        """A non-finite validation loss ends the run (exit 3) before that state is checkpointed."""
        val = self.metrics[-1]["val_loss"]
        if not math.isfinite(val):
            raise TrainingDiverged(f"the validation loss is {val} at step {self.step}: the weights diverged; lower "
                                   "train.lr, raise train.warmup_steps or train.grad_clip, or check the data")

    # Loop -------------------------------------------------------------------------------------
    def _on_sigterm(self, signum, frame) -> None:
        self._stop_requested = True
        self._stop_signal = signal.Signals(signum).name
        if signum == signal.SIGINT:  # a second Ctrl-C stops at once
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.log("interrupted: finishing this step and saving a checkpoint (Ctrl-C again to stop at once, "
                     "losing the steps since the last checkpoint)")

    def _stop_agreed(self) -> bool:
        """Whether any rank got SIGTERM (one process needs no device round trip)."""
        if not self.dist.distributed:
            return self._stop_requested
        flag = torch.tensor([1.0 if self._stop_requested else 0.0], device=self.device)
        return bool(all_reduce(flag, self.dist).item() > 0)

    def fit(self) -> TrainResult:
        """Train from ``self.step`` to the end; evaluates, logs and checkpoints on the way."""
        cfg = self.cfg
        nparams = self.model.num_parameters() if self.mode != "fsdp" else sum(
            p.numel() for p in self.model.parameters())
        if self.step >= self.total_steps:
            return TrainResult(self.run_dir, "already_complete", self.step, nparams, self.metrics)
        if self.dist.is_main and self.step == 0:
            rundir.rewrite_metrics(self.run_dir, [])
        self._open_tensorboard()
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            previous_int = signal.signal(signal.SIGINT, self._on_sigterm)
        reset_peak_memory(self.device)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                       desc=f"{self.run.model.attention} seed {cfg.seed}", file=sys.stderr)
        profile = contextlib.ExitStack()
        try:
            prof = profile.enter_context(profiling.profiler(cfg.profile_steps, self.run_dir / "profile",
                                                            self.dist.rank, self.device, self.log))
            if cfg.profile_steps and self.total_steps - self.step < profiling.steps_needed(cfg.profile_steps):
                self.log(f"warning: train.profile_steps={cfg.profile_steps} needs "
                         f"{profiling.steps_needed(cfg.profile_steps)} steps in this session, and "
                         f"{self.total_steps - self.step} are left: no profile will be written")
            if self.step == 0:
                self.record(self.evaluate())
                self._check_val_loss()
            while self.step < self.total_steps:
                set_lr(self.optimizer, lr_at(self.step, cfg))
                log_step = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == self.total_steps
                self._instrumenting = log_step
                t0 = time.perf_counter()
                loss, grad_norm = self.train_step()
                self._instrumenting = False
                finite = math.isfinite(loss) and math.isfinite(grad_norm)
                if finite:
                    self.optimizer.step()
                    self.consecutive_bad = 0
                    self._good_since_rollback = True
                self.optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                step_time = time.perf_counter() - t0
                self._train_time += step_time
                self._train_time_total += step_time
                self._step_times.append(step_time)
                self._session_tokens += cfg.tokens_per_step
                self.step += 1
                prof.step()
                tok_s = self._session_tokens / max(self._train_time, 1e-9)
                if not finite:
                    self.bad_total += 1
                    self.consecutive_bad += 1
                    self.log(f"warning: step {self.step} skipped: loss {loss}, grad norm {grad_norm} "
                             f"({self.consecutive_bad} in a row, {self.bad_total} in total)")
                    self.record({"kind": "event", "step": self.step, "event": "nonfinite", "loss": str(loss),
                                 "grad_norm": str(grad_norm), "bad_steps": self.consecutive_bad,
                                 "bad_steps_total": self.bad_total})
                    if self.consecutive_bad >= cfg.max_bad_steps:
                        self._handle_bad_steps()
                elif log_step:
                    # grad_norm is the global norm before clipping (clip_grad_norm_'s return value).
                    self.record({"kind": "train", "step": self.step, "loss": loss, "grad_norm": grad_norm,
                                 "lr": self.optimizer.param_groups[0]["lr"], "tokens": self.step * cfg.tokens_per_step,
                                 "tokens_per_s": tok_s, "train_seconds": self._train_time,
                                 "train_seconds_total": self._train_time_total, "step_seconds": step_time,
                                 **self.instruments()})
                if log_step and not finite:  # recorded but not read (other steps record nothing)
                    self._reset_instruments()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == self.total_steps:
                    self.record(self.evaluate())
                    self._check_val_loss()
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.3f}", val=f"{self.metrics[-1]['val_loss']:.3f}",
                                        tok_s=f"{tok_s:,.0f}")
                # No periodic save inside a non-finite streak: a rollback must land before the streak, or
                # one that outlasts the rollback would roll back to ever newer checkpoints and never stop.
                # Nor right after a rollback: that would store the rolled-back state as a new checkpoint.
                if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and not self.consecutive_bad
                        and self._good_since_rollback) or self.step == self.total_steps:
                    self.save()
                if self._stop_agreed() and self.step < self.total_steps:  # at the end: complete, exit 0
                    path = self.save()
                    raise Preempted(self.step, path, self._stop_signal)
        finally:
            profile.close()
            if bar is not None:
                bar.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
                signal.signal(signal.SIGINT, previous_int)
            if self._tb is not None:
                self._tb.close()
                self._tb = None
        median = statistics.median(self._step_times) if self._step_times else None
        result = TrainResult(self.run_dir, "completed", self.step, nparams, list(self.metrics),
                             tokens_per_s=self._session_tokens / max(self._train_time, 1e-9),
                             peak_memory_mb=peak_memory_mb(self.device),
                             median_step_seconds=median)
        # After the final checkpoint: this session's speed and memory, for metrics.jsonl only. The median
        # step time ignores the first steps' warm-up (allocator, compile) and rare stalls.
        self.record({"kind": "summary", "step": self.step, "tokens_per_s": result.tokens_per_s,
                     "peak_memory_mb": result.peak_memory_mb, "train_seconds": self._train_time,
                     "train_seconds_total": self._train_time_total, "median_step_seconds": median,
                     "steps_timed": len(self._step_times), "compiled": self.compiled,
                     "tokens_per_s_median": cfg.tokens_per_step / median if median else None})
        return result


def run_training(run: RunConfig, run_dir, *, resume: str | Path | None = "auto", data_cache=None,
                 progress: bool = True, log: Callable[[str], None] | None = None) -> TrainResult:
    """Prepare the data, check the output folder, resume if asked or if it holds this run, and train.

    ``resume``: "auto" continues ``run_dir``'s run from its newest good checkpoint when it holds the
    same run; "require" insists on it; a path starts from that checkpoint (it must verify).
    Under torchrun every rank calls this; rank 0 writes the files.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    run_dir = Path(run_dir)
    validate_size(run.model, training=True)  # before the data is prepared
    if run.train.warmup_steps > run.train.total_steps and os.environ.get("RANK", "0") == "0":
        log(f"warning: train.warmup_steps={run.train.warmup_steps} is more than the run's {run.train.total_steps} "
            "steps: the learning rate never reaches train.lr; lower train.warmup_steps")
    started_group = not torch.distributed.is_initialized()
    info = init_distributed(run.train.device)
    try:
        dataset = prepare_dataset(run.data, Path(data_cache) if data_cache else default_cache_dir())
        if run.train.init_from is None or run.model.vocab_size < dataset.vocab_size:
            run = run.replace(model=run.model.replace(vocab_size=dataset.vocab_size))
        # else a fine-tuned model keeps its (possibly padded) vocabulary; load_initial_weights checks it
        quiet = (lambda msg: None) if not info.is_main else (lambda msg: log(f"warning: {msg}"))

        def start_checkpoint(existing=None):
            same_run = rundir.check_output_dir(run_dir, run)
            start = rundir.resolve_resume(run_dir, resume, same_run, quiet)
            checkpoint = ckpt.load_checkpoint(start, verified=True) if start is not None else None
            trainer = existing or Trainer(run, dataset, run_dir, dist=info, progress=progress,
                                          log=log if info.is_main else quiet)
            if checkpoint is not None:
                trainer.load_weights(checkpoint)  # refuses another model config before anything is written
                if not ckpt.same_tokenizer(checkpoint.path, dataset.tokenizer):
                    raise ckpt.CheckpointError(f"checkpoint {checkpoint.path} was trained with another tokenizer than "
                                               "this run's data makes: resume with the data settings it was trained with")
                key = checkpoint.trainer_state.get("data_key")
                if existing is not None and key not in (None, dataset.manifest.get("key")):
                    quiet(f"the training data changed since checkpoint {checkpoint.path} (token shards "
                          f"{key}, now {dataset.manifest.get('key')}): the run continues on the new data")
            return trainer, checkpoint

        trainer, checkpoint = start_checkpoint()  # every check before the folder is touched
        with contextlib.ExitStack() as held:
            barrier(info)
            if _agree_failed(_lock_failure(held, run_dir, info), info):
                raise UserError(f"--out {run_dir} is in use by another train process")
            barrier(info)
            trainer, checkpoint = start_checkpoint(trainer)  # again under the lock: another process may have run
            barrier(info)  # every rank has checked the folder before rank 0 writes into it
            if info.is_main:
                try:
                    rundir.write_run_files(run_dir, run, dataset.tokenizer)
                except OSError as e:
                    raise UserError(f"cannot write the run files into --out {run_dir} ({e.strerror or e}): free some "
                                    "space or choose a writable folder") from None
                if checkpoint is not None and resume not in ("auto", "require", None):
                    for p in ckpt.remove_after(run_dir, checkpoint.step):  # --resume PATH replaces later ones
                        log(f"warning: removed checkpoint {p.name}: the run continues from {checkpoint.path}")
            barrier(info)
            if checkpoint is not None:
                trainer.restore(checkpoint)
                if info.is_main and checkpoint.step < run.train.total_steps:
                    log(f"resuming from {checkpoint.path} (step {checkpoint.step})")
                    saved_world = checkpoint.trainer_state.get("world_size", 1)
                    if saved_world != info.world_size:  # the global batch does not depend on it
                        log(f"the checkpoint was saved by {saved_world} process(es); this run has {info.world_size}: "
                            f"each step still trains on the same {run.train.batch_size} rows, "
                            f"{run.train.batch_size // info.world_size} per process")
            return trainer.fit()
    finally:
        if started_group:
            destroy_distributed()


def _lock_failure(held: contextlib.ExitStack, run_dir: Path, info: DistInfo) -> UserError | None:
    """Rank 0 takes the run directory's lock for the rest of ``held``; the error if another process holds it."""
    if not info.is_main:
        return None
    try:
        held.enter_context(rundir.exclusive(run_dir))
    except UserError as e:
        if not info.distributed:
            raise
        return e
    return None


def _agree_failed(error: Exception | None, info: DistInfo) -> bool:
    """Whether any rank failed (so that all stop together); rank 0 raises its own error itself."""
    if error is not None and info.is_main:
        flag = torch.tensor([1.0], device=info.device)
        all_reduce(flag, info)
        raise error
    if not info.distributed:
        return False
    flag = torch.tensor([0.0], device=info.device)
    return bool(all_reduce(flag, info).item() > 0)
