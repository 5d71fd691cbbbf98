"""Pictures of reconstructions: original | masked input | reconstruction (| reconstruction + visible).

The four views come from :mod:`mmmae.visualize` (shared with ``tools/visualize.py`` and the method
packages); this module lays them out and saves them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from mmmae.targets import IMAGENET_MEAN, IMAGENET_STD
from mmmae.visualize import VIEWS, image_views


def views_row(views: dict[str, torch.Tensor], index: int) -> torch.Tensor:
    """Sample ``index`` of image views (B, 3, H, W) side by side, in ``VIEWS`` order -> (3, H, 4*W)."""
    return torch.cat([views[k][index] for k in VIEWS], dim=-1)


def reconstruction_panel(image: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
                         norm_pix: bool, max_rows: int = 4, *, mean: Sequence[float] = IMAGENET_MEAN,
                         std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """One row per sample: original | masked | reconstruction | reconstruction with visible patches
    pasted back. image (B, 3, H, W) normalised, pred (B, L, p*p*3), mask (B, L) -> (3, rows*H, 4*W) in [0, 1].

    With a per-patch normalised target the prediction is mapped back with the original patch's mean
    and variance (:func:`mmmae.visualize.image_views`), so the picture shows pixels.
    """
    n = min(max_rows, image.shape[0])
    views = image_views(image[:n], pred[:n], mask[:n], patch_size, norm_pix, mean=mean, std=std)
    return torch.cat([views_row(views, i) for i in range(n)], dim=-2)


def to_uint8(panel_chw: torch.Tensor, min_side: int = 256) -> torch.Tensor:
    """A (3, H, W) picture in [0, 1] -> (H', W', 3) uint8; small pictures (tiny test models) are
    enlarged up to 8x with nearest-neighbour so patches stay crisp."""
    scale = min(8, max(1, min_side // max(min(panel_chw.shape[1:]), 1)))
    if scale > 1:
        panel_chw = panel_chw.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return (panel_chw.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)


def save_png(panel_chw: torch.Tensor, path: str | Path, min_side: int = 256) -> None:
    """Save a (3, H, W) picture in [0, 1] (enlarged as :func:`to_uint8`)."""
    arr = to_uint8(panel_chw, min_side).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def reconstruction_views(model: Any, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor], *,
                         mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
                         ) -> dict[str, torch.Tensor] | None:
    """The four views (``mmmae.visualize.VIEWS``) of a pixel method's forward output: images
    (B, 3, H, W), videos (B, 3, T, H, W), in [0, 1]; None where the output is not pixels (HOG or
    token targets, classifiers). ``mean``/``std``: the image normalisation of ``batch["image"]``.

    Methods whose prediction is not MAE's image patch layout (tubelets, BEVT's frames) draw their own
    views (``model.reconstruction_views``); the rest are MAE-layout image predictions."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or getattr(cfg, "target", "pixel") != "pixel":
        return None
    if hasattr(model, "reconstruction_views"):
        return model.reconstruction_views(batch, out)
    if "image" not in batch or "pred" not in out or "mask" not in out:
        return None
    p, pred = cfg.patch_size, out["pred"]
    if pred.shape[1] != out["mask"].shape[1] or pred.shape[-1] != p * p * batch["image"].shape[1]:
        return None
    return image_views(batch["image"], pred, out["mask"], p, bool(getattr(cfg, "norm_pix_loss", False)),
                       mean=mean, std=std)


def panel_for(model: Any, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The reconstruction picture for pixel methods; None where the output is not pixels. Videos show
    their middle tubelet's first frame."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or "pred" not in out or "mask" not in out or getattr(cfg, "target", "pixel") != "pixel":
        return None
    if "image" in batch and out["pred"].shape[1] == out["mask"].shape[1] and not getattr(cfg, "num_frames", 0):
        p = cfg.patch_size
        if out["pred"].shape[-1] != p * p * 3:
            return None
        return reconstruction_panel(batch["image"], out["pred"], out["mask"], p, bool(getattr(cfg, "norm_pix_loss", False)))
    if "video" in batch and hasattr(model, "video_panel"):
        return model.video_panel(batch, out)
    return None
