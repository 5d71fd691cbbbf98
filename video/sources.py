"""Video data sources for ``data.dataset``: ``video_list``, ``video_folder``, ``ssv2``, ``video_shards`` (clips from
tar shards: ``data.train_list`` / ``data.val_list`` name a shard list or one ``.tar``, relative to ``data.root``,
default the list's folder; see mmmae.video.shards), ``omni``
(image and video batches mixed, OmniMAE) and ``video_image`` (a clip and an image per item, BEVT).

Each source's ``data`` block is :class:`VideoDataCfg` (the joint ones :class:`JointDataCfg`); the
frame count is the model's ``model.num_frames`` and the crop its ``model.img_size`` (given once).
``data.sampling`` is dense or segment; ``auto``: segment for a classifier on ``ssv2``, as VideoMAE
fine-tunes and tests Something-Something v2, dense otherwise, pretraining on SSv2 included. Joint
sources add ``data.image_dataset`` (any registered image source) read at ``data.image_root``, and
``data.image_ratio``. Clip randomness is seeded by ``train.seed``.

Augmentation follows the model: pretraining models get VideoMAE's (multi-scale crop, no flip);
a classifier gets a random-resized crop (``data.min_scale``, ``data.hflip``; off for SSv2) and
VideoMAE's fine-tuning clip rule; ``val`` gives the multi-view test set (``data.num_clips`` x
``data.num_crops``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.utils.data import ConcatDataset, Dataset

from mmmae.data.registry import DataCfg, get_source, limited, register_dataset
from mmmae.data.sampler import MixedBatchSampler, mix_seed
from mmmae.heads import ClassifierCfg

from .datasets import (REPEAT_MODES, Item, VideoClipDataset, VideoTestDataset, list_video_folder,
                       read_annotation_list, read_ssv2_annotations)
from .sampling import CLIP_RULES, SAMPLINGS, SHORT_MODES, ClipSampler
from .shards import ShardIndex, read_shard_list
from .transforms import (DeviceAugment, MultiScaleCrop, RandAugmentVideo, RandomResizedCropVideo, WorkerCrop,
                         finetune_transform, pretrain_transform)

__all__ = ["video_items", "clip_sampler", "build_video_source", "OmniDataset", "VideoImageDataset", "GroupedImages"]


@dataclass
class VideoDataCfg(DataCfg):
    root: str = ""  # videos folder; prefix of the paths in the lists
    train_list: str = ""  # annotation list ("path label" lines or CSV; SSv2: train.json; shards: shards.txt or a .tar)
    val_list: str = ""
    class_list: str = ""  # one class name per line, for lists that name classes (SSv2: labels.json)
    backend: str = "auto"  # auto (torchcodec > decord > pyav, the first usable) | torchcodec | decord | pyav
    decode_device: str = "cpu"  # cpu | cuda (GPU decoding, torchcodec only; needs data.num_workers=0)
    sampling_rate: int = 4
    num_samples: int = 1  # repeated sampling: views per decoded video
    short_clip: str = "loop"  # clips shorter than the sampled span: loop or pad (clip_rule fit only)
    sampling: str = "auto"  # dense | segment (TSN-style) | auto: segment for an ssv2 classifier, else dense
    clip_rule: str = "videomae"  # dense clip placement: videomae (the reference's) | fit (mmmae's earlier rule)
    repeat_mode: str = "shared_window"  # num_samples views share frames (VideoMAE/v2) | independent (MAE-ST)
    num_clips: int = 5  # test views (temporal clips x spatial crops)
    num_crops: int = 3
    hflip: bool = True  # fine-tuning augmentation (off for SSv2)
    min_scale: float = 0.2  # fine-tuning random-resized-crop lower scale
    rand_augment: str = ""  # fine-tuning: timm RandAugment spec, e.g. rand-m7-n4-mstd0.5-inc1 ("" = off)
    erase_prob: float = 0.0  # fine-tuning: random erasing probability per frame (VideoMAE: 0.25)
    # Training: workers only decode and cut the crop box; resize, flip and normalisation run on the
    # training device (the same draws and the same clips as the CPU path; needs erase_prob 0).
    gpu_augment: bool = False


@dataclass
class JointDataCfg(VideoDataCfg):
    image_dataset: str = ""  # the image stream: any registered image source (e.g. image_folder, fashion_mnist)
    image_root: str = ""  # its root
    image_ratio: float = 0.5  # share of steps that draw the image stream (omni)


def _need_file(path: str, key: str) -> str:
    if not path:
        raise ValueError(f"{key} is not set")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{key}: {path} not found")
    return path


def video_items(cfg: Any, split: str, kind: str) -> list[Item]:
    """``(path, label)`` items of a ``video_list`` / ``video_folder`` / ``ssv2`` source."""
    d = cfg.data
    list_key = "data.train_list" if split == "train" else "data.val_list"
    list_path = d.train_list if split == "train" else d.val_list
    if kind == "video_folder":
        root = _need_file(d.root, "data.root")
        items = list_video_folder(root)
        if not items:
            raise FileNotFoundError(f"data.root: no videos under {root}")
    elif kind == "video_list":
        items = read_annotation_list(_need_file(list_path, list_key), d.root, d.class_list or None)
    elif kind == "ssv2":
        # data.train_list / data.val_list: train.json / validation.json; data.class_list: labels.json.
        items = read_ssv2_annotations(_need_file(list_path, list_key), _need_file(d.class_list, "data.class_list"),
                                      d.root)
    else:
        raise ValueError(f"unknown video source kind {kind!r}")
    if kind == "ssv2":
        _need_videos(items, list_path, d.root)
    if not items:
        raise ValueError(f"{kind}: no videos for split {split!r}")
    return items


def _need_videos(items: list[Item], annotation: str, root: str) -> None:
    """An annotation json names videos by id: a wrong ``data.root`` or extension is caught here, before
    every read fails one by one."""
    missing = [p for p, _ in items if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"{annotation}: {len(missing)} of {len(items)} videos are missing under data.root={root!r} "
            f"(expected <root>/<id>.webm), e.g. {missing[:5]}")


def _one_of(value: str, allowed: tuple[str, ...], key: str) -> str:
    if value not in allowed:
        raise ValueError(f"{key}={value!r}; choose one of {allowed}")
    return value


def clip_sampler(cfg: Any, kind: str, stage: str) -> ClipSampler:
    """The clip sampler the ``data`` block asks for, over the model's ``num_frames``; ``stage`` is
    ``pretrain`` or ``finetune``."""
    d = cfg.data
    sampling = _one_of(d.sampling, ("auto", *SAMPLINGS), "data.sampling")
    if sampling == "auto":
        # VideoMAE fine-tunes and tests SSv2 by segments (ssv2.py; datasets.py build_dataset:
        # num_segment=num_frames, clip_len=1) but pretrains on it densely (run_mae_pretraining.py's
        # VideoMAE loader, scripts/ssv2/.../pretrain.sh --sampling_rate 2); Kinetics-style lists are dense.
        sampling = "segment" if kind == "ssv2" and stage == "finetune" else "dense"
    return ClipSampler(int(cfg.model.num_frames), d.sampling_rate, sampling=sampling,
                       rule=_one_of(d.clip_rule, CLIP_RULES, "data.clip_rule"), stage=stage,
                       short=_one_of(d.short_clip, SHORT_MODES, "data.short_clip"))


def build_video_source(cfg: Any, split: str, model_cfg: Any, kind: str) -> Dataset:
    """A clip dataset for training (list of ``num_samples`` views per item) or the test views."""
    d = cfg.data
    frames = int(model_cfg.num_frames)  # given once, by the model
    finetune = isinstance(model_cfg, ClassifierCfg)
    sampler = clip_sampler(cfg, kind, "finetune" if finetune else "pretrain")
    repeat_mode = _one_of(d.repeat_mode, REPEAT_MODES, "data.repeat_mode")
    opener = None
    if kind == "video_shards":
        # data.train_list / data.val_list: a shard list (tools/prepare_videos.py's shards.txt) or one .tar.
        list_key, list_path = ("data.train_list", d.train_list) if split == "train" else ("data.val_list", d.val_list)
        index = ShardIndex(read_shard_list(_need_file(list_path, list_key), d.root))
        items, opener = index.items, index.open
    else:
        items = video_items(cfg, split, kind)
    size = model_cfg.img_size
    if d.decode_device != "cpu" and d.num_workers > 0:
        # CUDA cannot be re-initialised in the forked DataLoader workers the trainer starts.
        raise ValueError(f"data.decode_device={d.decode_device!r} decodes in the loading process: "
                         f"set data.num_workers=0 (got {d.num_workers})")
    if split != "train":
        return VideoTestDataset(items, frames, d.sampling_rate, d.num_clips, d.num_crops, crop_size=size,
                                backend=d.backend, short_clip=d.short_clip, sampler=sampler,
                                decode_device=d.decode_device, opener=opener)
    if d.gpu_augment:
        transform: Any = worker_crop(cfg, model_cfg)
    elif finetune:
        transform = finetune_transform(size, scale=(d.min_scale, 1.0), hflip=d.hflip, rand_augment=d.rand_augment,
                                       erase_prob=d.erase_prob)
    else:
        transform = pretrain_transform(size)  # VideoMAE: multi-scale crop, no flip
    return VideoClipDataset(items, frames, d.sampling_rate, transform, backend=d.backend,
                            num_samples=d.num_samples, short_clip=d.short_clip, sampler=sampler,
                            repeat_mode=repeat_mode, max_bad_fraction=d.max_bad_fraction, seed=cfg.train.seed,
                            decode_device=d.decode_device, opener=opener)


def worker_crop(cfg: Any, model_cfg: Any) -> WorkerCrop:
    """The worker half of ``data.gpu_augment``: the training transform's draws, cutting only the box
    (pretraining: VideoMAE's multi-scale crop; fine-tuning: RandAugment on the worker, then the
    random-resized crop and its flip)."""
    d, size = cfg.data, model_cfg.img_size
    if isinstance(model_cfg, ClassifierCfg):
        if d.erase_prob > 0:
            raise ValueError(f"data.gpu_augment=true does not run random erasing (data.erase_prob={d.erase_prob}); "
                             f"set data.erase_prob=0 or data.gpu_augment=false")
        crop: Any = RandomResizedCropVideo(size, scale=(d.min_scale, 1.0), hflip=d.hflip, antialias=False)
        return WorkerCrop(crop, [RandAugmentVideo(d.rand_augment)] if d.rand_augment else [])
    return WorkerCrop(MultiScaleCrop(size))


def _no_device_augment(cfg: Any, source: str) -> None:
    if cfg.data.gpu_augment:
        raise ValueError(f"data.gpu_augment=true: the {source!r} source mixes videos with images on the CPU; "
                         f"use a video source (video_list, video_folder, ssv2, video_shards) or "
                         f"data.gpu_augment=false")


def device_augment(cfg: Any, model_cfg: Any, device: Any) -> DeviceAugment | None:
    """The device half of ``data.gpu_augment`` (None when it is off)."""
    if not cfg.data.gpu_augment:
        return None
    crop = worker_crop(cfg, model_cfg)
    return DeviceAugment(crop.size, crop.antialias, device)


for _kind in ("video_list", "video_folder", "ssv2", "video_shards"):
    register_dataset(_kind, VideoDataCfg, "video", repeated=True, device_transform=device_augment)(
        lambda cfg, split, model_cfg, _k=_kind: build_video_source(cfg, split, model_cfg, _k))


def _default_video_kind(cfg: Any) -> str:
    return "video_list" if cfg.data.train_list else "video_folder"


def build_image_source(cfg: Any, split: str, model_cfg: Any) -> Dataset:
    """``data.image_dataset`` read from ``data.image_root``: that source's own ``data`` block, with
    the joint block's values for the fields they share (batch size, workers, limit, augmentation)."""
    d = cfg.data
    if not d.image_dataset:
        raise ValueError("data.image_dataset is not set (e.g. image_folder with data.image_root, or fashion_mnist)")
    source = get_source(d.image_dataset)
    if source.provides != "image":
        raise ValueError(f"data.image_dataset={d.image_dataset!r} yields {source.provides}, not images")
    fields = {f.name for f in dataclasses.fields(source.cfg_cls)}
    values = {k: v for k, v in OmegaConf.to_container(d, resolve=True).items() if k in fields}  # type: ignore[union-attr]
    values.update(dataset=d.image_dataset)
    if d.image_root:
        values["root"] = d.image_root
    image_data = OmegaConf.merge(OmegaConf.structured(source.cfg_cls), values)
    return source.build(OmegaConf.create({"data": image_data, "train": cfg.train}), split, model_cfg)


class GroupedImages(Dataset):
    """``group`` consecutive images per item, as a list of views: with repeated video sampling an image
    step then holds as many samples as a video step (``data.batch_size * data.num_samples``)."""

    def __init__(self, images: Dataset, group: int) -> None:
        n = len(images)  # type: ignore[arg-type]
        if n < group:
            raise ValueError(f"the image source has {n} images, fewer than data.num_samples={group}")
        self.images, self.group = images, group

    def __len__(self) -> int:
        return len(self.images) // self.group  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        return [self.images[index * self.group + k] for k in range(self.group)]


class OmniDataset(ConcatDataset):
    """Images then videos behind one ConcatDataset; every batch comes from one of them (OmniMAE's
    homogeneous steps), the image source with probability ``image_ratio`` (``MixedBatchSampler``)."""

    def __init__(self, images: Dataset, videos: Dataset, image_ratio: float) -> None:
        if not 0.0 <= image_ratio <= 1.0:
            raise ValueError(f"data.image_ratio must be in [0, 1], got {image_ratio}")
        super().__init__([images, videos])
        self.image_ratio = image_ratio

    def set_epoch(self, epoch: int) -> None:
        for ds in self.datasets:
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(epoch)

    def make_batch_sampler(self, batch_size: int, num_replicas: int, rank: int, seed: int) -> MixedBatchSampler:
        sizes = [len(ds) for ds in self.datasets]  # type: ignore[arg-type]
        return MixedBatchSampler(sizes, [self.image_ratio, 1.0 - self.image_ratio], batch_size, num_replicas, rank,
                                 seed)


def _mixed_batches(dataset: Any, batch_size: int, world: int, rank: int, seed: int) -> MixedBatchSampler:
    return dataset.make_batch_sampler(batch_size, world, rank, seed)


@register_dataset("omni", JointDataCfg, "omni", repeated=True, batch_sampler=_mixed_batches)
def _build_omni(cfg: Any, split: str, model_cfg: Any) -> Dataset:
    _no_device_augment(cfg, "omni")
    # The mixed batch sampler indexes the two parts: data.limit applies to each.
    videos = limited(build_video_source(cfg, split, model_cfg, _default_video_kind(cfg)), cfg.data.limit)
    if split != "train":
        return videos
    images = limited(build_image_source(cfg, split, model_cfg), cfg.data.limit)
    return OmniDataset(GroupedImages(images, max(cfg.data.num_samples, 1)), videos, cfg.data.image_ratio)


class VideoImageDataset(Dataset):
    """BEVT's joint stream: every view of a clip comes with an image, so each batch carries
    ``video`` (B, 3, T, H, W) and ``image`` (B, 3, H, W).

    Images come from ``images`` (shuffled per epoch, cycling when there are fewer images than views),
    or, without an image source, are single frames drawn from the view's own clip (seeded by
    (seed, epoch, index, view)).
    """

    def __init__(self, videos: VideoClipDataset, images: Dataset | None = None, seed: int = 0) -> None:
        self.videos, self.images, self.seed, self.epoch = videos, images, seed, 0

    def __len__(self) -> int:
        return len(self.videos)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.videos.set_epoch(epoch)

    def _image_index(self, k: int) -> int:
        n = len(self.images)  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, k // n, "images"))
        return int(torch.randperm(n, generator=g)[k % n])

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        views = self.videos[index]
        for k, view in enumerate(views):
            if self.images is not None:
                view["image"] = self.images[self._image_index(index * len(views) + k)]["image"]
            else:
                g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, index, k, "frame"))
                t = int(torch.randint(view["video"].shape[1], (1,), generator=g))
                view["image"] = view["video"][:, t].clone()
        return views


@register_dataset("video_image", JointDataCfg, "video_image", repeated=True)
def _build_video_image(cfg: Any, split: str, model_cfg: Any) -> Dataset:
    _no_device_augment(cfg, "video_image")
    videos = build_video_source(cfg, split, model_cfg, _default_video_kind(cfg))
    if split != "train":
        return videos
    images = build_image_source(cfg, split, model_cfg) if cfg.data.image_dataset else None
    return VideoImageDataset(videos, images, seed=cfg.train.seed)  # type: ignore[arg-type]
