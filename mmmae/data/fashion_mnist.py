"""The Fashion-MNIST idx files (Debian's ``dataset-fashion-mnist``): a dataset every modality may read
(the ``fashion_mnist`` image source, the moving Fashion-MNIST clips of the study)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class FashionMNIST(Dataset):
    """The Fashion-MNIST idx files (Debian's ``dataset-fashion-mnist`` puts them in
    /usr/share/datasets/fashion-mnist). Images are 28x28 grey; they go through ``transform`` as RGB
    PIL images so the same image recipes apply."""

    CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")

    def __init__(self, root: str | Path = "/usr/share/datasets/fashion-mnist", split: str = "train",
                 transform: Callable[[Image.Image], torch.Tensor] | None = None, limit: int = 0) -> None:
        root = Path(root)
        prefix = {"train": "train", "test": "t10k", "val": "t10k"}.get(split)
        if prefix is None:
            raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
        img_path = next((root / f"{prefix}-images-idx3-ubyte{s}" for s in (".gz", "")
                         if (root / f"{prefix}-images-idx3-ubyte{s}").exists()), None)
        lbl_path = next((root / f"{prefix}-labels-idx1-ubyte{s}" for s in (".gz", "")
                         if (root / f"{prefix}-labels-idx1-ubyte{s}").exists()), None)
        if img_path is None or lbl_path is None:
            raise FileNotFoundError(f"Fashion-MNIST {split} idx files not found under {root} (data.root); "
                                    "on Debian: apt-get install dataset-fashion-mnist")
        self.images = _read_idx(img_path)
        self.labels = _read_idx(lbl_path)
        if limit:
            self.images, self.labels = self.images[:limit], self.labels[:limit]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        img = Image.fromarray(self.images[index]).convert("RGB")
        x = self.transform(img) if self.transform else torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
        return {"image": x, "label": int(self.labels[index]), "index": index}
