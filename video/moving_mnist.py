"""Moving Fashion-MNIST: short grey clips of real Fashion-MNIST items that move and spin, with labels
that a single frame cannot give (``data.dataset: moving_fashion_mnist``).

How a clip is made (all sizes from the model block: ``model.num_frames`` frames of ``model.img_size``
pixels, square):

- Objects: ``data.objects`` Fashion-MNIST items (default 2), each resized to ``data.object_size``
  pixels (antialiased) and drawn on a black canvas; where objects overlap the brighter pixel wins
  (max compositing, which does not depend on drawing order). A clip's items all come from one of five
  groups of Fashion-MNIST classes (:data:`GROUPS`: tops, trousers, dresses, footwear, bags), drawn
  uniformly; within the group each item's class and then the item are uniform.
- Motion: each object starts at a uniform position with its whole box inside the canvas and moves at
  a constant speed of ``data.min_speed``..``data.max_speed`` pixels per frame in a uniform direction,
  bouncing off the borders (Moving MNIST's rule, Srivastava et al. 2015). Each object also spins
  about its centre from a uniform start angle at its own ``data.min_spin``..``data.max_spin`` degrees
  per frame; all objects of a clip spin the same way, clockwise or counter-clockwise (uniform).
- Label: ``2 * group + clockwise`` (10 classes): the group and the rotation sense together. Any one
  frame shows the group but not the sense, so a single frame names the label at best half the time;
  the rest has to come from the motion.
- Splits: ``train`` clips use only items of Fashion-MNIST's own train file and ``val`` clips only
  items of its t10k test file, so a model pretrained on ``train`` has never seen an item (or a
  clip) of ``val``. ``data.train_clips`` / ``data.val_clips`` clips per split (``data.limit`` keeps
  the first N).
- Seeds: everything (items, classes, positions, directions, speeds, angles) is drawn from one
  ``torch.Generator`` per split seeded by ``(data.seed, split)``; the same seed gives the same clips
  on any machine, and the training seed (``train.seed``) does not change the data. Clip ``i`` is
  the same whatever ``data.limit`` is.

Clips are rendered once when the dataset is built (``torch.nn.functional.grid_sample`` over all
objects and frames at once) and kept as uint8; a sample is ``{"video": (3, T, H, W), "label",
"index"}``, the grey frames repeated over three channels and normalised with ``data.mean`` /
``data.std`` (ImageNet's by default, as the image sources), so the video methods and the video
classifier read it unchanged. No augmentation: a mirror would turn clockwise into counter-clockwise.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mmmae.data.registry import DataCfg, register_dataset
from mmmae.data.sampler import mix_seed
from mmmae.data.fashion_mnist import FashionMNIST
from mmmae.targets import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["GROUPS", "MovingFashionMNISTCfg", "MovingFashionMNIST", "make_clips", "render_clips"]

# Groups of Fashion-MNIST classes: tops (T-shirt/top, pullover, coat, shirt), trousers, dresses,
# footwear (sandal, sneaker, ankle boot), bags.
GROUPS = ((0, 2, 4, 6), (1,), (3,), (5, 7, 9), (8,))


@dataclass
class MovingFashionMNISTCfg(DataCfg):
    root: str = "/usr/share/datasets/fashion-mnist"  # the idx files (Debian's dataset-fashion-mnist)
    train_clips: int = 10000
    val_clips: int = 2000
    objects: int = 2  # items per clip, all of one class group, all spinning the same way
    object_size: int = 16  # pixels each item is resized to
    min_speed: float = 0.5  # pixels per frame
    max_speed: float = 1.5
    min_spin: float = 12.0  # degrees per frame
    max_spin: float = 24.0
    seed: int = 0  # the clips' seed (independent of train.seed)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))


def _bounce(start: torch.Tensor, velocity: torch.Tensor, frames: int, low: float, high: float) -> torch.Tensor:
    """Positions (N, T) of points starting at ``start`` (N,) with ``velocity`` (N,) per frame, reflected
    at ``low`` and ``high``: the straight path folded back into the interval."""
    t = torch.arange(frames, dtype=start.dtype)
    span = high - low
    free = start[:, None] - low + velocity[:, None] * t  # unfolded distance from low
    folded = torch.remainder(free, 2 * span)
    return low + torch.where(folded > span, 2 * span - folded, folded)


def render_clips(items: torch.Tensor, centres: torch.Tensor, angles: torch.Tensor, size: int) -> torch.Tensor:
    """Draw objects into clips.

    items (N, K, s, s) float in [0, 1], the K objects of N clips already at their drawn size s;
    centres (N, K, T, 2) the (x, y) pixel centre of each object in each frame; angles (N, K, T) in
    radians (positive = counter-clockwise on screen) -> (N, T, size, size) float in [0, 1], objects
    composited by their maximum."""
    n, k, s, _ = items.shape
    t = centres.shape[2]
    # Each canvas pixel samples the item at R(angle) (p - centre) * size / s in the item's own [-1, 1]
    # coordinates (p, centre normalised to [-1, 1] with align_corners=False): canvas offsets are size / s
    # times larger in item units. Screen y points down, so a counter-clockwise turn on screen by a is a
    # rotation by -a in (x, y) pixel coordinates, which sampling undoes with +a. The grid is written out
    # (not F.affine_grid, several times slower on CPU for these many small grids).
    cos, sin = torch.cos(angles).reshape(-1, 1, 1), torch.sin(angles).reshape(-1, 1, 1)
    scale = size / s
    centre = (2 * centres.reshape(-1, 2) + 1) / size - 1
    axis = (2 * torch.arange(size, dtype=items.dtype) + 1) / size - 1
    dx = (axis.view(1, 1, size) - centre[:, 0].view(-1, 1, 1)) * scale
    dy = (axis.view(1, size, 1) - centre[:, 1].view(-1, 1, 1)) * scale
    grid = torch.stack([cos * dx - sin * dy, sin * dx + cos * dy], dim=-1)  # (N*K*T, size, size, 2)
    src = items.unsqueeze(2).expand(n, k, t, s, s).reshape(n * k * t, 1, s, s)
    drawn = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return drawn.reshape(n, k, t, size, size).amax(dim=1)


@functools.lru_cache(maxsize=4)
def make_clips(root: str, split: str, num: int, frames: int, size: int, objects: int, object_size: int,
               speed: tuple[float, float], spin: tuple[float, float], seed: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``num`` clips of a split: uint8 clips (N, T, size, size), labels (N,) and the items
    (N, K) as indices into the Fashion-MNIST file. Kept for the process (a few recent splits), so
    several runs in one process render each split once."""
    k, s = objects, object_size
    source = FashionMNIST(root, "train" if split == "train" else "test")
    g = torch.Generator().manual_seed(mix_seed(seed, split, "moving_fashion_mnist"))
    pix = torch.from_numpy(source.images.copy())
    labels = torch.from_numpy(source.labels.astype("int64"))
    by_class = [torch.nonzero(labels == c).flatten() for c in range(10)]
    group = torch.randint(len(GROUPS), (num,), generator=g)
    clockwise = torch.randint(2, (num,), generator=g)
    # Each item: a class uniform within the clip's group, then an item uniform within the class.
    sizes = torch.tensor([len(grp) for grp in GROUPS])
    members = torch.tensor([list(grp) + [grp[0]] * (4 - len(grp)) for grp in GROUPS])  # (5, 4) padded
    which = (torch.rand(num, k, generator=g) * sizes[group][:, None]).long()
    classes = members[group[:, None], which]
    pick = torch.rand(num, k, generator=g)
    counts = torch.tensor([len(b) for b in by_class])
    items = torch.empty(num, k, dtype=torch.long)
    for c in range(10):
        where = classes == c
        items[where] = by_class[c][(pick[where] * counts[c]).long().clamp_max(counts[c] - 1)]
    lo, hi = (s - 1) / 2, size - 1 - (s - 1) / 2  # object centres that keep the whole box inside
    start = lo + torch.rand(num, k, 2, generator=g) * (hi - lo)
    heading = torch.rand(num, k, generator=g) * 2 * math.pi
    pace = speed[0] + torch.rand(num, k, generator=g) * (speed[1] - speed[0])
    velocity = torch.stack([torch.cos(heading), torch.sin(heading)], -1) * pace[..., None]
    centres = _bounce(start.reshape(-1), velocity.reshape(-1), frames, lo, hi).reshape(num, k, 2, frames)
    turn = torch.deg2rad(spin[0] + torch.rand(num, k, generator=g) * (spin[1] - spin[0]))
    sense = (1.0 - 2.0 * clockwise.float())[:, None]  # clockwise on screen: a negative angle
    angle0 = torch.rand(num, k, generator=g) * 2 * math.pi
    angles = angle0[..., None] + (sense * turn)[..., None] * torch.arange(frames)
    small = F.interpolate(pix[items.flatten()].float().div(255).unsqueeze(1), size=(s, s), mode="bilinear",
                          antialias=True, align_corners=False).reshape(num, k, s, s)
    chunk = max(1, 2048 // (k * frames))  # small per-frame sampling grids (memory-bound work)
    clips = torch.cat([render_clips(small[i:i + chunk], centres[i:i + chunk].transpose(-1, -2), angles[i:i + chunk],
                                    size).mul_(255).round_().clamp_(0, 255).to(torch.uint8)
                       for i in range(0, num, chunk)])
    return clips, 2 * group + clockwise, items


class MovingFashionMNIST(Dataset):
    """The clips of one split (see the module docstring for how they are made)."""

    def __init__(self, cfg: MovingFashionMNISTCfg | Any, split: str, frames: int, size: int) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"moving_fashion_mnist split must be 'train' or 'val', got {split!r}")
        if frames < 1 or size < 1:
            raise ValueError(f"moving_fashion_mnist needs model.num_frames > 0 and model.img_size > 0, got "
                             f"{frames} frames of {size} px")
        k, s = int(cfg.objects), int(cfg.object_size)
        if not 1 <= k <= 10:
            raise ValueError(f"data.objects must be 1..10, got {k}")
        if not 0 < s <= size:
            raise ValueError(f"data.object_size={s} must be in 1..model.img_size ({size})")
        if not (0 <= cfg.min_speed <= cfg.max_speed and 0 < cfg.min_spin <= cfg.max_spin):
            raise ValueError("need 0 <= data.min_speed <= data.max_speed and 0 < data.min_spin <= data.max_spin")
        num = int(cfg.train_clips if split == "train" else cfg.val_clips)
        self.clips, self.labels, self.items = make_clips(
            str(cfg.root), split, num, frames, size, k, s, (float(cfg.min_speed), float(cfg.max_speed)),
            (float(cfg.min_spin), float(cfg.max_spin)), int(cfg.seed))
        if cfg.limit:
            self.clips, self.labels, self.items = self.clips[:cfg.limit], self.labels[:cfg.limit], self.items[:cfg.limit]
        self.mean = torch.tensor(list(cfg.mean), dtype=torch.float32).view(3, 1, 1, 1)
        self.std = torch.tensor(list(cfg.std), dtype=torch.float32).view(3, 1, 1, 1)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict[str, Any]:
        grey = self.clips[index].float().div(255).unsqueeze(0)  # (1, T, H, W)
        video = (grey.expand(3, -1, -1, -1) - self.mean) / self.std
        return {"video": video, "label": int(self.labels[index]), "index": index}


@register_dataset("moving_fashion_mnist", MovingFashionMNISTCfg, "video")
def _build_moving_fashion_mnist(cfg: Any, split: str, model_cfg: Any) -> Dataset:
    return MovingFashionMNIST(cfg.data, "train" if split == "train" else "val", int(model_cfg.num_frames),
                              int(model_cfg.img_size))
