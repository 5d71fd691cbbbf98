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
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from mmmae.config import ConfigError, dump_config, effective_lr, model_cfg
from mmmae.data.collate import MaskCollator, collate_dicts
from mmmae.data.registry import build_dataset
from mmmae.data.sampler import ResumableBatchSampler, SeededDataset, mix_seed
from mmmae.engine import dist as D
from mmmae.engine.checkpoint import (complete_checkpoints, consolidated_state_dict, load_first_readable,
                                     read_train_state, resume_candidates, save_checkpoint, save_safetensors,
                                     to_universal)
from mmmae.engine.metrics import MetricsLogger
from mmmae.engine.optim import lr_at, param_groups
from mmmae.engine.perf import count_flops, device_peak_tflops
from mmmae.engine.visualize import panel_for, save_png
from mmmae.registry import build_from_cfg, get_spec

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
    return cfg.data.batch_size * max(cfg.data.num_samples, 1)


def zero_stage(cfg: DictConfig) -> int:
    zero = cfg.ds.get("zero_optimization") or {}
    return int(zero.get("stage", 0) or 0)


def resume_accum_steps(saved: dict[str, Any] | None, cfg: DictConfig, world_size: int, where: str = "") -> int:
    """Gradient accumulation for this run. A resume on another number of processes keeps the
    checkpoint's global batch (items per optimizer step), so accumulation adjusts; when the new world
    cannot reach that batch, or the checkpoint is ZeRO-3's, the error says why."""
    accum = cfg.train.accum_steps
    if saved is None or int(saved.get("world_size", world_size)) == world_size:
        return accum
    old_world, stage = int(saved["world_size"]), int(saved.get("zero_stage", 0))
    if stage >= 3:
        # Measured: DeepSpeed's universal form of a ZeRO-3 checkpoint reloads the weights exactly but
        # not the optimizer state (the first update after the resume differs), so it is refused.
        raise ValueError(f"checkpoint {where} was written by {old_world} processes under ZeRO-3, whose optimizer "
                         f"state does not survive DeepSpeed's universal conversion intact; resume it on "
                         f"{old_world} processes (ZeRO 0-2 checkpoints resume on any number); this run has "
                         f"{world_size}")
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
    learned = bool(getattr(model, "learned_pos", False))
    grid, where = pretrain_grid(model.cfg, Path(path)) if learned else (None, "not used")
    report = load(model, path, part=part, strict=strict, source_grid=grid).to_dict()
    if learned:
        report["pos_embed"] = {**report["pos_embed"], "grid_from": where}
    return report


def _batch_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def _grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) \
        if grads else 0.0


def _batch_len(batch: dict[str, Any]) -> int:
    key = next((k for k in ("video", "image", "text") if torch.is_tensor(batch.get(k))), None)
    return int(batch[key].shape[0]) if key else 0


def _tokens_in(batch: dict[str, Any], out: dict[str, Any], fallback: int) -> int:
    n = 0
    mask = out.get("mask") if isinstance(out, dict) else None
    if torch.is_tensor(mask) and mask.ndim == 2:
        n += mask.numel()
    else:
        key = next((k for k in ("video", "image") if k in batch), None)
        n += fallback * (batch[key].shape[0] if key else 0)
    if torch.is_tensor(batch.get("text")):
        n += batch["text"].numel()
    return n


DATA_WAIT_WARN = 0.2  # share of step time waiting for the loader past which the run warns (once)


def timed_batches(loader: Any, wait: dict[str, float]) -> Iterator[Any]:
    """The loader's batches; the time spent waiting for each is added to ``wait["s"]``."""
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        wait["s"] += time.perf_counter() - t0
        yield batch


def build_mixup(cfg: DictConfig, mcfg: Any) -> Any:
    """timm's Mixup/CutMix for fine-tuning (soft labels with smoothing), or None."""
    if cfg.train.mixup <= 0 and cfg.train.cutmix <= 0:
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=cfg.train.mixup, cutmix_alpha=cfg.train.cutmix,
                 label_smoothing=mcfg.label_smoothing, num_classes=mcfg.num_classes)


def apply_mixup(mixup: Any, batch: dict[str, Any]) -> dict[str, Any]:
    key = "video" if "video" in batch else "image"
    x = batch[key]
    # timm's cutmix cuts the last two axes; fold time into channels so videos get one box on H x W.
    flat = x.flatten(1, 2) if x.ndim == 5 else x
    flat, target = mixup(flat, batch["label"])
    return {**batch, key: flat.view_as(x), "label": target}


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
    import deepspeed

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
    init_report = None
    if cfg.init_from:
        init_report = load_init_weights(model, cfg.init_from, strict=cfg.init_strict, part=cfg.init_part)
        if D.is_main():
            log.info("init_from %s: missing %s, unexpected %s, position table %s", cfg.init_from,
                     init_report["missing"], init_report["unexpected"], init_report.get("pos_embed", "-"))
            (out_dir / "init_report.json").write_text(json.dumps({"init_from": cfg.init_from, **init_report}, indent=1))
    if cfg.train.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    # Dropout / drop-path draws differ between ranks (their samples differ too).
    torch.manual_seed(mix_seed(seed, rank, "train"))

    # Resuming on another number of processes keeps the global batch: accumulation adjusts.
    candidates = resume_candidates(cfg.resume, out_dir) if cfg.resume else []
    saved = read_train_state(candidates[0]) if candidates else None
    accum = resume_accum_steps(saved, cfg, world, str(candidates[0]) if candidates else "")
    elastic = saved is not None and int(saved.get("world_size", world)) != world
    if elastic and hasattr(dataset, "make_batch_sampler"):
        raise ValueError(f"checkpoint {candidates[0]} was written by {saved['world_size']} processes; this data "
                         f"source's batch sampler keeps a position per rank, so it resumes on that many only")
    if elastic and D.is_main():
        log.info("resuming a checkpoint of %d processes on %d: %d accumulation steps keep its %d items per step",
                 saved["world_size"], world, accum, saved["global_batch"])
    # A dataset may bring its own batch sampler (e.g. OmniMAE's image/video mixing); else shuffled shards.
    if hasattr(dataset, "make_batch_sampler"):
        batch_sampler = dataset.make_batch_sampler(cfg.data.batch_size, world, rank, seed)
    else:
        batch_sampler = ResumableBatchSampler(len(dataset), cfg.data.batch_size, world, rank, shuffle=True, seed=seed)
    collate = MaskCollator(spec.make_mask_fn(mcfg) if spec.make_mask_fn else None, seed=seed,
                           collate=getattr(dataset, "collate_fn", collate_dicts))
    loader_gen = torch.Generator()
    loader = DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=cfg.data.num_workers,
                        generator=loader_gen, pin_memory=device.type == "cuda", persistent_workers=False)
    batch_sampler.set_epoch(0)
    batches_per_epoch = len(batch_sampler)
    if batches_per_epoch < accum:
        raise ValueError(f"the dataset gives {batches_per_epoch} batches of {cfg.data.batch_size} per process, "
                         f"fewer than {accum} accumulation steps; lower data.batch_size")
    steps_per_epoch = batches_per_epoch // accum
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else cfg.train.epochs * steps_per_epoch
    warmup = cfg.optim.warmup_steps if cfg.optim.warmup_steps >= 0 else int(cfg.optim.warmup_epochs * steps_per_epoch)
    base_lr = effective_lr(cfg, world, accum)

    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay)
    for g in groups:
        g.pop("names")
    optimizer = torch.optim.AdamW(groups, lr=base_lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  fused=bool(cfg.optim.fused))
    ds_config = deepspeed_config(cfg, world, precision, accum)
    # A ZeRO 1-3 checkpoint splits its optimizer state over the ranks that wrote it: another world
    # size loads its universal form (converted once, on rank 0).
    universal = elastic and int(saved.get("zero_stage", 0)) > 0
    if universal:
        if D.is_main():
            log.info("converting %s to DeepSpeed's universal checkpoint for %d processes", candidates[0], world)
            to_universal(candidates[0])
        D.barrier()
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
        candidates = candidates[:1]
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if world == 1 and engine.zero_optimization_stage() == 0:
        # Nothing to average over one process; DeepSpeed would still flatten and copy every gradient
        # (~0.3 s of a 1.1 s ViT-B step on 2 CPU cores).
        engine.enable_backward_allreduce = False
    if cfg.train.compile:
        engine.compile()

    step, epoch, epoch_batches = 0, 0, 0
    nonfinite_total = 0
    # Unreadable inputs the datasets skipped, by batch counter (skipped_videos, skipped_images).
    skipped: dict[str, int] = {}
    loaded = load_first_readable(engine, candidates, universal=universal) if candidates else None
    if loaded is not None:
        resume_from, state = loaded
        step, epoch, epoch_batches = state["step"], state["epoch"], state["epoch_batches"]
        if "epoch_samples" in state:  # the sampler's position is global: re-cut it for this world size
            epoch_batches = int(state["epoch_samples"]) // (cfg.data.batch_size * world)
        nonfinite_total = state.get("nonfinite_total", 0)
        skipped.update(state.get("skipped", {}))
        if D.is_main():
            log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, step, epoch, epoch_batches)

    metrics = MetricsLogger(out_dir, enabled=D.is_main())
    bar = None
    if D.is_main() and cfg.train.progress:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=step, desc=f"{name}", dynamic_ncols=True)
    tokens_fallback = int(getattr(getattr(model, "encoder", None), "num_patches", 0))
    mixup = build_mixup(cfg, mcfg)

    acc: dict[str, float] = {}  # sums of loss parts over the log window, and how many steps gave each
    acc_n: dict[str, int] = {}
    window_samples = window_tokens = 0
    window_start = time.perf_counter()
    window_steps = 0
    data_wait = {"s": 0.0}  # seconds this window spent waiting for the loader
    step_flops: float | None = None  # model FLOPs of one optimizer step on this rank (counted once)
    peak_tflops, peak_source = device_peak_tflops(device, precision)
    if D.is_main():
        log.info("mfu in metrics.jsonl is relative to %.1f TFLOP/s (%s)", peak_tflops, peak_source)
    wait_warned = False
    windows_logged = 0
    consecutive_bad = 0
    micro = 0
    last_batch: dict[str, Any] | None = None
    last_out: dict[str, Any] | None = None
    last_record: dict[str, Any] = {}
    last_ckpt: Path | None = None
    saved_at = -1  # the step of the last checkpoint this invocation wrote
    stop_signum = 0  # a stop signal any rank received, as agreed at the last micro-batch
    grad_norm = float("nan")

    def set_lr(s: int) -> float:
        lr = lr_at(s, base_lr=base_lr, min_lr=cfg.optim.min_lr, warmup_steps=warmup, total_steps=total_steps)
        for g in engine.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def checkpoint_now() -> Path:
        client = {"step": step, "epoch": epoch, "epoch_batches": epoch_batches,
                  "epoch_samples": epoch_batches * cfg.data.batch_size * world, "world_size": world,
                  "global_batch": cfg.data.batch_size * accum * world, "zero_stage": engine.zero_optimization_stage(),
                  "nonfinite_total": nonfinite_total, "skipped": dict(skipped)}
        return save_checkpoint(engine, out_dir, step, client, cfg.train.keep_last)

    # DeepSpeed reports the gradient norm except with fp32 weights, no ZeRO and no clipping.
    measure_own_norm = engine.zero_optimization_stage() == 0 and precision in ("fp32", "bf16") and not cfg.optim.clip_grad
    engine.train()
    lr = set_lr(step)
    end_step = min(total_steps, cfg.train.stop_at_step) if cfg.train.stop_at_step > 0 else total_steps
    while step < end_step:
        batch_sampler.set_epoch(epoch, start_batch=epoch_batches)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        collate.set_epoch(epoch)
        loader_gen.manual_seed(mix_seed(seed, epoch, "workers"))
        for batch in timed_batches(loader, data_wait):
            epoch_batches += 1
            for k, v in batch.items():
                if k.startswith("skipped_") and isinstance(v, int):
                    skipped[k] = skipped.get(k, 0) + v
            batch = _batch_to(batch, device)
            if mixup is not None:
                batch = apply_mixup(mixup, batch)
            if micro % accum == 0:
                lr = set_lr(step)
            if step_flops is None:
                # Forward FLOPs of this micro-batch, once; a training step is ~3x (backward ~2x forward).
                with torch.no_grad():
                    step_flops = 3.0 * accum * count_flops(lambda: engine(batch), engine.module)
            out = engine(batch)
            loss = out["loss"]
            # One collective per micro-batch agrees on both: a non-finite loss anywhere, a stop signal anywhere.
            bad, signalled = D.all_reduce_max(0.0 if torch.isfinite(loss).all() else 1.0, float(stop_flag["signum"]))
            finite, stop_signum = bad == 0.0, int(signalled)
            if not finite:
                # Every rank skips this batch (they agreed above), so DeepSpeed's counters stay aligned.
                nonfinite_total += 1
                consecutive_bad += 1
                if D.is_main():
                    log.warning("non-finite loss at step %d (%d in a row); batch skipped", step, consecutive_bad)
                if consecutive_bad >= cfg.train.max_nonfinite:
                    raise NonFiniteLossError(f"{consecutive_bad} consecutive non-finite losses at step {step} "
                                             f"(train.max_nonfinite={cfg.train.max_nonfinite}); stopping")
                continue
            consecutive_bad = 0
            engine.backward(loss)
            own_norm = None
            if measure_own_norm and (micro + 1) % accum == 0:
                own_norm = _grad_norm(engine.module)  # grads are reduced and complete at the boundary
            engine.step()
            micro += 1
            for k, v in out.items():
                if k == "loss" or k.endswith("_loss"):
                    acc[k] = acc.get(k, 0.0) + float(v.detach().float())
                    acc_n[k] = acc_n.get(k, 0) + 1
            window_samples += _batch_len(batch)
            window_tokens += _tokens_in(batch, out, tokens_fallback)
            last_batch, last_out = batch, out
            if micro % accum != 0:
                continue
            step += 1
            window_steps += 1
            gn = engine.get_global_grad_norm()
            gn = gn if gn is not None else own_norm
            grad_norm = float(gn) if gn is not None else float("nan")
            if bar is not None:
                bar.update(1)
            if step % cfg.train.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                wait_share = D.all_reduce_sum(data_wait["s"] / elapsed) / world
                step_time = elapsed / max(window_steps, 1)
                means = D.all_reduce_weighted_mean(acc, acc_n)
                samples = D.all_reduce_sum(window_samples)
                tokens = D.all_reduce_sum(window_tokens)
                skipped_all = D.all_reduce_counts(skipped)
                last_record = {"step": step, "epoch": epoch + epoch_batches / batches_per_epoch, **means,
                               "lr": lr, "grad_norm": grad_norm, "samples_per_s": samples / elapsed,
                               "tokens_per_s": tokens / elapsed, "step_time_s": step_time,
                               "data_wait_share": wait_share,
                               "mfu": (step_flops or 0.0) / step_time / (peak_tflops * 1e12), **skipped_all,
                               "nonfinite_steps": nonfinite_total}
                metrics.log(last_record)
                if bar is not None:
                    bar.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}", sps=f"{samples / elapsed:.1f}")
                windows_logged += 1
                if wait_share > DATA_WAIT_WARN and windows_logged > 1 and not wait_warned and D.is_main():
                    wait_warned = True  # the first window pays worker start-up, so it is not judged
                    log.warning("%.0f%% of step time is spent waiting for data (data_wait_share %.2f): raise "
                                "data.num_workers, use repeated sampling (data.num_samples), or re-encode the "
                                "videos for fast seeking (tools/prepare_videos.py)", 100 * wait_share, wait_share)
                acc, acc_n, window_samples, window_tokens = {}, {}, 0, 0
                window_steps, data_wait["s"] = 0, 0.0
                window_start = time.perf_counter()
            if cfg.train.vis_every and step % cfg.train.vis_every == 0 and D.is_main():
                _save_picture(engine.module, last_batch, last_out, out_dir, step, metrics)
            if step % cfg.train.ckpt_every == 0 and step < end_step:
                last_ckpt, saved_at = checkpoint_now(), step
            # Every rank stops at the same step if any of them was signalled (agreed with the loss check).
            signum = stop_signum
            if signum and step < end_step:
                if saved_at != step:
                    last_ckpt, saved_at = checkpoint_now(), step
                metrics.close()
                if bar is not None:
                    bar.close()
                if D.is_main():
                    log.warning("%s received: checkpointed step %d to %s; resume=auto continues",
                                signal.Signals(signum).name, step, last_ckpt)
                raise Preempted(step, last_ckpt, signum)
            if step >= end_step:
                break
        else:
            epoch += 1
            epoch_batches = 0
            continue
        break

    if bar is not None:
        bar.close()
    if last_ckpt is None or saved_at != step:
        last_ckpt, saved_at = checkpoint_now(), step
    if D.is_main() and last_batch is not None:
        _save_picture(engine.module, last_batch, last_out, out_dir, step, metrics)
    state = consolidated_state_dict(engine, last_ckpt)
    if D.is_main() and state is not None:
        save_safetensors(state, out_dir / "model.safetensors")
    metrics.close()
    D.barrier()
    return {"step": step, "last": last_record, "output_dir": str(out_dir), "checkpoints":
            [str(p) for p in complete_checkpoints(out_dir)], "init_report": init_report}


def _save_picture(model: torch.nn.Module, batch: dict[str, Any] | None, out: dict[str, Any] | None,
                  out_dir: Path, step: int, metrics: MetricsLogger) -> None:
    if batch is None or out is None:
        return
    try:
        panel = panel_for(model, batch, out)
    except Exception as e:  # a picture must never stop a run
        log.warning("could not draw the reconstruction picture at step %d: %s", step, e)
        return
    if panel is not None:
        save_png(panel, out_dir / "vis" / f"step_{step:08d}.png")
        metrics.add_image("reconstruction", panel, step)
