"""Benchmarks that print figures (never assertions).

Training steps:  python tools/benchmark.py --config image_mae.yaml [--vs-hf] [--precision bf16|fp32] [key=value ...]
  Times full training steps (forward, backward, AdamW step) after warm-up and reports samples/s,
  tokens/s, achieved TFLOP/s (FLOPs counted by torch's FlopCounterMode on one step) and its share of the
  matmul peak measured on the spot at the same precision. ``--vs-hf`` also builds the Hugging Face
  transformers counterpart (ViTMAEForPreTraining / VideoMAEForPreTraining) at the same sizes, batch,
  mask ratio and precision, times both alternately in the same run and prints the ratio.
Data loading:    python tools/benchmark.py --data video_mae_tiny.yaml [--reencoded DIR] [key=value ...]
  Clips/s of the configured training loader, in total and per worker, for data.num_samples 1 and 4,
  with every usable backend: decord, PyAV, torchcodec on CPU and, with a GPU, torchcodec decoding on
  CUDA (in the loading process); for the original videos and, with ``--reencoded`` (an output folder
  of tools/prepare_videos.py), the re-encoded ones. ``decode_once`` compares, per video, one read of
  the union of 4 clips' frames (what the dataset does) with 4 separate decodes, for shared and
  independent windows.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from contextlib import nullcontext
from typing import Any, Callable

import torch

from mmmae.engine.perf import count_flops, matmul_peak_tflops, spec_peak_tflops

log = logging.getLogger("mmmae.benchmark")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class StepRunner:
    """One implementation's training step: forward, backward, optimizer step."""

    def __init__(self, name: str, model: torch.nn.Module, make_batch: Callable[[], dict], loss_of: Callable,
                 precision: str, device: torch.device, fused_adamw: bool) -> None:
        self.name, self.model, self.make_batch, self.loss_of = name, model.to(device).train(), make_batch, loss_of
        self.device, self.precision = device, precision
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                     fused=fused_adamw)
        self.batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in make_batch().items()}
        self.times: list[float] = []
        self.losses: list[float] = []

    def autocast(self) -> Any:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.loss_of(self.model, self.batch)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def timed_step(self) -> None:
        _sync(self.device)
        t0 = time.perf_counter()
        self.losses.append(self.step())
        _sync(self.device)
        self.times.append(time.perf_counter() - t0)

    def flops_per_step(self) -> float:
        """FLOPs of one forward + backward."""
        def step() -> None:
            self.opt.zero_grad(set_to_none=True)
            with self.autocast():
                loss = self.loss_of(self.model, self.batch)
            loss.backward()
        flops = count_flops(step, self.model)
        self.opt.zero_grad(set_to_none=True)
        return flops


def _ours(cfg: Any, batch_size: int, device: torch.device, seed: int) -> tuple[torch.nn.Module, Callable[[], dict], int]:
    from mmmae.config import model_cfg
    from mmmae.registry import build_from_cfg, get_spec

    mcfg = model_cfg(cfg.model)
    torch.manual_seed(seed)
    model = build_from_cfg(cfg.model.name, mcfg)
    spec = get_spec(cfg.model.name)

    def make_batch() -> dict:
        return spec.example(mcfg, batch_size, torch.Generator().manual_seed(seed))

    return model, make_batch, int(model.encoder.num_patches)


def _hf(cfg: Any, ours_batch: Callable[[], dict], device: torch.device, seed: int) -> tuple[torch.nn.Module, Callable, Callable]:
    """The transformers counterpart at the same sizes, fed the same pixels and the same mask."""
    from mmmae.config import model_cfg
    mcfg = model_cfg(cfg.model)
    torch.manual_seed(seed)
    common = dict(hidden_size=mcfg.embed_dim, num_hidden_layers=mcfg.depth, num_attention_heads=mcfg.num_heads,
                  intermediate_size=int(mcfg.embed_dim * mcfg.mlp_ratio), image_size=mcfg.img_size,
                  patch_size=mcfg.patch_size, num_channels=mcfg.in_chans, layer_norm_eps=1e-6,
                  decoder_hidden_size=mcfg.decoder_embed_dim, decoder_num_hidden_layers=mcfg.decoder_depth,
                  decoder_num_attention_heads=mcfg.decoder_num_heads,
                  decoder_intermediate_size=int(mcfg.decoder_embed_dim * mcfg.mlp_ratio),
                  norm_pix_loss=mcfg.norm_pix_loss)
    if "video" in ours_batch():
        from transformers import VideoMAEConfig, VideoMAEForPreTraining
        hcfg = VideoMAEConfig(num_frames=mcfg.num_frames, tubelet_size=mcfg.tubelet_size, **common)
        model = VideoMAEForPreTraining(hcfg)

        def loss_of(m: torch.nn.Module, batch: dict) -> torch.Tensor:
            return m(pixel_values=batch["video"].transpose(1, 2), bool_masked_pos=batch["mask"]).loss
        return model, ours_batch, loss_of
    from transformers import ViTMAEConfig, ViTMAEForPreTraining
    model = ViTMAEForPreTraining(ViTMAEConfig(mask_ratio=mcfg.mask_ratio, **common))

    def make_batch() -> dict:
        b = ours_batch()
        # ViTMAE keeps the tokens with the smallest noise: noise = mask gives exactly our mask.
        return {"image": b["image"], "noise": b["mask"].float() + torch.rand(b["mask"].shape) * 1e-3}

    def loss_of(m: torch.nn.Module, batch: dict) -> torch.Tensor:
        return m(pixel_values=batch["image"], noise=batch["noise"]).loss
    return model, make_batch, loss_of


def _device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and whether it has native bf16 (AMX / AVX512-BF16)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "unknown CPU"
    flags: set[str] = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    native = sorted(flags & {"amx_bf16", "avx512_bf16"})
    return f"{model} ({'native bf16: ' + ', '.join(native) if native else 'no native bf16'})"


def bench_steps(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    from mmmae.config import load_config

    cfg = load_config(args.config, overrides)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = args.batch or cfg.data.batch_size
    model, make_batch, tokens_per_sample = _ours(cfg, batch_size, device, args.seed)
    # Like with like: both implementations step the same optimizer (fused AdamW unless --adamw plain).
    fused = args.adamw == "fused"
    runners = [StepRunner("mmmae", model, make_batch, lambda m, b: m(b)["loss"], args.precision, device,
                          fused_adamw=fused)]
    if args.vs_hf:
        hf_model, hf_batch, hf_loss = _hf(cfg, make_batch, device, args.seed)
        runners.append(StepRunner("hf", hf_model, hf_batch, hf_loss, args.precision, device,
                                  fused_adamw=fused))
    # One FLOP count for every implementation: ours, counted by torch's FlopCounterMode (the same
    # architecture; counting Hugging Face's own graph would miss its attention on CPU, whose fused
    # kernel the counter does not know), so TFLOP/s compare like with like.
    flops = runners[0].flops_per_step()
    for r in runners:
        for _ in range(args.warmup):
            r.step()
    # Alternate implementations step by step so drift in machine load hits both alike.
    for _ in range(args.steps):
        for r in runners:
            r.timed_step()
    peak = matmul_peak_tflops(torch.bfloat16 if args.precision == "bf16" else torch.float32, device)
    spec = spec_peak_tflops(device)
    report: dict[str, Any] = {"config": args.config, "overrides": overrides, "batch": batch_size,
                              "precision": args.precision, "device": str(device), "device_name": _device_name(device),
                              "threads": torch.get_num_threads(), "adamw": args.adamw,
                              "matmul_peak_tflops": peak, "spec_peak_tflops": spec[0] if spec else None,
                              "results": {}}
    for r in runners:
        t = statistics.median(r.times)
        tflops = flops / t / 1e12
        report["results"][r.name] = {
            "step_s_median": t, "samples_per_s": batch_size / t, "tokens_per_s": batch_size * tokens_per_sample / t,
            "tflops": tflops, "peak_share": tflops / peak, "gflop_per_step": flops / 1e9,
            "mfu_vs_spec": tflops / spec[0] if spec else None,
            "first_loss": r.losses[0], "last_loss": r.losses[-1],
        }
    if args.vs_hf:
        report["speedup_vs_hf"] = report["results"]["mmmae"]["samples_per_s"] / report["results"]["hf"]["samples_per_s"]
    return report


def _data_backends() -> list[tuple[str, str]]:
    """(backend, decode device) pairs usable here: decord, PyAV, torchcodec on CPU, and on CUDA with a GPU."""
    from mmmae.video.decoding import available_backends

    usable = available_backends()
    pairs = [(b, "cpu") for b in ("decord", "pyav", "torchcodec") if b in usable]
    if "torchcodec" in usable and torch.cuda.is_available():
        pairs.append(("torchcodec", "cuda"))
    return pairs


def _time_loader(dataset: Any, cfg: Any, batches: int, augment: Any = None) -> tuple[float, int]:
    """Clips/s of a DataLoader over ``dataset`` after its first batch (worker start-up), cycling epochs
    until ``batches`` batches are timed; ``augment``: the device half of ``data.gpu_augment``, run on
    every batch and timed with it. Returns (clips/s, clips timed)."""
    from torch.utils.data import DataLoader

    from mmmae.data.collate import collate_dicts

    workers = cfg.data.num_workers
    loader = DataLoader(dataset, batch_size=cfg.data.batch_size, shuffle=True, num_workers=workers,
                        collate_fn=collate_dicts, generator=torch.Generator().manual_seed(0),
                        persistent_workers=workers > 0)
    seen, clips, t0 = 0, 0, 0.0
    while seen <= batches:
        for batch in loader:
            if augment is not None:
                batch = augment(batch)
                _sync(augment.device)
            if seen == 0:
                t0 = time.perf_counter()
            else:
                clips += batch["video"].shape[0]
            seen += 1
            if seen > batches:
                break
    dt = time.perf_counter() - t0
    return (clips / dt if dt > 0 and clips else float("nan")), clips


def _time_decode_once(items: list[tuple[str, int]], sampler: Any, backend: str, device: str, k: int,
                      repeat_mode: str) -> dict[str, Any]:
    """Per readable video: K clips' frames read in one call on one reader (what VideoClipDataset does)
    against K readers each reading one clip (K independent decodes). Times summed over the videos."""
    from mmmae.data.sampler import mix_seed
    from mmmae.video.decoding import VideoDecodeError, open_video

    once = independent = 0.0
    videos = 0
    for n, (path, _) in enumerate(items):
        try:
            with open_video(path, backend, device=device) as reader:
                frames = reader.num_frames
            g = torch.Generator().manual_seed(mix_seed(0, n))
            draws = k if repeat_mode == "independent" else 1
            clips = [sampler.train(frames, g) for _ in range(draws)] * (k // draws)
            union = sorted({i for c in clips for i in c})
            t0 = time.perf_counter()
            with open_video(path, backend, device=device) as reader:
                reader.read(union)
            _sync(torch.device(device))
            t1 = time.perf_counter()
            for clip in clips:
                with open_video(path, backend, device=device) as reader:
                    reader.read(clip)
            _sync(torch.device(device))
            t2 = time.perf_counter()
        except VideoDecodeError:
            continue  # unreadable videos are skipped by the dataset too
        once += t1 - t0
        independent += t2 - t1
        videos += 1
    return {"repeat_mode": repeat_mode, "num_samples": k, "videos": videos, "union_read_s": once,
            "independent_reads_s": independent, "speedup": independent / once if once > 0 else float("nan")}


def bench_data(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    from mmmae.config import load_config, model_cfg
    from mmmae.data.registry import build_dataset

    sources: list[tuple[str, list[str]]] = [("original", [])]
    if args.reencoded:
        # A tools/prepare_videos.py output folder: its list (paths relative to it) replaces data.train_list.
        with open(os.path.join(args.reencoded, "prepare_report.json"), encoding="utf-8") as f:
            listed = json.load(f)["list"]
        sources.append(("reencoded", [f"data.root={os.path.abspath(args.reencoded)}",
                                      f"data.train_list={os.path.join(os.path.abspath(args.reencoded), listed)}"]))
    from mmmae.data.registry import get_source

    loaders, decode_once = [], []
    train_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for source, extra in sources:
        for n_backend, (backend, device) in enumerate(_data_backends()):
            label = backend if backend != "torchcodec" else f"torchcodec-{device}"
            # GPU decoding runs in the loading process (CUDA does not survive forked workers).
            gpu = ["data.num_workers=0"] if device == "cuda" else []
            # Augmentation on the CPU workers, and (for the first backend) on the training device.
            runs = [(k, "cpu") for k in (1, 4)] + ([(k, "device") for k in (1, 4)] if n_backend == 0 else [])
            for num_samples, where in runs:
                cfg = load_config(args.data, [*overrides, *extra, *gpu, f"data.backend={backend}",
                                              f"data.decode_device={device}", f"data.num_samples={num_samples}",
                                              f"data.gpu_augment={where == 'device'}"])
                mcfg = model_cfg(cfg.model)
                ds = build_dataset(cfg, "train", mcfg)
                augment = get_source(cfg.data.dataset).device_transform(cfg, mcfg, train_device) \
                    if where == "device" else None
                rate, clips = _time_loader(ds, cfg, args.batches, augment)
                workers = cfg.data.num_workers
                loaders.append({"source": source, "backend": label, "num_samples": num_samples, "workers": workers,
                                "augment": "cpu workers" if where == "cpu" else f"device ({train_device.type})",
                                "clips_timed": clips, "clips_per_s": rate,
                                "clips_per_s_per_worker": rate / max(workers, 1),
                                "videos_decoded_per_s": rate / num_samples})
            for repeat_mode in ("shared_window", "independent"):
                row = _time_decode_once(ds.items, ds.sampler, backend, device, 4, repeat_mode)
                decode_once.append({"source": source, "backend": label, **row})
    return {"config": args.data, "overrides": overrides, "cpu_threads": torch.get_num_threads(),
            "results": loaders, "decode_once": decode_once}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="training config to time (path or packaged name)")
    p.add_argument("--data", help="config whose data loader to time")
    p.add_argument("--vs-hf", action="store_true", help="time the Hugging Face counterpart in the same run")
    p.add_argument("--adamw", default="fused", choices=["fused", "plain"],
                   help="the optimizer both implementations step (the same on both sides)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--batch", type=int, default=0, help="batch size (default: data.batch_size)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batches", type=int, default=8, help="loader batches to time with --data")
    p.add_argument("--reencoded", default="", help="with --data: a tools/prepare_videos.py output folder to time too")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the report here")
    args, overrides = p.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not args.config and not args.data:
        p.error("give --config (training steps) or --data (loader)")
    report = bench_data(args, overrides) if args.data else bench_steps(args, overrides)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
