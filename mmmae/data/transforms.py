"""Image transforms of the reference recipes."""

from __future__ import annotations

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from mmmae.targets import IMAGENET_MEAN, IMAGENET_STD


def mae_train_transform(img_size: int, scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True) -> T.Compose:
    """MAE pretraining: RandomResizedCrop (scale 0.2-1, bicubic), horizontal flip, ImageNet normalisation."""
    ops = [T.RandomResizedCrop(img_size, scale=scale, interpolation=InterpolationMode.BICUBIC)]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    ops += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(ops)


def eval_transform(img_size: int, crop_pct: float = 224 / 256) -> T.Compose:
    """Evaluation: resize the short side to img_size / crop_pct (bicubic), centre crop, normalise."""
    return T.Compose([
        T.Resize(int(round(img_size / crop_pct)), interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(img_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
