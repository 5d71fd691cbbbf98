"""Does it learn? A small, reproducible study on real data: pretrained encoders against the same
encoders trained from scratch, scored on held-out items the pretraining never saw.

Images (Fashion-MNIST, 28 px, patch 4): MAE pretrains on the train file through the engine
(:func:`mmmae.engine.trainer.train`, one process), then the encoder is fine-tuned and linearly probed
on a random 1% / 10% / 100% of the train labels; the same classifier trained from a random
initialisation with the same fine-tuning budget (steps x batch) is the baseline. Sweeps: MAE's mask
ratio, and MAE against SimMIM at the same pretraining compute (SimMIM's steps are MAE's times the ratio
of their forward FLOPs per step, counted by torch's FLOP counter on the same batch size).

Videos (moving Fashion-MNIST, ``data.dataset: moving_fashion_mnist``; its module documents how clips are
made): VideoMAE pretrains on the train clips, then is fine-tuned; against scratch, tube against random
masking, 0.9 against 0.75.

Every point is run for each seed of the plan; the seed sets the weights' initialisation, data order,
masks and the labelled subset. Test accuracy is on Fashion-MNIST's own test file (or clips made only
of its items), which no stage trains on.

Where the study uses its own loop: fine-tuning and linear probes, and the video pretraining. The
engine's fixed cost per run (DeepSpeed engine, FLOP count, matmul peak, checkpoint) is several seconds,
comparable with a whole fine-tuning run at this size, and VideoMAE's registered mask maker is the tube
mask only: one loop for both video arms keeps the masking the only difference. The loop uses the
library's parts: models from the registry through the config system, ``init_from``'s weight loading
(:func:`mmmae.engine.trainer.load_init_weights`), the engine's AdamW parameter groups (no decay on
norms, biases, tables; layer-wise lr decay) and warmup + cosine schedule, the precision rule, the
registered data sources, and the library's mask makers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from mmmae.config import load_config, model_cfg
from mmmae.data.collate import collate_dicts
from mmmae.data.registry import build_dataset
from mmmae.data.sampler import mix_seed
from mmmae.engine.checkpoint import save_safetensors
from mmmae.engine.optim import lr_at, param_groups
from mmmae.engine.perf import count_flops
from mmmae.engine.trainer import load_init_weights, resolve_precision, train
from mmmae.masking import num_masked_floor, random_mask
from mmmae.registry import build_from_cfg, get_spec, resolve_model_cfg

log = logging.getLogger("mmmae.study")

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
# The encoder fields a classifier takes from the pretraining model it starts from (its trunk).
TRUNK_FIELDS = ("pos_embed", "rel_pos_bias", "qkv_bias", "init_values", "cls_token")


# --- Plans --------------------------------------------------------------------------------------------

@dataclass
class EncoderPlan:
    embed_dim: int = 192  # ViT-Ti's width and heads, 4 of its 12 blocks
    depth: int = 4
    num_heads: int = 3
    mlp_ratio: float = 4.0


@dataclass
class ImagePlan:
    img_size: int = 28
    patch_size: int = 4
    decoder_embed_dim: int = 64  # MAE's decoder, scaled down with the encoder
    decoder_depth: int = 1
    decoder_num_heads: int = 4
    # Raw (normalised-image) pixels: at this scale they gave better fine-tuning than per-patch
    # normalised targets, whose near-constant 4-px patches carry little signal.
    norm_pix_loss: bool = False
    pretrain_steps: int = 1000  # MAE's; SimMIM gets the same compute
    pretrain_batch: int = 32
    pretrain_lr: float = 1e-3
    # The cosine ends here: MAE leaves its early plateau (predicting the mean image) after some 400
    # steps at a high lr; decaying to 0 within a short run keeps it there.
    pretrain_min_lr: float = 5e-4
    min_scale: float = 0.35  # pretraining crops (RandomResizedCrop from this share of the image)
    main_ratio: float = 0.75
    mask_ratios: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)
    simmim: bool = True
    simmim_ratio: float = 0.6  # SimMIM's own ratio; its 32-px blocks on 224 px are one 4-px patch at 28 px
    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    sweep_fraction: float = 0.1  # labels the mask-ratio and SimMIM points are scored with
    probe: bool = True
    finetune_steps: int = 200
    finetune_batch: int = 64
    finetune_lr: float = 1e-3
    layer_decay: float = 0.75  # pretrained encoders only (MAE's fine-tuning rule)
    shift: int = 2  # fine-tuning augmentation: random shifts up to this many pixels, and flips
    probe_steps: int = 300
    probe_lr: float = 1e-2
    test_items: int = 10000


@dataclass
class VideoPlan:
    img_size: int = 32
    patch_size: int = 8
    num_frames: int = 8
    tubelet_size: int = 2
    decoder_embed_dim: int = 128
    decoder_depth: int = 2
    decoder_num_heads: int = 4
    norm_pix_loss: bool = False  # as for images: raw pixels served fine-tuning better at this scale
    train_clips: int = 10000
    val_clips: int = 2000
    pretrain_steps: int = 600
    pretrain_batch: int = 64
    pretrain_lr: float = 1.5e-3
    pretrain_min_lr: float = 7.5e-4
    # (mask, ratio): the first is the main one that the scratch baseline is compared with.
    variants: tuple[tuple[str, float], ...] = (("tube", 0.9), ("random", 0.9), ("tube", 0.75))
    finetune_clips: int = 10000
    finetune_steps: int = 300
    finetune_batch: int = 64
    finetune_lr: float = 1e-3
    layer_decay: float = 0.75


@dataclass
class StudyPlan:
    name: str
    seeds: tuple[int, ...] = (0, 1)
    encoder: EncoderPlan = field(default_factory=EncoderPlan)
    image: ImagePlan | None = field(default_factory=ImagePlan)
    video: VideoPlan | None = field(default_factory=VideoPlan)
    root: str = FASHION_MNIST


def full_plan(seed: int = 0) -> StudyPlan:
    """Every point of the study (about 45 minutes on 2 idle CPU cores)."""
    return StudyPlan("full", seeds=(seed, seed + 1))


def quick_plan(seed: int = 0) -> StudyPlan:
    """The smallest variant that still shows the effect clearly: a smaller encoder, MAE against scratch
    at 1% and 10% of the labels, two seeds, no sweeps, no probe, no video (2-3 minutes)."""
    image = ImagePlan(pretrain_steps=600, mask_ratios=(0.75,), simmim=False, fractions=(0.01, 0.1), probe=False,
                      finetune_steps=100, finetune_batch=32, test_items=2000)
    return StudyPlan("quick", seeds=(seed, seed + 1), encoder=EncoderPlan(128, 4, 4), image=image, video=None)


PLANS: dict[str, Callable[[int], StudyPlan]] = {"full": full_plan, "quick": quick_plan}


# --- Small shared parts -------------------------------------------------------------------------------

def _autocast(precision: str) -> Any:
    return torch.autocast("cpu", torch.bfloat16) if precision == "bf16" else nullcontext()


def _batches(dataset: Dataset, batch_size: int, seed: int) -> Iterator[dict[str, Any]]:
    """Shuffled batches, epoch after epoch, in an order fixed by ``seed``."""
    n = len(dataset)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=min(batch_size, n), shuffle=True, drop_last=True, generator=g,
                        collate_fn=collate_dicts, num_workers=0)
    while True:
        yield from loader


def _stack(dataset: Dataset, key: str, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs and labels of a dataset's first ``limit`` items (all with 0) as two tensors."""
    n = len(dataset) if not limit else min(limit, len(dataset))  # type: ignore[arg-type]
    xs, ys = [], []
    for batch in DataLoader(Subset(dataset, range(n)), batch_size=500, collate_fn=collate_dicts):
        xs.append(batch[key])
        ys.append(batch["label"])
    return torch.cat(xs), torch.cat(ys)


def fit(model: nn.Module, batches: Iterator[dict[str, Any]], *, steps: int, lr: float, precision: str,
        min_lr: float = 0.0, weight_decay: float = 0.05, layer_decay: float = 1.0, warmup: int | None = None,
        before: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        groups: list[dict[str, Any]] | None = None) -> float:
    """Train ``model`` for ``steps`` AdamW steps over the engine's parameter groups (or ``groups``) and
    schedule (linear warmup, ``steps // 10`` by default, then cosine to ``min_lr``); returns the mean loss of the
    last tenth of the steps. ``before`` may add to each batch (e.g. masks)."""
    if groups is None:
        groups = param_groups(model, weight_decay, layer_decay)  # type: ignore[arg-type]
        for g in groups:
            g.pop("names")
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=True)
    warmup = max(steps // 10, 1) if warmup is None else warmup
    model.train()
    tail: list[float] = []
    for step in range(steps):
        rate = lr_at(step, base_lr=lr, min_lr=min_lr, warmup_steps=warmup, total_steps=steps)
        for g in opt.param_groups:
            g["lr"] = rate * g["lr_scale"]
        batch = next(batches)
        if before is not None:
            batch = before(batch)
        with _autocast(precision):
            loss = model(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= steps - max(steps // 10, 1):
            tail.append(float(loss.detach()))
    return sum(tail) / max(len(tail), 1)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, key: str, precision: str, chunk: int = 500) -> float:
    """Top-1 accuracy (%) of a classifier on inputs ``x`` under ``key`` ("image" / "video")."""
    model.eval()
    right = 0
    for i in range(0, len(x), chunk):
        with _autocast(precision):
            logits = model({key: x[i:i + chunk]})["logits"]
        right += int((logits.argmax(-1) == y[i:i + chunk]).sum())
    return 100.0 * right / len(x)


def machine_info() -> dict[str, Any]:
    """CPU model, whether it has AMX bf16 (bf16 matmul in hardware), threads, load, torch version."""
    cpu, flags = platform.processor() or "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu.strip("x86_64 "):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    return {"cpu": cpu, "amx_bf16": " amx_bf16" in flags, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def summarise(values: Sequence[float]) -> dict[str, float]:
    """Mean, min, max and spread (max - min) over seeds."""
    v = list(values)
    return {"mean": sum(v) / len(v), "min": min(v), "max": max(v), "spread": max(v) - min(v), "n": len(v)}


# --- The study ----------------------------------------------------------------------------------------

class Study:
    """Runs a :class:`StudyPlan` into ``out_dir``: ``results.json``, ``report.md``, PNG plots, and the
    runs (configs, pretraining run directories) under ``out_dir/runs``."""

    def __init__(self, plan: StudyPlan, out_dir: str | Path) -> None:
        self.plan, self.out = plan, Path(out_dir)
        self.runs_dir = self.out / "runs"
        self.points: list[dict[str, Any]] = []
        self.runs: list[dict[str, Any]] = []
        self._cache: dict[str, Any] = {}
        self.precision = resolve_precision("auto", torch.device("cpu"))

    # Configs --------------------------------------------------------------------------------------

    def _config(self, name: str, body: dict[str, Any]) -> DictConfig:
        """Write ``body`` as ``runs/configs/<name>.yaml`` (a ``base:`` recipe and what differs) and load it
        through the config system, strictly."""
        path = self.runs_dir / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(body), path)
        return load_config(path)

    def _encoder(self) -> dict[str, Any]:
        return dataclasses.asdict(self.plan.encoder)

    def _image_classifier_cfg(self, name: str, trunk: dict[str, Any], *, probe: bool, min_scale: float = 1.0,
                              hflip: bool = False) -> DictConfig:
        ip = self.plan.image
        return self._config(name, {
            "base": "linprobe_fashion_mnist_tiny.yaml", "output_dir": str(self.runs_dir / name),
            "model": {"name": "classifier", "size": "", "img_size": ip.img_size, "patch_size": ip.patch_size,
                      **self._encoder(), **trunk, "num_classes": 10, "linear_probe": probe, "global_pool": "avg"},
            "data": {"dataset": "fashion_mnist", "root": self.plan.root, "limit": 0, "num_workers": 0,
                     "min_scale": min_scale, "hflip": hflip}})

    # Image data -----------------------------------------------------------------------------------

    def _image_test(self) -> tuple[torch.Tensor, torch.Tensor]:
        if "image_test" not in self._cache:
            cfg = self._image_classifier_cfg("image_eval", {}, probe=False, min_scale=1.0)
            test = build_dataset(cfg, "val", model_cfg(cfg.model))  # Fashion-MNIST's t10k file
            self._cache["image_test"] = _stack(test, "image", self.plan.image.test_items)
        return self._cache["image_test"]

    def _labelled(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The seed's labelled train items for the widest label share, in the seed's random order (each
        smaller share is a prefix), as the source gives them without augmentation (``min_scale: 1``, no
        flip: the images as they are), stored in float16."""
        key = f"labelled {seed}"
        if key not in self._cache:
            ip = self.plan.image
            cfg = self._image_classifier_cfg("image_plain", {}, probe=False, min_scale=1.0, hflip=False)
            train_set = build_dataset(cfg, "train", model_cfg(cfg.model))
            order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(mix_seed(seed, "labels")))
            widest = order[:self._count(max(*ip.fractions, ip.sweep_fraction), len(train_set))].tolist()
            x, y = _stack(Subset(train_set, widest), "image")
            self._cache[key] = (x.half(), y)
            self._cache["train_items"] = len(train_set)
        return self._cache[key]

    @staticmethod
    def _count(fraction: float, total: int) -> int:
        return max(1, round(fraction * total))

    # Image stages ---------------------------------------------------------------------------------

    def pretrain_image(self, method: str, ratio: float, seed: int, steps: int) -> dict[str, Any]:
        """Pretrain with the engine on the train file; returns the run record (``weights``, ``trunk``)."""
        ip = self.plan.image
        name = f"{method}_r{ratio:g}_s{seed}"
        model: dict[str, Any] = {"size": "", "img_size": ip.img_size, "patch_size": ip.patch_size, **self._encoder(),
                                 "mask_ratio": ratio}
        if method == "mae":
            base = "image_mae.yaml"
            model.update(decoder_embed_dim=ip.decoder_embed_dim, decoder_depth=ip.decoder_depth,
                         decoder_num_heads=ip.decoder_num_heads, norm_pix_loss=ip.norm_pix_loss)
        else:
            base = "image_simmim.yaml"
            model.update(mask_patch_size=ip.patch_size)
        cfg = self._config(name, {
            "base": base, "output_dir": str(self.runs_dir / name), "model": model,
            "data": {"dataset": "fashion_mnist", "root": self.plan.root, "batch_size": ip.pretrain_batch,
                     "num_workers": 0, "min_scale": ip.min_scale, "hflip": True, "limit": 0},
            "optim": {"lr": ip.pretrain_lr, "min_lr": ip.pretrain_min_lr, "warmup_steps": max(steps // 10, 1)},
            "train": {"max_steps": steps, "seed": seed, "log_every": max(steps // 5, 1), "ckpt_every": 10**9,
                      "vis_every": 0, "keep_last": 1, "progress": False},
            "ds": {"zero_optimization": {"stage": 0}}})
        t0 = time.perf_counter()
        summary = train(cfg)
        mcfg = model_cfg(cfg.model)
        record = {"stage": "image_pretrain", "method": method, "mask_ratio": ratio, "seed": seed, "steps": steps,
                  "batch": ip.pretrain_batch, "seconds": time.perf_counter() - t0,
                  "final_loss": summary["last"].get("loss"), "run_dir": summary["output_dir"],
                  "weights": str(Path(summary["output_dir"]) / "model.safetensors"),
                  "trunk": {f: getattr(mcfg, f) for f in TRUNK_FIELDS}}
        self.runs.append(record)
        log.info("pretrained %s: loss %.4f in %.0f s", name, record["final_loss"] or float("nan"), record["seconds"])
        return record

    def _classifier(self, cfg: DictConfig, init: str | None, seed: int) -> nn.Module:
        torch.manual_seed(mix_seed(seed, "classifier init"))
        model = build_from_cfg(cfg.model.name, model_cfg(cfg.model))
        if init:
            load_init_weights(model, init)
        return model

    def finetune_image(self, pre: dict[str, Any] | None, fraction: float, seed: int, *, group: str) -> float:
        """Fine-tune a classifier (from ``pre``'s weights, or from scratch) on the seed's random ``fraction``
        of the train labels; returns held-out test accuracy (%)."""
        ip = self.plan.image
        cfg = self._image_classifier_cfg("image_finetune", pre["trunk"] if pre else {}, probe=False, min_scale=1.0)
        x, y = self._labelled(seed)
        n = self._count(fraction, self._cache["train_items"])
        model = self._classifier(cfg, pre["weights"] if pre else None, seed)
        t0 = time.perf_counter()
        batches = _TensorBatches({"image": x[:n], "label": y[:n]}, ip.finetune_batch, mix_seed(seed, "finetune data"),
                                 lambda b, g: {**b, "image": shift_flip(b["image"].float(), g, ip.shift)})
        loss = fit(model, iter(batches), steps=ip.finetune_steps, lr=ip.finetune_lr, precision=self.precision,
                   layer_decay=ip.layer_decay if pre else 1.0)
        test_x, test_y = self._image_test()
        acc = accuracy(model, test_x, test_y, "image", self.precision)
        self._point(group, "finetune", pre, fraction, seed, acc, loss=loss, seconds=time.perf_counter() - t0)
        return acc

    def probe_image(self, pre: dict[str, Any] | None, fractions: Sequence[float], seed: int, *, group: str) -> None:
        """MAE's linear probe (frozen encoder, BatchNorm + linear head) on the encoder's pooled features
        of the un-augmented labelled images, for each label share; test accuracy per share."""
        ip = self.plan.image
        cfg = self._image_classifier_cfg("image_probe", pre["trunk"] if pre else {}, probe=True, min_scale=1.0)
        model = self._classifier(cfg, pre["weights"] if pre else None, seed)
        x, y = self._labelled(seed)
        t0 = time.perf_counter()
        n_max = self._count(max(fractions), self._cache["train_items"])
        feats = self._features(model, x[:n_max])
        test_x, test_y = self._image_test()
        test_feats = self._features(model, test_x)
        head = model.head  # type: ignore[attr-defined]
        for fraction in fractions:
            n = self._count(fraction, self._cache["train_items"])
            head.init_weights()
            head.bn.reset_running_stats()
            data = _TensorBatches({"feats": feats[:n], "label": y[:n]}, ip.finetune_batch, mix_seed(seed, "probe", fraction))
            loss = fit(_Probe(head), iter(data), steps=ip.probe_steps, lr=ip.probe_lr, precision="fp32",
                       groups=[{"params": list(head.parameters()), "weight_decay": 0.0, "lr_scale": 1.0}])
            head.eval()
            with torch.no_grad():
                acc = 100.0 * float((head(test_feats).argmax(-1) == test_y).float().mean())
            self._point(group, "probe", pre, fraction, seed, acc, loss=loss, seconds=time.perf_counter() - t0)

    @torch.no_grad()
    def _features(self, model: nn.Module, x: torch.Tensor, chunk: int = 500) -> torch.Tensor:
        """Pooled frozen-encoder features (float32) of images ``x``."""
        model.eval()
        feats = []
        for i in range(0, len(x), chunk):
            with _autocast(self.precision):
                feats.append(model.forward_features(x[i:i + chunk].float()).float())  # type: ignore[attr-defined]
        return torch.cat(feats)

    # Video ----------------------------------------------------------------------------------------

    def _video_data(self) -> dict[str, Any]:
        vp = self.plan.video
        assert vp is not None
        return {"dataset": "moving_fashion_mnist", "root": self.plan.root, "train_clips": vp.train_clips,
                "val_clips": vp.val_clips, "num_workers": 0, "limit": 0}

    def _video_geometry(self) -> dict[str, Any]:
        vp = self.plan.video
        assert vp is not None
        return {"size": "", "img_size": vp.img_size, "patch_size": vp.patch_size, "num_frames": vp.num_frames,
                "tubelet_size": vp.tubelet_size, **self._encoder()}

    def pretrain_video(self, mask: str, ratio: float, seed: int) -> dict[str, Any]:
        """VideoMAE on the train clips with tube or random masks (the study's loop)."""
        vp = self.plan.video
        assert vp is not None
        name = f"videomae_{mask}{ratio:g}_s{seed}"
        cfg = self._config(name, {
            "base": "video_mae.yaml", "output_dir": str(self.runs_dir / name),
            "model": {**self._video_geometry(), "mask_ratio": ratio, "norm_pix_loss": vp.norm_pix_loss,
                      "decoder_embed_dim": vp.decoder_embed_dim,
                      "decoder_depth": vp.decoder_depth, "decoder_num_heads": vp.decoder_num_heads},
            "data": {**self._video_data(), "batch_size": vp.pretrain_batch},
            "train": {"seed": seed}})
        mcfg = model_cfg(cfg.model)
        spec = get_spec(cfg.model.name)
        torch.manual_seed(mix_seed(seed, "videomae init"))
        model = build_from_cfg(cfg.model.name, mcfg)
        g = torch.Generator().manual_seed(mix_seed(seed, "masks"))
        num_tokens = model.encoder.num_patches
        if mask == "tube":
            make = spec.make_mask_fn(mcfg)  # type: ignore[misc]

            def masks(batch: dict[str, Any]) -> dict[str, Any]:
                return {**batch, **make(len(batch["video"]), g)}
        elif mask == "random":
            def masks(batch: dict[str, Any]) -> dict[str, Any]:
                # VideoMAE's count rule (int(ratio * L) hidden), placed anywhere in space and time.
                return {**batch, "mask": random_mask(len(batch["video"]), num_tokens, ratio,
                                                     count_rule=num_masked_floor, generator=g)}
        else:
            raise ValueError(f"video mask must be 'tube' or 'random', got {mask!r}")
        train_set = build_dataset(cfg, "train", mcfg)
        t0 = time.perf_counter()
        loss = fit(model, _batches(train_set, vp.pretrain_batch, mix_seed(seed, "pretrain data")),
                   steps=vp.pretrain_steps, lr=vp.pretrain_lr, min_lr=vp.pretrain_min_lr, precision=self.precision,
                   before=masks)
        run_dir = Path(cfg.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml")
        save_safetensors(model.state_dict(), run_dir / "model.safetensors")
        record = {"stage": "video_pretrain", "method": "videomae", "mask": mask, "mask_ratio": ratio, "seed": seed,
                  "steps": vp.pretrain_steps, "batch": vp.pretrain_batch, "seconds": time.perf_counter() - t0,
                  "final_loss": loss, "run_dir": str(run_dir), "weights": str(run_dir / "model.safetensors"),
                  "trunk": {f: getattr(mcfg, f) for f in TRUNK_FIELDS}}
        self.runs.append(record)
        log.info("pretrained %s: loss %.4f in %.0f s", name, loss, record["seconds"])
        return record

    def _video_classifier_cfg(self, trunk: dict[str, Any]) -> DictConfig:
        return self._config("video_finetune", {
            "base": "finetune_kinetics.yaml", "output_dir": str(self.runs_dir / "video_finetune"),
            "model": {**self._video_geometry(), **trunk, "num_classes": 10, "drop_path_rate": 0.0,
                      "label_smoothing": 0.0},
            "data": self._video_data(), "train": {"mixup": 0.0, "cutmix": 0.0}})

    def finetune_video(self, pre: dict[str, Any] | None, seed: int, *, group: str) -> float:
        vp = self.plan.video
        assert vp is not None
        # Scratch takes VideoMAE's trunk (q/v biases, no [cls], 1-D table), as the pretrained arms do.
        trunk = pre["trunk"] if pre else {"qkv_bias": "qv", "cls_token": False, "pos_embed": "sincos_1d"}
        cfg = self._video_classifier_cfg(trunk)
        mcfg = model_cfg(cfg.model)
        train_set = build_dataset(cfg, "train", mcfg)
        labelled = Subset(train_set, range(min(vp.finetune_clips, len(train_set))))  # type: ignore[arg-type]
        model = self._classifier(cfg, pre["weights"] if pre else None, seed)
        t0 = time.perf_counter()
        loss = fit(model, _batches(labelled, vp.finetune_batch, mix_seed(seed, "finetune data")),
                   steps=vp.finetune_steps, lr=vp.finetune_lr, precision=self.precision,
                   layer_decay=vp.layer_decay if pre else 1.0)
        if "video_test" not in self._cache:
            self._cache["video_test"] = _stack(build_dataset(cfg, "val", mcfg), "video")
        x, y = self._cache["video_test"]
        acc = accuracy(model, x, y, "video", self.precision)
        self._point(group, "finetune", pre, 1.0, seed, acc, loss=loss, seconds=time.perf_counter() - t0)
        return acc

    # Records --------------------------------------------------------------------------------------

    def _point(self, group: str, protocol: str, pre: dict[str, Any] | None, fraction: float, seed: int,
               acc: float, **extra: Any) -> None:
        init = "scratch" if pre is None else (
            f"{pre['method']} {pre['mask']} {pre['mask_ratio']:g}" if "mask" in pre else f"{pre['method']} {pre['mask_ratio']:g}")
        point = {"group": group, "protocol": protocol, "init": init, "labels": fraction, "seed": seed,
                 "test_acc": acc, **extra}
        self.points.append(point)
        log.info("%s / %s / %s / labels %g / seed %d: test accuracy %.2f%%", group, protocol, init, fraction, seed, acc)

    # The whole plan -------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        plan = self.plan
        self.out.mkdir(parents=True, exist_ok=True)
        start, machine = time.perf_counter(), machine_info()
        timing: dict[str, float] = {}
        flops: dict[str, float] = {}
        simmim_steps = 0
        if plan.image is not None:
            t0 = time.perf_counter()
            flops, simmim_steps = self._run_images(plan.image)
            timing["image_s"] = time.perf_counter() - t0
        if plan.video is not None:
            t0 = time.perf_counter()
            for seed in plan.seeds:
                self.finetune_video(None, seed, group="video")
                for mask, ratio in plan.video.variants:
                    self.finetune_video(self.pretrain_video(mask, ratio, seed), seed, group="video")
            timing["video_s"] = time.perf_counter() - t0
        timing["total_s"] = time.perf_counter() - start
        results = {"plan": dataclasses.asdict(plan), "machine": {**machine, "load_average_end": list(os.getloadavg())},
                   "precision": self.precision, "timing": timing,
                   "pretrain_flops_per_step": flops, "simmim_steps": simmim_steps,
                   "runs": self.runs, "points": self.points, "summary": summary_rows(self.points),
                   "checks": pretraining_checks(self.points)}
        (self.out / "results.json").write_text(json.dumps(results, indent=1))
        write_report(results, self.out)
        return results

    def _run_images(self, ip: ImagePlan) -> tuple[dict[str, float], int]:
        flops = self._pretrain_flops()
        simmim_steps = round(ip.pretrain_steps * flops["mae"] / flops["simmim"]) if ip.simmim else 0
        for seed in self.plan.seeds:
            mae = self.pretrain_image("mae", ip.main_ratio, seed, ip.pretrain_steps)
            for pre in (mae, None):
                for fraction in ip.fractions:
                    self.finetune_image(pre, fraction, seed, group="labels")
                if ip.probe:
                    self.probe_image(pre, ip.fractions, seed, group="labels")
            if len(ip.mask_ratios) > 1:
                for ratio in ip.mask_ratios:
                    if ratio == ip.main_ratio:
                        self._copy_points("labels", "mask_ratio", mae, ip.sweep_fraction, seed)
                        continue
                    other = self.pretrain_image("mae", ratio, seed, ip.pretrain_steps)
                    self.finetune_image(other, ip.sweep_fraction, seed, group="mask_ratio")
                    if ip.probe:
                        self.probe_image(other, [ip.sweep_fraction], seed, group="mask_ratio")
            if ip.simmim:
                self._copy_points("labels", "method", mae, ip.sweep_fraction, seed)
                simmim = self.pretrain_image("simmim", ip.simmim_ratio, seed, simmim_steps)
                self.finetune_image(simmim, ip.sweep_fraction, seed, group="method")
                if ip.probe:
                    self.probe_image(simmim, [ip.sweep_fraction], seed, group="method")
        return flops, simmim_steps

    def _copy_points(self, src: str, dst: str, pre: dict[str, Any], fraction: float, seed: int) -> None:
        """The main MAE run's points at ``fraction`` also stand in another group (no second run)."""
        for p in [p for p in self.points if p["group"] == src and p["seed"] == seed and p["labels"] == fraction
                  and p["init"] == f"mae {pre['mask_ratio']:g}"]:
            self.points.append({**p, "group": dst})

    def _pretrain_flops(self) -> dict[str, float]:
        """Forward FLOPs of one pretraining step at the plan's batch, MAE and SimMIM (torch's counter)."""
        ip = self.plan.image
        out = {}
        for method, extra in (("mae", {"decoder_embed_dim": ip.decoder_embed_dim, "decoder_depth": ip.decoder_depth,
                                        "decoder_num_heads": ip.decoder_num_heads, "mask_ratio": ip.main_ratio}),
                              ("simmim", {"mask_ratio": ip.simmim_ratio, "mask_patch_size": ip.patch_size})):
            if method == "simmim" and not ip.simmim:
                continue
            spec = get_spec(method)
            mcfg = resolve_model_cfg(method, None, img_size=ip.img_size, patch_size=ip.patch_size, **self._encoder(),
                                     **extra)
            model = build_from_cfg(method, mcfg)
            batch = spec.example(mcfg, ip.pretrain_batch)
            with torch.no_grad():
                out[method] = count_flops(lambda: model(batch), model)
        return out


class _Probe(nn.Module):
    """A linear-probe head on cached features, as a model for :func:`fit`: ``batch["feats"]`` -> loss."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.cross_entropy(self.head(batch["feats"]), batch["label"])}


def shift_flip(x: torch.Tensor, g: torch.Generator, shift: int) -> torch.Tensor:
    """Per-sample random translation by up to ``shift`` pixels (edges repeated) and horizontal flip:
    (B, C, H, W) -> (B, C, H, W)."""
    b, _, h, w = x.shape
    if shift > 0:
        padded = nn.functional.pad(x, (shift,) * 4, mode="replicate")
        dy, dx = (torch.randint(0, 2 * shift + 1, (2, b), generator=g))
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(b, x.shape[1], h, w + 2 * shift)
        x = padded.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(b, x.shape[1], h, w)
        x = x.gather(3, cols)
    flip = torch.rand(b, generator=g) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class _TensorBatches:
    """Shuffled batches of equal-length tensors (``{key: (N, ...)}``), epoch after epoch; ``augment``
    rewrites each batch with the generator that draws the order (e.g. :func:`shift_flip`)."""

    def __init__(self, tensors: dict[str, torch.Tensor], batch_size: int, seed: int,
                 augment: Callable[[dict[str, torch.Tensor], torch.Generator], dict[str, torch.Tensor]] | None = None,
                 ) -> None:
        self.tensors, self.augment = tensors, augment
        self.n = len(next(iter(tensors.values())))
        self.batch = min(batch_size, self.n)
        self.g = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            order = torch.randperm(self.n, generator=self.g)
            for i in range(0, len(order) - self.batch + 1, self.batch):
                idx = order[i:i + self.batch]
                batch = {k: v[idx] for k, v in self.tensors.items()}
                yield self.augment(batch, self.g) if self.augment is not None else batch


# --- Summaries ----------------------------------------------------------------------------------------

def summary_rows(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (group, protocol, init, labels): accuracy over seeds (mean, min, max, spread)."""
    keys: dict[tuple[Any, ...], list[float]] = {}
    for p in points:
        keys.setdefault((p["group"], p["protocol"], p["init"], p["labels"]), []).append(p["test_acc"])
    return [{"group": g, "protocol": pr, "init": i, "labels": f, **summarise(v)} for (g, pr, i, f), v in keys.items()]


def pretraining_checks(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For every fine-tuned point that has a scratch counterpart (same group and labels): the margin of
    the pretrained mean over the scratch mean, against the larger seed spread of the two."""
    rows = summary_rows(points)
    out = []
    for r in rows:
        if r["protocol"] != "finetune" or r["init"] == "scratch":
            continue
        base = next((s for s in rows if s["group"] == r["group"] and s["protocol"] == r["protocol"]
                     and s["labels"] == r["labels"] and s["init"] == "scratch"), None)
        if base is None:
            continue
        margin, spread = r["mean"] - base["mean"], max(r["spread"], base["spread"])
        out.append({"group": r["group"], "init": r["init"], "labels": r["labels"], "pretrained": r["mean"],
                    "scratch": base["mean"], "margin": margin, "spread": spread, "beats_scratch": margin > spread})
    return out


def run_study(plan: StudyPlan | str, out_dir: str | Path, *, seed: int = 0) -> dict[str, Any]:
    """Run a plan, or the name of one (``quick``, ``full``, with seeds ``seed`` and ``seed + 1``), into
    ``out_dir``; returns the results (also in ``out_dir/results.json``)."""
    if isinstance(plan, str):
        if plan not in PLANS:
            raise ValueError(f"unknown study plan {plan!r}; choose one of {', '.join(PLANS)}")
        plan = PLANS[plan](seed)
    return Study(plan, out_dir).run()


# --- Report and plots ---------------------------------------------------------------------------------

def _pct(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    return f"{row['mean']:.1f} ({row['min']:.1f}-{row['max']:.1f})" if row["n"] > 1 else f"{row['mean']:.1f}"


PROTOCOL_NAMES = {"finetune": "fine-tune", "probe": "linear probe"}


def _init_name(init: str) -> str:
    parts = init.split()
    if parts[0] == "scratch":
        return "scratch"
    names = {"mae": "MAE", "simmim": "SimMIM", "videomae": "VideoMAE"}
    return " ".join([names.get(parts[0], parts[0]), *parts[1:]])


def _rows(results: dict[str, Any], group: str) -> list[dict[str, Any]]:
    return [r for r in results["summary"] if r["group"] == group]


def _find(rows: Sequence[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r[k] == v for k, v in match.items())), None)


def markdown_tables(results: dict[str, Any]) -> str:
    """The study's tables in Markdown: test accuracy (%) as mean (min-max over seeds)."""
    out: list[str] = []
    rows = _rows(results, "labels")
    if rows:
        fractions = sorted({r["labels"] for r in rows})
        series = list(dict.fromkeys((r["protocol"], r["init"]) for r in rows))
        out += ["Fashion-MNIST test accuracy (%) by share of train labels:", "",
                "| encoder, protocol | " + " | ".join(_pct(f) for f in fractions) + " |",
                "|---|" + "---|" * len(fractions)]
        for protocol, init in series:
            name = _init_name(init) + (" (random encoder)" if init == "scratch" and protocol == "probe" else "")
            cells = [_cell(_find(rows, protocol=protocol, init=init, labels=f)) for f in fractions]
            out.append(f"| {name}, {PROTOCOL_NAMES[protocol]} | " + " | ".join(cells) + " |")
        out.append("")
    for group, title in (("mask_ratio", "MAE mask ratio"), ("method", "MAE against SimMIM at the same pretraining compute")):
        rows = _rows(results, group)
        if not rows:
            continue
        fraction = rows[0]["labels"]
        protocols = list(dict.fromkeys(r["protocol"] for r in rows))
        inits = sorted(dict.fromkeys(r["init"] for r in rows), key=lambda i: (i.split()[0], float(i.split()[-1])))
        extra = " pretraining steps |" if group == "method" else ""
        out += [f"{title}, test accuracy (%) with {_pct(fraction)} of the labels:", "",
                "| pretraining |" + extra + " " + " | ".join(PROTOCOL_NAMES[p] for p in protocols) + " |",
                "|---|" + ("---|" if extra else "") + "---|" * len(protocols)]
        for init in inits:
            steps = ""
            if extra:
                run = next((r for r in results["runs"] if r["stage"] == "image_pretrain"
                            and f"{r['method']} {r['mask_ratio']:g}" == init), None)
                steps = f" {run['steps']} |" if run else " - |"
            cells = [_cell(_find(rows, protocol=p, init=init)) for p in protocols]
            out.append(f"| {_init_name(init)} |{steps} " + " | ".join(cells) + " |")
        out.append("")
    rows = _rows(results, "video")
    if rows:
        out += ["Moving Fashion-MNIST test accuracy (%) after fine-tuning (chance 10%; one frame names the label "
                "at best half the time):", "", "| pretraining | fine-tune |", "|---|---|"]
        for r in rows:
            out.append(f"| {_init_name(r['init'])} | {_cell(r)} |")
        out.append("")
    checks = results.get("checks") or []
    if checks:
        out += ["Pretrained against scratch (fine-tuned, same budget): margin of the means against the larger "
                "seed spread (max - min) of the two:", "",
                "| data | pretraining | labels | pretrained | scratch | margin | spread | beats scratch |",
                "|---|---|---|---|---|---|---|---|"]
        for c in checks:
            data = "moving Fashion-MNIST" if c["group"] == "video" else "Fashion-MNIST"
            out.append(f"| {data} | {_init_name(c['init'])} | {_pct(c['labels'])} | {c['pretrained']:.1f} | "
                       f"{c['scratch']:.1f} | {c['margin']:+.1f} | {c['spread']:.1f} | "
                       f"{'yes' if c['beats_scratch'] else 'no'} |")
        out.append("")
    return "\n".join(out)


def study_command(plan: dict[str, Any], out: Path) -> str:
    quick = " --quick" if plan["name"] == "quick" else ""
    seed = f" --seed {plan['seeds'][0]}" if plan["seeds"] and plan["seeds"][0] else ""
    return f"python tools/study.py{quick}{seed} --out {out}"


def setup_lines(results: dict[str, Any]) -> list[str]:
    """How the study was run, as Markdown bullets."""
    plan = results["plan"]
    enc, ip, vp = plan["encoder"], plan["image"], plan["video"]
    lines = [f"- Encoder: ViT, {enc['embed_dim']} wide, {enc['depth']} blocks, {enc['num_heads']} heads, MLP ratio "
             f"{enc['mlp_ratio']:g}; {results['precision']} autocast."]
    if ip:
        lines += [
            f"- MAE: {ip['pretrain_steps']} steps of {ip['pretrain_batch']} Fashion-MNIST train images at "
            f"{ip['img_size']} px in {ip['patch_size']}-px patches (RandomResizedCrop from {ip['min_scale']:g}, flips), "
            f"lr {ip['pretrain_lr']:g} (warmup, then cosine to {ip['pretrain_min_lr']:g}), decoder "
            f"{ip['decoder_embed_dim']} wide x {ip['decoder_depth']} block(s), "
            f"{'per-patch normalised' if ip['norm_pix_loss'] else 'raw'} pixel target; trained by the engine "
            "(`mmmae.engine.trainer.train`, one process) from the configs in `runs/configs/` (a `base:` recipe and "
            "what differs).",
            f"- Fine-tuning: {ip['finetune_steps']} AdamW steps of {ip['finetune_batch']} images at lr "
            f"{ip['finetune_lr']:g} (warmup, cosine to 0) for every label share, pretrained and scratch alike; "
            f"layer-wise lr decay {ip['layer_decay']:g} for pretrained encoders only; random shifts of up to "
            f"{ip['shift']} px and flips; mean pooling + fc_norm + linear head (the `classifier` method, loading the "
            "pretraining run's `model.safetensors` as `init_from` does). Scratch is the same classifier from a "
            "random initialisation.",
            f"- Labels: a random {' / '.join(_pct(f) for f in ip['fractions'])} of the 60,000 train items, drawn by "
            f"the seed (each share a prefix of the next). Test: the first {ip['test_items']} items of Fashion-MNIST's t10k file, which "
            "no stage trains on."]
        if ip["probe"]:
            lines.append("- Linear probe: the frozen encoder's mean-pooled features of the un-augmented labelled "
                         f"images, BatchNorm (no affine) + linear (`linear_probe: true`), {ip['probe_steps']} AdamW "
                         f"steps at lr {ip['probe_lr']:g}; scratch is the same probe on a random encoder.")
        if ip["simmim"]:
            fl = results["pretrain_flops_per_step"]
            lines.append(f"- SimMIM at MAE's compute: {fl['simmim'] / 1e9:.1f} GFLOP per forward step against MAE's "
                         f"{fl['mae'] / 1e9:.1f} (torch's FLOP counter, same batch), so {results['simmim_steps']} "
                         f"steps against {ip['pretrain_steps']}; SimMIM's own trunk (shared relative position bias, "
                         f"layer scale, q/v biases), ratio {ip['simmim_ratio']:g} over one-patch blocks (its 32-px "
                         f"blocks on 224 px, scaled to {ip['img_size']} px), L1 on raw pixels.")
    if vp:
        lines.append(
            f"- Video: moving Fashion-MNIST (`data.dataset: moving_fashion_mnist`, made as `video/moving_mnist.py` "
            f"describes): {vp['train_clips']} train / {vp['val_clips']} test clips of {vp['num_frames']} frames at "
            f"{vp['img_size']} px, two items of one class group each, moving, bouncing and spinning the same way; "
            "the label is the group (tops, trousers, dresses, footwear, bags) and the rotation sense, so one frame "
            "gives it at best half the time. Train clips use only train items, test clips only t10k items. "
            f"Tubelets {vp['tubelet_size']}x{vp['patch_size']}x{vp['patch_size']}. VideoMAE {vp['pretrain_steps']} "
            f"steps of {vp['pretrain_batch']} clips, lr {vp['pretrain_lr']:g} (cosine to {vp['pretrain_min_lr']:g}), "
            f"decoder {vp['decoder_embed_dim']} x {vp['decoder_depth']}, "
            f"{'per-channel normalised' if vp['norm_pix_loss'] else 'raw'} pixel target; fine-tuning "
            f"{vp['finetune_steps']} steps of {vp['finetune_batch']} on {vp['finetune_clips']} labelled clips, no "
            "augmentation. Tube masks hide the same patches in every time slice (VideoMAE's mask maker); random "
            "masks hide as many tokens (int(ratio x L)) anywhere in space and time.")
    lines.append(
        "- Where the study runs its own loop (`mmmae.engine.study.fit`): fine-tuning, the linear probes and the "
        "video pretraining. The engine's fixed cost per run (DeepSpeed engine, FLOP count, matmul peak, "
        "checkpoint; some seconds) is comparable with a whole fine-tuning run here, and VideoMAE's registered "
        "mask maker is the tube mask only, so one loop serves both video arms with the mask the only difference. "
        "The loop uses the library's parts: models from the registry through the config system, `init_from`'s "
        "weight loading, the engine's AdamW parameter groups (no decay on norms, biases and tables; layer-wise "
        "decay), its warmup + cosine schedule and precision rule, the registered data sources and mask makers. "
        "Fine-tuning images are read once through the source without augmentation and shifted / flipped as "
        "tensors: the source's per-image PIL crop would cost as much as the model at this size.")
    return lines


def write_report(results: dict[str, Any], out_dir: str | Path) -> None:
    """``report.md`` and the PNG plots for a study's results."""
    out = Path(out_dir)
    plots = draw_plots(results, out)
    plan, m, t = results["plan"], results["machine"], results["timing"]
    lines = [f"# Does it learn? ({plan['name']} study)", "",
             f"Command: `{study_command(plan, out)}`", "",
             f"Machine: {m['cpu']} ({m['cpu_count']} cores, AMX bf16: {'yes' if m['amx_bf16'] else 'no'}; torch "
             f"{m['torch']} on {m['torch_threads']} threads, {results['precision']}); load average "
             f"{m['load_average'][0]:.1f} at the start, {m['load_average_end'][0]:.1f} at the end. Wall time "
             f"{t['total_s'] / 60:.1f} min (images {t.get('image_s', 0) / 60:.1f}, videos {t.get('video_s', 0) / 60:.1f}).",
             "", f"Seeds {', '.join(map(str, plan['seeds']))}; each cell is the test accuracy's mean over them and, in "
             "brackets, its min-max.", "", markdown_tables(results)]
    lines += [f"![{p[:-4]}]({p})" for p in plots] + ["", "## Setup", ""] + setup_lines(results) + [""]
    (out / "report.md").write_text("\n".join(lines))


def draw_plots(results: dict[str, Any], out_dir: Path) -> list[str]:
    """PNG plots of the study's groups; returns their file names."""
    made = []
    rows = [p for p in results["points"] if p["group"] == "labels"]
    if rows:
        cats = [_pct(f) for f in sorted({p["labels"] for p in rows})]
        series: dict[str, dict[str, list[float]]] = {}
        for p in rows:
            name = f"{_init_name(p['init'])}, {PROTOCOL_NAMES[p['protocol']]}"
            series.setdefault(name, {}).setdefault(_pct(p["labels"]), []).append(p["test_acc"])
        dot_plot(out_dir / "labels.png", "Fashion-MNIST: test accuracy by share of labels", cats, series)
        made.append("labels.png")
    for group, title, cat_of in (
            ("mask_ratio", "MAE mask ratio", lambda p: p["init"].split()[-1]),
            ("method", "MAE vs SimMIM, same pretraining compute", lambda p: _init_name(p["init"])),
            ("video", "Moving Fashion-MNIST: fine-tuned test accuracy", lambda p: _init_name(p["init"]))):
        rows = [p for p in results["points"] if p["group"] == group]
        if not rows:
            continue
        cats = list(dict.fromkeys(cat_of(p) for p in sorted(rows, key=lambda p: p["init"] != "scratch")))
        if group == "mask_ratio":
            cats = sorted(cats, key=float)
        series = {}
        for p in rows:
            series.setdefault(PROTOCOL_NAMES[p["protocol"]], {}).setdefault(cat_of(p), []).append(p["test_acc"])
        dot_plot(out_dir / f"{group}.png", title, cats, series)
        made.append(f"{group}.png")
    return made


COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]


def dot_plot(path: Path, title: str, categories: Sequence[str], series: dict[str, dict[str, list[float]]],
             ylabel: str = "test accuracy (%)", size: tuple[int, int] = (720, 420)) -> None:
    """A categorical dot plot (Pillow): for each category and series every seed's value as a dot, the
    mean as a bar and the min-max as a line."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = size
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=12)
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    values = [v for s in series.values() for vs in s.values() for v in vs]
    lo, hi = min(values), max(values)
    pad = max((hi - lo) * 0.1, 1.0)
    lo, hi = lo - pad, hi + pad
    left, right, top, bottom = 64, w - 16, 56, h - 90
    def y_of(v: float) -> float:
        return bottom - (v - lo) / (hi - lo) * (bottom - top)
    d.text((left, 10), title, fill="black", font=font)
    step = next(s for s in (0.5, 1, 2, 5, 10, 20, 25, 50) if (hi - lo) / s <= 8)
    tick = (int(lo // step) + 1) * step
    while tick < hi:
        y = y_of(tick)
        d.line([(left, y), (right, y)], fill=(225, 225, 225))
        d.text((left - 8, y), f"{tick:g}", fill="black", font=small, anchor="rm")
        tick += step
    d.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    d.text((12, top - 20), ylabel, fill="black", font=small)
    slot = (right - left) / len(categories)
    names = list(series)
    for i, cat in enumerate(categories):
        cx = left + slot * (i + 0.5)
        d.text((cx, bottom + 8), cat, fill="black", font=font, anchor="ma")
        for j, name in enumerate(names):
            vs = series[name].get(cat)
            if not vs:
                continue
            x = cx + (j - (len(names) - 1) / 2) * min(slot / (len(names) + 1), 28)
            c = COLOURS[j % len(COLOURS)]
            d.line([(x, y_of(min(vs))), (x, y_of(max(vs)))], fill=c, width=2)
            mean = sum(vs) / len(vs)
            d.line([(x - 8, y_of(mean)), (x + 8, y_of(mean))], fill=c, width=3)
            for v in vs:
                d.ellipse([x - 3.5, y_of(v) - 3.5, x + 3.5, y_of(v) + 3.5], outline=c, fill="white", width=2)
    lx, ly = left, bottom + 34
    for j, name in enumerate(names):
        c = COLOURS[j % len(COLOURS)]
        width = d.textlength(name, font=small) + 34
        if lx + width > right:
            lx, ly = left, ly + 18
        d.line([(lx, ly + 7), (lx + 16, ly + 7)], fill=c, width=3)
        d.text((lx + 20, ly), name, fill="black", font=small)
        lx += width
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)
