"""The ``captions`` data source: image-caption pairs for M3AE pretraining.

``data.dataset: captions`` reads ``data.captions`` / ``data.images`` for the train split and
``data.val_captions`` / ``data.val_images`` for val (any format ``mmmae.vl.data`` knows: COCO json,
Karpathy json, csv/jsonl pairs beside an image folder, or WebDataset-style tar shards: a ``.tar``,
a glob or a brace list such as ``shards/coco-{000..009}.tar``, indexed and read by seek, so they
shard over ranks and workers through the trainer's sampler and resume exactly); the block is
:class:`CaptionsCfg`. Captions are tokenized with the
model's tokenizer (``model.tokenizer``) to its ``model.max_len`` positions, within its ``vocab_size``.

Train images go through M3AE's pretraining transform (MAE's: RandomResizedCrop(img_size,
scale=(data.min_scale, 1)), optional flip, normalisation); val images through M3AE's test transform
(resize the short side to img_size, centre crop). Pixels in [0, 1] are normalised with CC12M's mean
and std, as young-geng/m3ae_public m3ae/data.py ``ImageTextDataset`` does by default
(``data.caption_image_norm``: auto, cc12m, imagenet or none; see :func:`caption_image_norm`).

Samples are dicts (``image``, ``text``, ``text_pad``, ``caption``, ``image_id``, ``index``,
``skipped``) that the engine's ``collate_dicts`` stacks, naming the skipped-image count
``skipped_images``. Unreadable train images are replaced (``mmmae.data.quality.read_item``); val
images never are: they are listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from mmmae.data.registry import DataCfg, register_dataset
from mmmae.vl.data import Transform, build_caption_dataset, image_stats
from mmmae.vl.tokenizers import TextTokenizer, build_tokenizer


@dataclass
class CaptionsCfg(DataCfg):
    captions: str = ""  # caption file (COCO json, Karpathy json, CSV/JSONL) or tar shards (.tar, glob, {000..009})
    images: str = ""  # image folder for the caption file
    val_captions: str = ""
    val_images: str = ""
    caption_mode: str = "all"  # all: one pair per caption; random: one caption per image per epoch
    # Statistics images are normalised with: cc12m, imagenet, none, or auto: cc12m for
    # data.dataset=captions (m3ae_public ImageTextDataset's default), imagenet for any other source
    caption_image_norm: str = "auto"
    hflip: bool = True
    min_scale: float = 0.2  # RandomResizedCrop lower scale


def model_tokenizer(model_cfg: Any) -> TextTokenizer:
    """The text model's tokenizer (``model.tokenizer``, ``model.max_len`` positions); its vocabulary
    must fit the model's embedding (``model.vocab_size``)."""
    tokenizer = build_tokenizer(model_cfg.tokenizer, model_cfg.max_len)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"the tokenizer {tokenizer!r} has {tokenizer.vocab_size} ids but model.vocab_size="
                         f"{model_cfg.vocab_size}; set model.vocab_size={tokenizer.vocab_size}")
    return tokenizer


def caption_image_norm(cfg: Any) -> str:
    """The statistics' name for ``data.caption_image_norm``; ``auto`` follows the data: M3AE's
    image-text data (``data.dataset=captions``) is normalised with CC12M's statistics, anything else
    with ImageNet's (m3ae/data.py: ImageTextDataset vs ImageNetDataset defaults). Only the captions
    source has the key; any other source reads as ``auto``."""
    name = cfg.data.caption_image_norm if "caption_image_norm" in cfg.data else "auto"
    if name == "auto":
        return "cc12m" if cfg.data.dataset == "captions" else "imagenet"
    image_stats(name)  # a clear error for an unknown name
    return name


def caption_transform(cfg: Any, model_cfg: Any, split: str) -> Transform:
    from mmmae.data.transforms import eval_transform, mae_train_transform
    mean, std = image_stats(caption_image_norm(cfg))
    if split == "train":
        return mae_train_transform(model_cfg.img_size, scale=(cfg.data.min_scale, 1.0), hflip=cfg.data.hflip,
                                   mean=mean, std=std)
    # M3AE's "test": Resize(size) + CenterCrop(size)
    return eval_transform(model_cfg.img_size, crop_pct=1.0, mean=mean, std=std)


@register_dataset("captions", CaptionsCfg, "image_text")
def build_captions(cfg: Any, split: str, model_cfg: Any) -> Dataset:
    """``(TrainCfg, "train" | "val", model config) -> Dataset`` of tokenized image-caption pairs."""
    if split == "train":
        captions, images, keys = cfg.data.captions, cfg.data.images, "data.captions / data.images"
    else:
        captions, images, keys = cfg.data.val_captions, cfg.data.val_images, "data.val_captions / data.val_images"
    if not captions:
        raise ValueError(f"data.dataset=captions needs {keys} for the {split} split (a COCO/Karpathy json or "
                         f"csv/jsonl pairs and its image folder, or tar shards)")
    tokenizer = model_tokenizer(model_cfg)
    ds = build_caption_dataset(captions, images, caption_transform(cfg, model_cfg, split), tokenizer,
                               split=split, mode=cfg.data.caption_mode, seed=cfg.train.seed,
                               max_bad_fraction=cfg.data.max_bad_fraction, replace=split == "train")
    return ds
