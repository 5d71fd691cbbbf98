"""Clip transforms in plain torch; one random draw per clip, so every frame gets the same crop.

Layouts, told apart by dtype:

- uint8 clips are ``(T, H, W, 3)``, as decoders return them;
- float clips are ``(3, T, H, W)``, as models take them.

Spatial transforms keep the layout and dtype they are given (a resized uint8 clip is rounded
back to uint8, as PIL does in the VideoMAE pipeline), so cropping happens on the small uint8
frames and only ``Normalize`` makes the float model input. Every transform is called as
``transform(clip, generator)``; random ones draw only from that ``torch.Generator``, which makes
a clip's augmentation a function of the generator's seed.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np

import torch
import torch.nn.functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ClipTransform",
    "Compose",
    "MultiScaleCrop",
    "RandomResizedCropVideo",
    "RandomHorizontalFlipVideo",
    "ShortSideResize",
    "CenterCropVideo",
    "SpatialCrops",
    "Normalize",
    "resize_clip",
    "crop_clip",
    "hflip_clip",
    "pretrain_transform",
    "finetune_transform",
    "RandAugmentVideo",
    "RandomErasingVideo",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ClipTransform = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """An int or (H, W) -> (H, W)."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _spatial_dims(clip: torch.Tensor) -> tuple[int, int]:
    """(H, W) of a clip in either layout; rejects anything else."""
    if clip.dtype == torch.uint8:
        if clip.ndim != 4 or clip.shape[-1] != 3:
            raise ValueError(f"uint8 clips are (T, H, W, 3), got {tuple(clip.shape)}")
        return clip.shape[1], clip.shape[2]
    if clip.is_floating_point():
        if clip.ndim != 4 or clip.shape[0] != 3:
            raise ValueError(f"float clips are (3, T, H, W), got {tuple(clip.shape)}")
        return clip.shape[2], clip.shape[3]
    raise TypeError(f"clips are uint8 (T, H, W, 3) or float (3, T, H, W), got {clip.dtype}")


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high] inclusive."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64).item())


def crop_clip(clip: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """The same window of every frame (a view, no copy)."""
    h, w = _spatial_dims(clip)
    if top < 0 or left < 0 or top + height > h or left + width > w or height < 1 or width < 1:
        raise ValueError(f"crop ({top}, {left}, {height}, {width}) outside a {h}x{w} clip")
    if clip.dtype == torch.uint8:
        return clip[:, top : top + height, left : left + width, :]
    return clip[:, :, top : top + height, left : left + width]


def resize_clip(clip: torch.Tensor, size: tuple[int, int], antialias: bool = True) -> torch.Tensor:
    """Bilinear resize of every frame to ``size = (H, W)``, same layout and dtype.

    ``antialias=True`` matches PIL's bilinear resize, which widens its filter when shrinking (VideoMAE's
    pretraining crops: transforms.py ``GroupMultiScaleCrop`` resizes PIL images). ``antialias=False`` is
    the plain two-tap bilinear of ``cv2.resize(..., INTER_LINEAR)`` (VideoMAE's test resize,
    functional.py ``resize_clip``) and of ``F.interpolate`` (its fine-tuning crop): pixel centres at
    ``(i + 0.5) * scale - 0.5``, clamped at the borders, for enlarging and shrinking alike (OpenCV
    switches an exact 2x shrink to INTER_AREA, which gives the same 2x2 means). On uint8 frames
    OpenCV's 11-bit fixed-point weights can differ from this float result by one grey level.
    """
    h, w = _spatial_dims(clip)
    if (h, w) == tuple(size):
        return clip
    if clip.dtype == torch.uint8:
        x = clip.permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    else:
        x = clip.permute(1, 0, 2, 3)  # (T, 3, H, W) view
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)
    if clip.dtype == torch.uint8:
        return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return x.permute(1, 0, 2, 3).contiguous()


def hflip_clip(clip: torch.Tensor) -> torch.Tensor:
    """Mirror every frame left-right."""
    _spatial_dims(clip)
    return clip.flip(2 if clip.dtype == torch.uint8 else 3)


class Compose:
    """Apply transforms in order, handing each the same generator."""

    def __init__(self, transforms: Sequence[ClipTransform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, clip: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for t in self.transforms:
            clip = t(clip, generator)
        return clip

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class MultiScaleCrop:
    """VideoMAE's ``GroupMultiScaleCrop``: a crop whose sides come from a few scales of the short
    side, placed at one of a fixed grid of offsets, then resized to ``input_size``.

    Crop sides are ``int(short_side * s)`` for ``s`` in ``scales``, snapped to the input size
    when within 3 px of it; height and width scales may differ by at most ``max_distort`` steps
    in the scale list; offsets are drawn from 5 (corners + centre) or, with ``more_fix_crop``, 13
    positions on a quarter-step grid (``fix_crop=False``: anywhere).

    Args:
        input_size: output (H, W), or an int for a square.
    """

    def __init__(
        self,
        input_size: int | Sequence[int] = 224,
        scales: Sequence[float] = (1.0, 0.875, 0.75, 0.66),
        max_distort: int = 1,
        fix_crop: bool = True,
        more_fix_crop: bool = True,
    ) -> None:
        self.input_size = _pair(input_size)
        self.scales = tuple(scales)
        self.max_distort = max_distort
        self.fix_crop = fix_crop
        self.more_fix_crop = more_fix_crop

    def crop_candidates(self, image_h: int, image_w: int) -> list[tuple[int, int]]:
        """All (crop_h, crop_w) pairs the crop can take for an image of this size."""
        base = min(image_h, image_w)
        sizes = [int(base * s) for s in self.scales]
        out_h, out_w = self.input_size
        crop_h = [out_h if abs(x - out_h) < 3 else x for x in sizes]
        crop_w = [out_w if abs(x - out_w) < 3 else x for x in sizes]
        # The pair list is built height-major, like VideoMAE's, so equal seeds pick the same pair.
        return [
            (h, w)
            for i, h in enumerate(crop_h)
            for j, w in enumerate(crop_w)
            if abs(i - j) <= self.max_distort
        ]

    @staticmethod
    def fixed_offsets(image_h: int, image_w: int, crop_h: int, crop_w: int, more: bool = True) -> list[tuple[int, int]]:
        """Candidate (top, left) offsets: corners and centre, plus edge centres and quarter points."""
        hs = (image_h - crop_h) // 4
        ws = (image_w - crop_w) // 4
        grid = [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2)]  # (row step, column step)
        if more:
            grid += [(2, 0), (2, 4), (4, 2), (0, 2), (1, 1), (1, 3), (3, 1), (3, 3)]
        return [(r * hs, c * ws) for r, c in grid]

    def sample(self, image_h: int, image_w: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
        """Draw (top, left, crop_h, crop_w)."""
        pairs = self.crop_candidates(image_h, image_w)
        crop_h, crop_w = pairs[_randint(0, len(pairs) - 1, generator)]
        # A crop snapped up to the input size can exceed a small frame; keep it inside.
        crop_h, crop_w = min(crop_h, image_h), min(crop_w, image_w)
        if self.fix_crop:
            offsets = self.fixed_offsets(image_h, image_w, crop_h, crop_w, self.more_fix_crop)
            top, left = offsets[_randint(0, len(offsets) - 1, generator)]
        else:
            top = _randint(0, image_h - crop_h, generator)
            left = _randint(0, image_w - crop_w, generator)
        return top, left, crop_h, crop_w

    def __call__(self, clip: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(T, H, W, 3) uint8 or (3, T, H, W) float -> same layout at ``input_size``."""
        h, w = _spatial_dims(clip)
        top, left, ch, cw = self.sample(h, w, generator)
        return resize_clip(crop_clip(clip, top, left, ch, cw), self.input_size)

    def __repr__(self) -> str:
        return f"MultiScaleCrop(input_size={self.input_size}, scales={self.scales}, max_distort={self.max_distort})"


class RandomResizedCropVideo:
    """Inception-style random-resized crop (torchvision's sampling rule), one box for all frames,
    then an optional horizontal flip with probability 0.5 (off by default: it changes the
    meaning of direction-dependent classes, e.g. Something-Something's "left"/"right").

    Args:
        size: output (H, W), or an int for a square.
        scale: range of the crop's area as a fraction of the frame.
        ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
        antialias: see :func:`resize_clip`; VideoMAE's fine-tuning crop (video_transforms.py
            ``random_resized_crop``) is ``F.interpolate`` bilinear without it.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        hflip: bool = False,
        antialias: bool = True,
    ) -> None:
        if scale[0] > scale[1] or ratio[0] > ratio[1]:
            raise ValueError(f"scale {scale} and ratio {ratio} must be (min, max)")
        self.size = _pair(size)
        self.scale = scale
        self.ratio = ratio
        self.hflip = hflip
        self.antialias = antialias

    def sample(self, image_h: int, image_w: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
        """Draw (top, left, crop_h, crop_w): up to 10 tries at a random area and aspect ratio,
        else the largest centred crop whose ratio is clamped into range."""
        area = image_h * image_w
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * _uniform(self.scale[0], self.scale[1], generator)
            aspect = math.exp(_uniform(log_lo, log_hi, generator))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= image_w and 0 < h <= image_h:
                top = _randint(0, image_h - h, generator)
                left = _randint(0, image_w - w, generator)
                return top, left, h, w
        in_ratio = image_w / image_h
        if in_ratio < self.ratio[0]:
            w, h = image_w, int(round(image_w / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = image_h, int(round(image_h * self.ratio[1]))
        else:
            h, w = image_h, image_w
        return (image_h - h) // 2, (image_w - w) // 2, h, w

    def __call__(self, clip: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(T, H, W, 3) uint8 or (3, T, H, W) float -> same layout at ``size``."""
        h, w = _spatial_dims(clip)
        top, left, ch, cw = self.sample(h, w, generator)
        out = resize_clip(crop_clip(clip, top, left, ch, cw), self.size, self.antialias)
        # The flip coin is drawn only when flipping is on, so turning it on does not shift the
        # crops drawn for the same seed.
        if self.hflip and float(torch.rand((), generator=generator).item()) < 0.5:
            out = hflip_clip(out)
        return out

    def __repr__(self) -> str:
        return f"RandomResizedCropVideo(size={self.size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip})"


class RandomHorizontalFlipVideo:
    """Mirror the whole clip with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, clip: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if float(torch.rand((), generator=generator).item()) < self.p:
            return hflip_clip(clip)
        return clip


class ShortSideResize:
    """Resize so the short side is ``size``, keeping the aspect ratio (long side truncated to an
    int, as torchvision's ``Resize(int)`` and VideoMAE's functional.py ``get_resize_sizes`` do).
    ``antialias``: see :func:`resize_clip` (False for VideoMAE's cv2 test resize)."""

    def __init__(self, size: int, antialias: bool = True) -> None:
        self.size = size
        self.antialias = antialias

    def output_size(self, image_h: int, image_w: int) -> tuple[int, int]:
        if image_h <= image_w:
            return self.size, max(1, int(self.size * image_w / image_h))
        return max(1, int(self.size * image_h / image_w)), self.size

    def __call__(self, clip: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        h, w = _spatial_dims(clip)
        return resize_clip(clip, self.output_size(h, w), self.antialias)

    def __repr__(self) -> str:
        return f"ShortSideResize({self.size}, antialias={self.antialias})"


class CenterCropVideo:
    """Centre crop to ``size`` (frames must be at least that large)."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _pair(size)

    def __call__(self, clip: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        h, w = _spatial_dims(clip)
        ch, cw = self.size
        return crop_clip(clip, (h - ch) // 2, (w - cw) // 2, ch, cw)


class SpatialCrops:
    """Test-time spatial views: ``num_crops`` square crops of side ``size``.

    ``num_crops=1``: the centre crop. ``num_crops=3``: start, centre and end of the long side
    (left/centre/right for landscape frames, top/centre/bottom for portrait), centred on the
    short side, as in SlowFast's ``uniform_crop`` and VideoMAE's test loader. Resize the short
    side to ``size`` first so the three views together cover the whole frame.

    Returns:
        the views stacked on a new first axis: uint8 ``(N, T, size, size, 3)`` or float
        ``(N, 3, T, size, size)``.
    """

    def __init__(self, size: int, num_crops: int = 3) -> None:
        if num_crops not in (1, 3):
            raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
        self.size = size
        self.num_crops = num_crops

    def offsets(self, image_h: int, image_w: int) -> list[tuple[int, int]]:
        """(top, left) of each view."""
        s = self.size
        if image_h < s or image_w < s:
            raise ValueError(f"{image_h}x{image_w} frames are smaller than the {s}px test crop; resize first")
        centre = ((image_h - s) // 2, (image_w - s) // 2)
        if self.num_crops == 1:
            return [centre]
        if image_h > image_w:
            return [(0, centre[1]), centre, (image_h - s, centre[1])]
        return [(centre[0], 0), centre, (centre[0], image_w - s)]

    def __call__(self, clip: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        h, w = _spatial_dims(clip)
        return torch.stack([crop_clip(clip, t, l, self.size, self.size) for t, l in self.offsets(h, w)])

    def __repr__(self) -> str:
        return f"SpatialCrops(size={self.size}, num_crops={self.num_crops})"


class Normalize:
    """uint8 ``(T, H, W, 3)`` in [0, 255] -> float ``(3, T, H, W)``, ``(x / 255 - mean) / std``.

    A float ``(3, T, H, W)`` clip is taken to be in [0, 1] already and is only standardised.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1, 1)

    def __call__(self, clip: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _spatial_dims(clip)
        if clip.dtype == torch.uint8:
            # Fold 1/255 into the scale so the float clip is touched once after the permute.
            x = clip.permute(3, 0, 1, 2).to(torch.float32)
            return (x - self.mean * 255.0).div_(self.std * 255.0)
        return (clip.to(torch.float32) - self.mean) / self.std

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def pretrain_transform(input_size: int = 224, scales: Sequence[float] = (1.0, 0.875, 0.75, 0.66)) -> Compose:
    """VideoMAE pretraining augmentation: multi-scale crop, then ImageNet normalisation."""
    return Compose([MultiScaleCrop(input_size, scales=scales), Normalize()])


@contextmanager
def _seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global RNGs for a block and put them back afterwards:
    timm's augmentations draw from them, and the clip's own generator must decide instead."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _draw_seed(generator: torch.Generator | None) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


class RandAugmentVideo:
    """timm's RandAugment (e.g. VideoMAE's fine-tuning ``rand-m7-n4-mstd0.5-inc1``) with the same
    operations and magnitudes on every frame of a clip: each frame is augmented from the same RNG
    state, drawn from the clip's generator. uint8 (T, H, W, 3) -> uint8 (T, H, W, 3)."""

    def __init__(self, config_str: str = "rand-m7-n4-mstd0.5-inc1") -> None:
        from timm.data.auto_augment import rand_augment_transform
        self.config_str = config_str
        self._make = lambda size: rand_augment_transform(
            config_str, {"translate_const": int(size * 0.45), "img_mean": (124, 116, 104)})

    def __call__(self, clip: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        from PIL import Image
        if clip.dtype != torch.uint8 or clip.ndim != 4:
            raise ValueError(f"RandAugmentVideo takes uint8 (T, H, W, 3) clips, got {clip.dtype} {tuple(clip.shape)}")
        ra = self._make(min(clip.shape[1], clip.shape[2]))
        seed = _draw_seed(generator)
        frames = []
        for frame in clip.numpy():
            with _seeded_global_rngs(seed):
                frames.append(np.asarray(ra(Image.fromarray(frame))))
        return torch.from_numpy(np.stack(frames))

    def __repr__(self) -> str:
        return f"RandAugmentVideo({self.config_str!r})"


class RandomErasingVideo:
    """timm's RandomErasing on a normalised clip, frame by frame as VideoMAE's fine-tuning applies it
    (the frames are the batch axis): float (3, T, H, W) -> (3, T, H, W). Randomness from the clip's
    generator."""

    def __init__(self, probability: float = 0.25, mode: str = "pixel", max_count: int = 1) -> None:
        from timm.data.random_erasing import RandomErasing
        self.probability = probability
        self.erase = RandomErasing(probability, mode=mode, max_count=max_count, num_splits=0, device="cpu")

    def __call__(self, clip: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if not clip.is_floating_point() or clip.ndim != 4:
            raise ValueError(f"RandomErasingVideo takes float (3, T, H, W) clips, got {clip.dtype} {tuple(clip.shape)}")
        with _seeded_global_rngs(_draw_seed(generator)):
            return self.erase(clip.transpose(0, 1).contiguous()).transpose(0, 1)

    def __repr__(self) -> str:
        return f"RandomErasingVideo(p={self.probability})"


def finetune_transform(
    input_size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: bool = False,
    rand_augment: str = "",
    erase_prob: float = 0.0,
) -> Compose:
    """Fine-tuning augmentation in VideoMAE's order: RandAugment on the whole frames (``rand_augment``,
    e.g. ``rand-m7-n4-mstd0.5-inc1``; empty = off), random-resized crop (optional flip),
    normalisation, then random erasing of each frame with probability ``erase_prob``. The crop is
    resized without antialiasing, as VideoMAE's ``F.interpolate`` crop (video_transforms.py
    ``random_resized_crop``); ``hflip`` is off for Something-Something v2 (kinetics.py / ssv2.py
    ``_aug_frame``: ``random_horizontal_flip=False if args.data_set == 'SSV2'``)."""
    ops: list[ClipTransform] = [RandAugmentVideo(rand_augment)] if rand_augment else []
    ops += [RandomResizedCropVideo(input_size, scale=scale, hflip=hflip, antialias=False), Normalize()]
    if erase_prob > 0:
        ops.append(RandomErasingVideo(erase_prob))
    return Compose(ops)


# ---------------------------------------------------------------------------------------------------
# Device-side augmentation (``data.gpu_augment``): the workers decode and cut the crop box; the resize,
# flip and normalisation run on the training device, a batch at a time.

class WorkerCrop:
    """The worker half of device-side augmentation. It makes the same draws, in the same order, from
    the same generator as the CPU transform it splits (``before`` transforms, then ``crop.sample``, then
    the flip coin of a flipping ``RandomResizedCropVideo``), and cuts only the crop box:
    uint8 (T, H, W, 3) -> ``{"video": uint8 (T, h, w, 3) crop, "video_flip": bool}``. The crops of a
    batch differ in size, so the collate keeps them as a list for :class:`DeviceAugment`."""

    def __init__(self, crop: MultiScaleCrop | RandomResizedCropVideo, before: Sequence[ClipTransform] = ()) -> None:
        self.crop, self.before = crop, list(before)

    @property
    def antialias(self) -> bool:
        """The resize the CPU path would apply after this crop."""
        return True if isinstance(self.crop, MultiScaleCrop) else self.crop.antialias

    @property
    def size(self) -> tuple[int, int]:
        return self.crop.input_size if isinstance(self.crop, MultiScaleCrop) else self.crop.size

    def __call__(self, clip: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, Any]:
        if clip.dtype != torch.uint8:
            raise ValueError(f"WorkerCrop takes decoded uint8 (T, H, W, 3) clips, got {clip.dtype}")
        for t in self.before:
            clip = t(clip, generator)
        h, w = _spatial_dims(clip)
        top, left, ch, cw = self.crop.sample(h, w, generator)
        flip = (isinstance(self.crop, RandomResizedCropVideo) and self.crop.hflip
                and float(torch.rand((), generator=generator).item()) < 0.5)
        return {"video": crop_clip(clip, top, left, ch, cw).contiguous(), "video_flip": bool(flip)}

    def __repr__(self) -> str:
        return f"WorkerCrop({self.crop!r}, before={self.before})"


class DeviceAugment:
    """The device half: a batch's uint8 crops (a list, or a stacked tensor when they share a size) are
    moved to ``device``, resized to ``size`` by the CPU path's own :func:`resize_clip` (uint8 rounding
    included), flipped where the worker drew it, normalised, and stacked -> ``batch["video"]`` float
    (B, 3, T, S, S). On the CPU it gives exactly the CPU path's clips (tests/test_video_augment.py)."""

    def __init__(self, size: tuple[int, int], antialias: bool, device: torch.device | str = "cpu",
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.size, self.antialias, self.device = tuple(size), antialias, torch.device(device)
        self.normalize = Normalize(mean, std)
        self.normalize.mean = self.normalize.mean.to(self.device)
        self.normalize.std = self.normalize.std.to(self.device)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        clips, flips = batch["video"], batch["video_flip"]
        out = []
        for clip, flip in zip(clips, flips.tolist() if torch.is_tensor(flips) else flips):
            x = resize_clip(clip.to(self.device, non_blocking=True), self.size, self.antialias)
            out.append(self.normalize(hflip_clip(x) if flip else x))
        rest = {k: v for k, v in batch.items() if k != "video_flip"}
        return {**rest, "video": torch.stack(out)}

    def __repr__(self) -> str:
        return f"DeviceAugment(size={self.size}, antialias={self.antialias}, device={self.device})"
