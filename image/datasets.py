"""Image sources: an ImageFolder-style directory, Fashion-MNIST idx files, and synthetic images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset

from mmmae.data.fashion_mnist import FashionMNIST
from mmmae.data.quality import ReadFailures, read_item
from mmmae.data.registry import DataCfg, register_dataset
from mmmae.data.sampler import mix_seed

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ImageFolder(Dataset):
    """``root/class_x/xxx.jpg`` (labels from sorted class folders) or a flat folder of images
    (label -1, for pretraining), read through :func:`mmmae.data.quality.read_item`.

    Training (``replace=True``): an unreadable image is skipped with a warning and replaced by an
    image drawn from (seed, epoch, index, attempt), so a sample depends on neither the worker nor
    the order; the sample's ``skipped`` counts the skips (``skipped_images`` in the batch).
    Evaluation (``replace=False``) never substitutes one: the sample keeps its own label and index,
    has no image, ``valid=False``, the file in ``unreadable`` and the reason in ``error``, so the
    evaluation leaves it out and lists it."""

    def __init__(self, root: str | Path, transform: Callable[[Image.Image], torch.Tensor],
                 max_bad_fraction: float = 0.1, *, replace: bool = True, seed: int = 0) -> None:
        self.replace, self.seed, self.epoch = replace, int(seed), 0
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root} (data.root)")
        classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        self.classes = classes
        if classes:
            self.items = [(p, i) for i, c in enumerate(classes) for p in sorted((self.root / c).rglob("*"))
                          if p.suffix.lower() in IMG_EXTENSIONS]
        else:
            self.items = [(p, -1) for p in sorted(self.root.iterdir()) if p.suffix.lower() in IMG_EXTENSIONS]
        if not self.items:
            raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {self.root}")
        self.transform = transform
        self.reads = ReadFailures(max_bad_fraction, "ImageFolder", "image")

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's replacement draws."""
        self.epoch = int(epoch)

    def _read(self, i: int) -> Image.Image:
        with Image.open(self.items[i][0]) as im:
            return im.convert("RGB")

    def __getitem__(self, index: int) -> dict:
        got = read_item(index, len(self.items), self._read, errors=(OSError, ValueError),
                        name=lambda i: str(self.items[i][0]), reads=self.reads, seed=self.seed, epoch=self.epoch,
                        replace=self.replace)
        image = self.transform(got.value) if got.valid else None
        return {"image": image, "label": self.items[got.item][1], "index": index, **got.fields()}


class SyntheticImages(Dataset):
    """Deterministic smooth random images (low-frequency noise) for unit tests and benchmarks."""

    def __init__(self, length: int = 64, img_size: int = 32, num_classes: int = 10, seed: int = 0) -> None:
        self.length, self.img_size, self.num_classes, self.seed = length, img_size, num_classes, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        g = torch.Generator().manual_seed(mix_seed(self.seed, index, "synthetic"))
        coarse = torch.randn(1, 3, max(self.img_size // 8, 1), max(self.img_size // 8, 1), generator=g)
        img = torch.nn.functional.interpolate(coarse, size=self.img_size, mode="bilinear", align_corners=False)[0]
        return {"image": img, "label": index % self.num_classes, "index": index}


@dataclass
class ImageAugCfg(DataCfg):
    hflip: bool = True
    min_scale: float = 0.2  # RandomResizedCrop lower scale (MAE's pretraining recipe)


@dataclass
class SyntheticCfg(DataCfg):
    length: int = 256  # images per split


@dataclass
class ImageFolderCfg(ImageAugCfg):
    root: str = ""  # train images: root/class_x/*.jpg, or a flat folder (label -1)
    val_root: str = ""  # evaluation images (default: root)


@dataclass
class FashionMNISTCfg(ImageAugCfg):
    root: str = "/usr/share/datasets/fashion-mnist"  # the idx files (Debian's dataset-fashion-mnist)


def _image_transform(cfg, model_cfg):  # noqa: ANN001, ANN202 - cfg is the loaded training config
    from mmmae.data.transforms import mae_train_transform
    return mae_train_transform(model_cfg.img_size, scale=(cfg.data.min_scale, 1.0), hflip=cfg.data.hflip)


@register_dataset("synthetic", SyntheticCfg, "image")
def _build_synthetic(cfg, split: str, model_cfg) -> Dataset:  # noqa: ANN001
    return SyntheticImages(cfg.data.length, model_cfg.img_size, seed=0 if split == "train" else 1)


@register_dataset("image_folder", ImageFolderCfg, "image")
def _build_image_folder(cfg, split: str, model_cfg) -> Dataset:  # noqa: ANN001
    root = cfg.data.root if split == "train" else (cfg.data.val_root or cfg.data.root)
    from mmmae.data.transforms import eval_transform
    tf = _image_transform(cfg, model_cfg) if split == "train" else eval_transform(model_cfg.img_size)
    return ImageFolder(root, tf, cfg.data.max_bad_fraction, replace=split == "train", seed=cfg.train.seed)


@register_dataset("fashion_mnist", FashionMNISTCfg, "image")
def _build_fashion_mnist(cfg, split: str, model_cfg) -> Dataset:  # noqa: ANN001
    from mmmae.data.transforms import eval_transform
    tf = _image_transform(cfg, model_cfg) if split == "train" else eval_transform(model_cfg.img_size, crop_pct=1.0)
    return FashionMNIST(cfg.data.root, "train" if split == "train" else "test", tf)
