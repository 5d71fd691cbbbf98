"""The one training loop (pretraining and fine-tuning) on DeepSpeed.

``out = engine(batch); engine.backward(out["loss"]); engine.step()`` is all the loop knows about a
model; everything else here is bookkeeping: data order, lr schedule, checkpoints, logging.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from mmmae.config import ConfigError, dump_config, effective_lr, model_cfg
from mmmae.data.collate import MaskCollator, collate_dicts
from mmmae.data.registry import build_dataset, get_source, views_per_item
from mmmae.data.sampler import ResumableBatchSampler, SeededDataset, mix_seed
from mmmae.engine import dist as D
from mmmae.engine.checkpoint import (complete_checkpoints, consolidated_state_dict, load_first_readable,
                                     read_train_state, resume_candidates, save_checkpoint, save_safetensors,
                                     to_universal)
from mmmae.engine.metrics import MetricsLogger
from mmmae.engine.optim import lr_at, param_groups
from mmmae.engine.perf import count_flops, device_peak_tflops
from mmmae.engine.visualize import panel_for, save_png
from mmmae.registry import MethodSpec, build_from_cfg, get_spec

log = logging.getLogger("mmmae.train")

class NonFiniteLossError(RuntimeError):
    pass


PRECISIONS = ("auto", "bf16", "bf16_weights", "fp16", "fp32")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 where the hardware has it (GPUs with bf16; CPUs with native bf16 kernels, where
    it pays as on GPUs), else fp16 on GPUs and fp32 on CPUs."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def micro_batch_size(cfg: DictConfig) -> int:
    """Samples per forward: items per loader batch x repeated views per item."""
    return cfg.data.batch_size * views_per_item(cfg.data)


def zero_stage(cfg: DictConfig) -> int:
    zero = cfg.ds.get("zero_optimization") or {}
    return int(zero.get("stage", 0) or 0)


def resume_accum_steps(saved: dict[str, Any] | None, cfg: DictConfig, world_size: int, where: str = "") -> int:
    """Gradient accumulation for this run. A resume on another number of processes keeps the
    checkpoint's global batch (items per optimizer step), so accumulation adjusts; when the new world
    cannot reach that batch, or the checkpoint is ZeRO-3's with offloading, the error says why."""
    accum = cfg.train.accum_steps
    if saved is None or int(saved.get("world_size", world_size)) == world_size:
        return accum
    old_world, stage = int(saved["world_size"]), int(saved.get("zero_stage", 0))
    zero = cfg.ds.get("zero_optimization") or {}
    offloaded = [f"ds.zero_optimization.{k}" for k in ("offload_optimizer", "offload_param")
                 if str((zero.get(k) or {}).get("device") or "none").lower() != "none"]
    if stage >= 3 and offloaded:
        # The ZeRO-3 universal load is made exact for optimizer state held in memory (checkpoint.py
        # repairs it there); DeepSpeed's offload path purges and swaps that state, untested here.
        raise ValueError(f"checkpoint {where} was written by {old_world} processes under ZeRO-3; a size change with "
                         f"an offloaded optimizer or parameters is not verified to resume exactly; resume it on "
                         f"{old_world} processes or without {', '.join(offloaded)}; "
                         f"this run has {world_size}")
    target, per_step = int(saved["global_batch"]), cfg.data.batch_size * world_size
    if target % per_step:
        raise ValueError(f"checkpoint {where} trains with {target} items per optimizer step; {world_size} processes x "
                         f"data.batch_size={cfg.data.batch_size} cannot make that batch with whole accumulation "
                         f"steps; choose a data.batch_size that divides {target // world_size if target % world_size == 0 else target}")
    return target // per_step


def deepspeed_config(cfg: DictConfig, world_size: int, precision: str,
                     accum_steps: int | None = None) -> dict[str, Any]:
    """The YAML's ``ds`` block plus the fields derived from the training config. A derived field set
    by hand in ``ds`` must agree with the derived value."""
    user = OmegaConf.to_container(cfg.ds, resolve=True)
    assert isinstance(user, dict)
    micro = micro_batch_size(cfg)
    accum = cfg.train.accum_steps if accum_steps is None else accum_steps
    derived: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": float(cfg.optim.clip_grad),
        # bf16: fp32 weights, bf16 compute under autocast (as the reference recipes' AMP), linear-layer
        # gradients communicated in bf16; bf16_weights: DeepSpeed's bf16 mode (bf16 weights and
        # activations, fp32 master copy in the optimizer).
        "torch_autocast": {"enabled": precision == "bf16", "dtype": "bfloat16"},
        "bf16": {"enabled": precision == "bf16_weights"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16, "loss_scale_window": 500},
    }
    # One knob per quantity: the fields DeepSpeed would take from ``ds`` come from the training config,
    # and a hand-set ``ds`` value that disagrees is an error naming both keys.
    owners = {"train_micro_batch_size_per_gpu": "data.batch_size x data.num_samples",
              "gradient_accumulation_steps": "train.accum_steps",
              "train_batch_size": "data.batch_size x data.num_samples x train.accum_steps x world size",
              "gradient_clipping": "optim.clip_grad"}
    for k, owner in owners.items():
        if k in user and user[k] != derived[k]:
            raise ValueError(f"ds.{k}={user[k]} disagrees with {owner} ({derived[k]}); set {owner.split(' ')[0]} "
                             f"instead and leave ds.{k} out")
    for k in ("bf16", "fp16", "torch_autocast"):
        given = user.get(k, {}).get("enabled") if isinstance(user.get(k), dict) else None
        if given is not None and bool(given) != derived[k]["enabled"]:
            raise ValueError(f"ds.{k}.enabled={given} disagrees with train.precision (resolved to {precision!r}); "
                             f"choose the precision with train.precision and leave ds.{k}.enabled out")
    out = {"steps_per_print": 10**9, "wall_clock_breakdown": False, **user}
    for k, v in derived.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def pretrain_grid(mcfg: Any, path: Path) -> tuple[tuple[int, ...] | None, str]:
    """The token grid the ``init_from`` weights were pretrained on, for resizing a learned position
    table, and where it was read: ``model.init_img_size``, else the pretraining run's ``config.yaml``
    in the weights' folder (tools/train.py writes both there), else None (taken to be the model's)."""
    if mcfg.init_img_size > 0:
        size, patch, frames, tubelet, where = (mcfg.init_img_size, mcfg.patch_size, mcfg.num_frames,
                                               mcfg.tubelet_size, "model.init_img_size")
    elif (run_cfg := (path if path.is_dir() else path.parent) / "config.yaml").is_file():
        try:
            pre = model_cfg(OmegaConf.load(run_cfg).model)
        except ConfigError as e:
            raise ConfigError(f"cannot read the pretraining grid from {run_cfg} ({e}); "
                              f"set model.init_img_size to the image size the weights were trained at") from None
        size, patch, frames, tubelet, where = (pre.img_size, pre.patch_size, pre.num_frames, pre.tubelet_size,
                                               str(run_cfg))
    else:
        return None, "none given: the model's own grid"
    spatial = (size // patch, size // patch)
    return ((frames // tubelet, *spatial) if frames else spatial), where


def load_init_weights(model: torch.nn.Module, path: str, *, strict: bool = True, part: str = "auto") -> dict[str, Any]:
    """``init_from``: weights in any layout :mod:`mmmae.weights` reads (a run's ``model.safetensors``
    or folder, a DeepSpeed checkpoint, an official / timm / Hugging Face checkpoint), loaded strictly
    by default (``init_strict``), ``part`` as ``init_part`` (``auto``: a classifier or retrieval model
    takes the encoder and starts its heads fresh; a pretraining model takes everything).

    A learned position table (an image classifier) is resized from the pretraining grid: the report's
    ``pos_embed`` says from which grid to which, and where the grid was read. Returns the
    JSON-ready :class:`mmmae.weights.LoadReport` (``missing``, ``unexpected``, what was converted...).
    """
    from mmmae.weights import PARTS, load

    if part not in PARTS:
        raise ConfigError(f"init_part must be one of {', '.join(PARTS)}, got {part!r}")
    learned = model.learned_pos  # the model contract (mmmae.heads.EncoderModel)
    grid, where = pretrain_grid(model.cfg, Path(path)) if learned else (None, "not used")
    report = load(model, path, part=part, strict=strict, source_grid=grid).to_dict()
    if learned:
        report["pos_embed"] = {**report["pos_embed"], "grid_from": where}
    return report


# --- Batches ------------------------------------------------------------------------------------------

def _skip_counts(batch: dict[str, Any]) -> dict[str, int]:
    """Unreadable inputs the dataset skipped for this batch, by counter (skipped_videos, skipped_images)."""
    return {k: v for k, v in batch.items() if k.startswith("skipped_") and isinstance(v, int)}


def _loss_parts(out: dict[str, Any]) -> dict[str, float]:
    """``loss`` and the named ``*_loss`` parts of a model's output, as floats."""
    return {k: float(v.detach().float()) for k, v in out.items() if k == "loss" or k.endswith("_loss")}


# --- The loop's state ---------------------------------------------------------------------------------

@dataclass
class TrainState:
    """Where the loop stands: saved with every checkpoint (as DeepSpeed's client state and as
    ``train_state.json``) and restored on resume. Each rank's RNG state travels in the checkpoint's
    own ``rng_rank{N}.pt`` files (:func:`mmmae.engine.checkpoint.save_checkpoint`)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    epoch_batches: int = 0  # loader batches of ``epoch`` this rank has drawn (non-finite ones included)
    nonfinite_total: int = 0  # micro-batches skipped for a non-finite loss
    skipped: dict[str, int] = field(default_factory=dict)  # unreadable inputs skipped, by batch counter

    def to_dict(self, *, batch_size: int, world_size: int, accum_steps: int, zero_stage: int) -> dict[str, Any]:
        """The JSON-ready state, with the run's shape: a resume on another number of processes keeps
        ``global_batch`` and re-cuts the sampler's global position ``epoch_samples``."""
        return {"step": self.step, "epoch": self.epoch, "epoch_batches": self.epoch_batches,
                "epoch_samples": self.epoch_batches * batch_size * world_size, "world_size": world_size,
                "global_batch": batch_size * accum_steps * world_size, "zero_stage": zero_stage,
                "nonfinite_total": self.nonfinite_total, "skipped": dict(self.skipped)}

    @classmethod
    def from_dict(cls, saved: dict[str, Any], *, batch_size: int, world_size: int, where: str = "") -> TrainState:
        """The state :meth:`to_dict` wrote, for this run's ``batch_size`` and ``world_size``."""
        missing = [k for k in ("step", "epoch", "epoch_batches") if k not in saved]
        if missing:
            raise ValueError(f"the train state of checkpoint {where} lacks {', '.join(missing)}")
        epoch_batches = int(saved["epoch_batches"])
        if "epoch_samples" in saved:  # the sampler's position is global: re-cut it for this world size
            epoch_batches = int(saved["epoch_samples"]) // (batch_size * world_size)
        return cls(step=int(saved["step"]), epoch=int(saved["epoch"]), epoch_batches=epoch_batches,
                   nonfinite_total=int(saved.get("nonfinite_total", 0)),
                   skipped={k: int(v) for k, v in saved.get("skipped", {}).items()})

    def count_skipped(self, batch: dict[str, Any]) -> None:
        for k, v in _skip_counts(batch).items():
            self.skipped[k] = self.skipped.get(k, 0) + v


class Checkpointer:
    """Writes the run's checkpoints and remembers the last one and its step, so no step is saved twice."""

    def __init__(self, engine: Any, out_dir: Path, keep_last: int, *, batch_size: int, world_size: int,
                 accum_steps: int) -> None:
        self.engine, self.out_dir, self.keep_last = engine, out_dir, keep_last
        self.shape = {"batch_size": batch_size, "world_size": world_size, "accum_steps": accum_steps,
                      "zero_stage": engine.zero_optimization_stage()}
        self.last: Path | None = None
        self.saved_step = -1

    def save(self, state: TrainState) -> Path:
        self.last = save_checkpoint(self.engine, self.out_dir, state.step, state.to_dict(**self.shape), self.keep_last)
        self.saved_step = state.step
        return self.last

    def ensure(self, state: TrainState) -> Path:
        """The checkpoint of ``state.step``, written now unless this run already wrote it."""
        return self.last if self.last is not None and self.saved_step == state.step else self.save(state)


# --- Data ---------------------------------------------------------------------------------------------

def timed_batches(loader: Any, on_wait: Callable[[float], None]) -> Iterator[Any]:
    """The loader's batches; the seconds spent waiting for each go to ``on_wait``."""
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        on_wait(time.perf_counter() - t0)
        yield batch


def _batch_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class TrainData:
    """The training data of one rank: the dataset, its batch sampler, the collate that makes the masks,
    and the loader, read from a :class:`TrainState`'s position on, epoch after epoch."""

    def __init__(self, cfg: DictConfig, dataset: SeededDataset, mask_fn: Any, *, world: int, rank: int, seed: int,
                 device: torch.device, transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 batch_sampler: Callable[[Any, int, int, int, int], Any] | None = None) -> None:
        """``batch_sampler``: the source's own (its spec's ``batch_sampler``), else shuffled resumable shards."""
        self.dataset, self.seed, self.device, self.transform = dataset, seed, device, transform
        if batch_sampler is not None:
            self.batch_sampler = batch_sampler(dataset.dataset, cfg.data.batch_size, world, rank, seed)
        else:
            self.batch_sampler = ResumableBatchSampler(len(dataset), cfg.data.batch_size, world, rank,
                                                       shuffle=True, seed=seed)
        self.collate = MaskCollator(mask_fn, seed=seed, collate=collate_dicts)
        self.loader_gen = torch.Generator()
        self.loader = DataLoader(dataset, batch_sampler=self.batch_sampler, collate_fn=self.collate,
                                 num_workers=cfg.data.num_workers, generator=self.loader_gen,
                                 pin_memory=device.type == "cuda", persistent_workers=False)
        self.batch_sampler.set_epoch(0)
        self.batches_per_epoch = len(self.batch_sampler)

    def batches(self, state: TrainState, on_wait: Callable[[float], None]) -> Iterator[dict[str, Any]]:
        """Device batches (through the method's batch transform, e.g. mixup) from ``state``'s epoch and batch on;
        advances ``state.epoch_batches`` per batch and ``state.epoch`` when an epoch runs out."""
        while True:
            self.batch_sampler.set_epoch(state.epoch, start_batch=state.epoch_batches)
            self.dataset.set_epoch(state.epoch)
            self.collate.set_epoch(state.epoch)
            self.loader_gen.manual_seed(mix_seed(self.seed, state.epoch, "workers"))
            for batch in timed_batches(self.loader, on_wait):
                state.epoch_batches += 1
                state.count_skipped(batch)
                batch = _batch_to(batch, self.device)
                yield self.transform(batch) if self.transform is not None else batch
            state.epoch += 1
            state.epoch_batches = 0


# --- One optimizer step -------------------------------------------------------------------------------

@dataclass
class StepResult:
    """What one optimizer step gives the log window, the picture and the stop check."""

    loss_sums: dict[str, float]  # summed over the step's finite micro-batches
    loss_counts: dict[str, int]  # how many micro-batches gave each part
    samples: int
    tokens: int
    grad_norm: float
    stop_signum: int  # a stop signal any rank received, as agreed at the last micro-batch
    batch: dict[str, Any]  # the last micro-batch and the model's output for it
    out: dict[str, Any]
    forward_flops: float | None = None  # of the first micro-batch, when asked to count


@torch.no_grad()
def _grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) \
        if grads else 0.0


def train_step(engine: Any, batches: Iterator[dict[str, Any]], state: TrainState, *, accum: int,
               max_nonfinite: int, stop_flag: dict[str, int], own_grad_norm: bool = False,
               count: Callable[[dict[str, Any], dict[str, Any]], tuple[int, int]] | None = None,
               count_flops_first: bool = False) -> StepResult:
    """One optimizer step: ``accum`` micro-batches with a finite loss, each ``forward -> backward ->
    engine.step()`` (DeepSpeed steps the optimizer at the last). A micro-batch whose loss is non-finite
    on any rank is skipped by every rank (DeepSpeed's counters stay aligned) and another is drawn;
    ``max_nonfinite`` in a row raise :class:`NonFiniteLossError`. ``state.step`` advances by one.
    ``count(batch, out)`` gives a micro-batch's (samples, tokens) (the method spec's ``batch_counts``)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    samples = tokens = micro = consecutive_bad = 0
    own_norm, forward_flops, stop_signum = None, None, 0
    while micro < accum:
        batch = next(batches)
        if count_flops_first and forward_flops is None:
            with torch.no_grad():
                forward_flops = count_flops(lambda: engine(batch), engine.module)
        out = engine(batch)
        loss = out["loss"]
        # One collective per micro-batch agrees on both: a non-finite loss anywhere, a stop signal anywhere.
        bad, signalled = D.all_reduce_max(0.0 if torch.isfinite(loss).all() else 1.0, float(stop_flag["signum"]))
        stop_signum = int(signalled)
        if bad:
            state.nonfinite_total += 1
            consecutive_bad += 1
            if D.is_main():
                log.warning("non-finite loss at step %d (%d in a row); batch skipped", state.step, consecutive_bad)
            if consecutive_bad >= max_nonfinite:
                raise NonFiniteLossError(f"{consecutive_bad} consecutive non-finite losses at step {state.step} "
                                         f"(train.max_nonfinite={max_nonfinite}); stopping")
            continue
        consecutive_bad = 0
        engine.backward(loss)
        micro += 1
        if own_grad_norm and micro == accum:
            own_norm = _grad_norm(engine.module)  # grads are reduced and complete at the boundary
        engine.step()
        for k, v in _loss_parts(out).items():
            sums[k] = sums.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + 1
        if count is not None:
            n, t = count(batch, out)
            samples, tokens = samples + n, tokens + t
    state.step += 1
    gn = engine.get_global_grad_norm()
    gn = gn if gn is not None else own_norm
    return StepResult(sums, counts, samples, tokens, float(gn) if gn is not None else float("nan"), stop_signum,
                      batch, out, forward_flops)


# --- The log window -----------------------------------------------------------------------------------

DATA_WAIT_WARN = 0.2  # share of step time waiting for the loader past which the run warns (once)


class LogWindow:
    """The steps since the last metrics record: loss sums, samples, tokens and seconds waiting for
    data, turned into one record (reduced over ranks) every ``train.log_every`` steps."""

    def __init__(self, step_flops: float | None = None, peak_tflops: float = 1.0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.step_flops = step_flops  # model FLOPs of one optimizer step on this rank
        self.peak_tflops, self.clock = peak_tflops, clock
        self.records = 0
        self.warned = False
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.samples = self.tokens = self.steps = 0
        self.wait_s = 0.0
        self.start = self.clock()

    def add_wait(self, seconds: float) -> None:
        self.wait_s += seconds

    def add(self, result: StepResult) -> None:
        for k, v in result.loss_sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + result.loss_counts[k]
        self.samples += result.samples
        self.tokens += result.tokens
        self.steps += 1

    def record(self, state: TrainState, *, epoch: float, lr: float, grad_norm: float) -> dict[str, Any]:
        """The metrics record of this window (every rank calls it: the values are reduced over ranks);
        the window starts again."""
        elapsed = self.clock() - self.start
        wait_share = D.all_reduce_sum(self.wait_s / elapsed) / D.world_size()
        step_time = elapsed / max(self.steps, 1)
        means = D.all_reduce_weighted_mean(self.sums, self.counts)
        samples = D.all_reduce_sum(self.samples)
        tokens = D.all_reduce_sum(self.tokens)
        skipped = D.all_reduce_counts(state.skipped)
        record = {"step": state.step, "epoch": epoch, **means, "lr": lr, "grad_norm": grad_norm,
                  "samples_per_s": samples / elapsed, "tokens_per_s": tokens / elapsed, "step_time_s": step_time,
                  "data_wait_share": wait_share,
                  "mfu": (self.step_flops or 0.0) / step_time / (self.peak_tflops * 1e12), **skipped,
                  "nonfinite_steps": state.nonfinite_total}
        self.records += 1
        if wait_share > DATA_WAIT_WARN and self.records > 1 and not self.warned and D.is_main():
            self.warned = True  # the first window pays worker start-up, so it is not judged
            log.warning("%.0f%% of step time is spent waiting for data (data_wait_share %.2f): raise "
                        "data.num_workers, use repeated sampling (data.num_samples), or re-encode the "
                        "videos for fast seeking (tools/prepare_videos.py)", 100 * wait_share, wait_share)
        self.reset()
        return record


# --- Preemption ---------------------------------------------------------------------------------------

# Exit status of a run that stopped on SIGTERM / SIGUSR1 after checkpointing (EX_TEMPFAIL):
# tools/slurm/train.sbatch requeues the job on it, and resume=auto continues.
PREEMPTED_EXIT_CODE = 75
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The run was asked to stop (SIGTERM / SIGUSR1); ``checkpoint`` holds its state at ``step``."""

    def __init__(self, step: int, checkpoint: Path, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint, self.signum = step, checkpoint, signum


@contextmanager
def preemption_signals() -> Iterator[dict[str, int]]:
    """While training, SIGTERM and SIGUSR1 (what SLURM sends before a time limit or preemption, e.g.
    ``--signal=USR1@120``) only raise a flag; the loop finishes its step, checkpoints and stops.
    The previous handlers come back afterwards."""
    flag = {"signum": 0}
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signal handlers can only be set from the main thread
        return

    def handler(signum: int, frame: Any) -> None:
        flag["signum"] = signum

    previous = {s: signal.signal(s, handler) for s in PREEMPT_SIGNALS}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run training as configured; returns a summary (final step, last metrics, output paths).

    Raises :class:`Preempted` after checkpointing when SIGTERM or SIGUSR1 arrives."""
    with preemption_signals() as flag:
        return _train(cfg, flag)


def _train(cfg: DictConfig, stop_flag: dict[str, int]) -> dict[str, Any]:
    device = D.init_distributed()
    rank, world = D.rank(), D.world_size()
    out_dir = Path(cfg.output_dir)
    if D.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out_dir / "config.yaml")
    precision = resolve_precision(cfg.train.precision, device)
    seed = cfg.train.seed

    mcfg = model_cfg(cfg.model)
    name = cfg.model.name
    spec = get_spec(name)
    # Data first: a missing path should fail before minutes of model building.
    dataset = SeededDataset(build_dataset(cfg, "train", mcfg), seed)
    torch.manual_seed(seed)  # identical initial weights on every rank
    model = build_from_cfg(name, mcfg)
    init_report = _init_from(model, cfg, out_dir)
    if cfg.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    # Dropout / drop-path draws differ between ranks (their samples differ too).
    torch.manual_seed(mix_seed(seed, rank, "train"))

    # Resuming on another number of processes keeps the global batch: accumulation adjusts.
    candidates = resume_candidates(cfg.resume, out_dir) if cfg.resume else []
    saved = read_train_state(candidates[0]) if candidates else None
    accum = resume_accum_steps(saved, cfg, world, str(candidates[0]) if candidates else "")
    elastic = saved is not None and int(saved.get("world_size", world)) != world
    source = get_source(cfg.data.dataset)
    if elastic and source.batch_sampler is not None:
        raise ValueError(f"checkpoint {candidates[0]} was written by {saved['world_size']} processes; this data "
                         f"source's batch sampler keeps a position per rank, so it resumes on that many only")
    if elastic and D.is_main():
        log.info("resuming a checkpoint of %d processes on %d: %d accumulation steps keep its %d items per step",
                 saved["world_size"], world, accum, saved["global_batch"])
    data = TrainData(cfg, dataset, spec.make_mask_fn(mcfg) if spec.make_mask_fn else None, world=world, rank=rank,
                     seed=seed, device=device,
                     transform=_batch_transforms(cfg, mcfg, device, source, spec),
                     batch_sampler=source.batch_sampler)
    if data.batches_per_epoch < accum:
        raise ValueError(f"the dataset gives {data.batches_per_epoch} batches of {cfg.data.batch_size} per process, "
                         f"fewer than {accum} accumulation steps; lower data.batch_size")
    steps_per_epoch = data.batches_per_epoch // accum
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else cfg.train.epochs * steps_per_epoch
    end_step = min(total_steps, cfg.train.stop_at_step) if cfg.train.stop_at_step > 0 else total_steps
    warmup = cfg.optim.warmup_steps if cfg.optim.warmup_steps >= 0 else int(cfg.optim.warmup_epochs * steps_per_epoch)
    schedule = {"base_lr": effective_lr(cfg, world, accum), "min_lr": cfg.optim.min_lr, "warmup_steps": warmup,
                "total_steps": total_steps}

    universal = elastic and int(saved.get("zero_stage", 0)) > 0
    engine = _build_engine(cfg, model, world, precision, accum, schedule["base_lr"],
                           universal_from=candidates[0] if universal else None)
    state = TrainState()
    loaded = load_first_readable(engine, candidates[:1] if universal else candidates, universal=universal) \
        if candidates else None
    if loaded is not None:
        resume_from, client_state = loaded
        state = TrainState.from_dict(client_state, batch_size=cfg.data.batch_size, world_size=world,
                                     where=str(resume_from))
        if D.is_main():
            log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, state.step, state.epoch,
                     state.epoch_batches)

    metrics = MetricsLogger(out_dir, enabled=D.is_main())
    bar = None
    if D.is_main() and cfg.train.progress:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=state.step, desc=f"{name}", dynamic_ncols=True)
    peak_tflops, peak_source = device_peak_tflops(device, precision)
    if D.is_main():
        log.info("mfu in metrics.jsonl is relative to %.1f TFLOP/s (%s)", peak_tflops, peak_source)
    window = LogWindow(peak_tflops=peak_tflops)
    ckpt = Checkpointer(engine, out_dir, cfg.train.keep_last, batch_size=cfg.data.batch_size, world_size=world,
                        accum_steps=accum)
    # DeepSpeed reports the gradient norm except with fp32 weights, no ZeRO and no clipping.
    own_grad_norm = engine.zero_optimization_stage() == 0 and precision in ("fp32", "bf16") and not cfg.optim.clip_grad
    count = partial(spec.batch_counts, mcfg, tokens_per_sample=model.encoder.num_patches)
    last: StepResult | None = None
    last_record: dict[str, Any] = {}
    engine.train()
    lr = _set_lr(engine, state.step, schedule)
    with closing(data.batches(state, window.add_wait)) as batches:
        while state.step < end_step:
            lr = _set_lr(engine, state.step, schedule)
            last = train_step(engine, batches, state, accum=accum, max_nonfinite=cfg.train.max_nonfinite,
                              stop_flag=stop_flag, own_grad_norm=own_grad_norm, count=count,
                              count_flops_first=window.step_flops is None)
            if last.forward_flops is not None:  # a training step is ~3x its forward (backward ~2x)
                window.step_flops = 3.0 * accum * last.forward_flops
            window.add(last)
            if bar is not None:
                bar.update(1)
            if state.step % cfg.train.log_every == 0 or state.step == total_steps:
                last_record = window.record(state, epoch=state.epoch + state.epoch_batches / data.batches_per_epoch,
                                            lr=lr, grad_norm=last.grad_norm)
                metrics.log(last_record)
                if bar is not None:
                    bar.set_postfix(loss=f"{last_record.get('loss', float('nan')):.4f}",
                                    sps=f"{last_record['samples_per_s']:.1f}")
            if cfg.train.vis_every and state.step % cfg.train.vis_every == 0 and D.is_main():
                _save_picture(spec, engine.module, last.batch, last.out, out_dir, state.step, metrics)
            if state.step % cfg.train.ckpt_every == 0 and state.step < end_step:
                ckpt.save(state)
            # Every rank stops at the same step if any of them was signalled (agreed with the loss check).
            if last.stop_signum and state.step < end_step:
                path = ckpt.ensure(state)
                metrics.close()
                if bar is not None:
                    bar.close()
                if D.is_main():
                    log.warning("%s received: checkpointed step %d to %s; resume=auto continues",
                                signal.Signals(last.stop_signum).name, state.step, path)
                raise Preempted(state.step, path, last.stop_signum)

    if bar is not None:
        bar.close()
    path = ckpt.ensure(state)
    if D.is_main() and last is not None:
        _save_picture(spec, engine.module, last.batch, last.out, out_dir, state.step, metrics)
    weights = consolidated_state_dict(engine, path)
    if D.is_main() and weights is not None:
        save_safetensors(weights, out_dir / "model.safetensors")
    metrics.close()
    D.barrier()
    return {"step": state.step, "last": last_record, "output_dir": str(out_dir), "checkpoints":
            [str(p) for p in complete_checkpoints(out_dir)], "init_report": init_report}


def _batch_transforms(cfg: DictConfig, mcfg: Any, device: torch.device, source: Any, spec: MethodSpec
                      ) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
    """What runs on each device batch before the forward: the source's device half of the augmentation
    (``data.gpu_augment``), then the method's batch transform (the classifier's mixup)."""
    parts = [t for t in (source.device_transform(cfg, mcfg, device) if source.device_transform else None,
                         spec.batch_transform(cfg, mcfg) if spec.batch_transform else None) if t is not None]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    first, then = parts
    return lambda batch: then(first(batch))


def _init_from(model: torch.nn.Module, cfg: DictConfig, out_dir: Path) -> dict[str, Any] | None:
    """``init_from`` weights loaded into ``model``; the report goes to ``init_report.json``."""
    if not cfg.init_from:
        return None
    report = load_init_weights(model, cfg.init_from, strict=cfg.init_strict, part=cfg.init_part)
    if D.is_main():
        log.info("init_from %s: missing %s, unexpected %s, position table %s", cfg.init_from,
                 report["missing"], report["unexpected"], report.get("pos_embed", "-"))
        (out_dir / "init_report.json").write_text(json.dumps({"init_from": cfg.init_from, **report}, indent=1))
    return report


def _build_engine(cfg: DictConfig, model: torch.nn.Module, world: int, precision: str, accum: int, base_lr: float,
                  *, universal_from: Path | None = None) -> Any:
    """The DeepSpeed engine around ``model`` with AdamW over its parameter groups. ``universal_from``: a
    ZeRO 1-3 checkpoint of another world size, whose optimizer state is split over the ranks that wrote
    it; this run loads its universal form (converted once, on rank 0)."""
    import deepspeed

    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay)
    for g in groups:
        g.pop("names")
    optimizer = torch.optim.AdamW(groups, lr=base_lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  fused=bool(cfg.optim.fused))
    ds_config = deepspeed_config(cfg, world, precision, accum)
    if universal_from is not None:
        if D.is_main():
            log.info("converting %s to DeepSpeed's universal checkpoint for %d processes", universal_from, world)
            to_universal(universal_from)
        D.barrier()
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if world == 1 and engine.zero_optimization_stage() == 0:
        # Nothing to average over one process; DeepSpeed would still flatten and copy every gradient
        # (~0.3 s of a 1.1 s ViT-B step on 2 CPU cores).
        engine.enable_backward_allreduce = False
    if cfg.train.compile:
        engine.compile()
    return engine


def _set_lr(engine: Any, step: int, schedule: dict[str, Any]) -> float:
    """Set the learning rate of ``step`` (warmup then cosine) on every group (scaled by its lr_scale)."""
    lr = lr_at(step, **schedule)
    for g in engine.optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    return lr


def _save_picture(spec: MethodSpec, model: torch.nn.Module, batch: dict[str, Any] | None,
                  out: dict[str, Any] | None, out_dir: Path, step: int, metrics: MetricsLogger) -> None:
    if batch is None or out is None or spec.visualize is None:
        return
    try:
        panel = panel_for(spec, model, batch, out)
    except Exception as e:  # a picture must never stop a run
        log.warning("could not draw the reconstruction picture at step %d: %s", step, e)
        return
    if panel is not None:
        save_png(panel, out_dir / "vis" / f"step_{step:08d}.png")
        metrics.add_image("reconstruction", panel, step)
