"""Image transforms of the reference recipes."""

from __future__ import annotations

from collections.abc import Sequence

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from mmmae.targets import IMAGENET_MEAN, IMAGENET_STD


def mae_train_transform(img_size: int, scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True, *,
                        mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> T.Compose:
    """MAE pretraining: RandomResizedCrop (scale 0.2-1, bicubic), horizontal flip, [0, 1] pixels
    normalised with ``mean`` / ``std`` (ImageNet's by default)."""
    ops = [T.RandomResizedCrop(img_size, scale=scale, interpolation=InterpolationMode.BICUBIC)]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def eval_transform(img_size: int, crop_pct: float = 224 / 256, *, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> T.Compose:
    """Evaluation: resize the short side to img_size / crop_pct (bicubic), centre crop, normalise
    with ``mean`` / ``std`` (ImageNet's by default)."""
    return T.Compose([
        T.Resize(int(round(img_size / crop_pct)), interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(img_size), T.ToTensor(), T.Normalize(mean, std),
    ])
