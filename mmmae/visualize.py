"""Reconstructions in pixels: the four views every picture of a masked autoencoder shows.

``original | masked | reconstruction | reconstruction + visible`` (the panels of MAE's
demo/mae_visualize.ipynb ``run_one_image``), each in [0, 1], for images (B, C, H, W) and videos
(B, C, T, H, W). The engine's training pictures, ``tools/visualize.py`` and the method packages
(BEVT draws each frame as an image) all build on these two functions, so the picture logic exists once.

Per-patch normalised predictions (``norm_pix_loss``) are in units of the original patch's own
statistics; they are mapped back with that patch's mean and standard deviation. Images use MAE's
per-patch rule over all p*p*C values of a patch in the model's normalised input space
(facebookresearch/mae models_mae.py ``forward_loss``: ``(target - mean) / (var + 1e-6) ** .5``, unbiased
variance), videos VideoMAE's per-channel rule over a tubelet's pt*p*p pixels in [0, 1]
(MCG-NJU/VideoMAE run_videomae_vis.py: ``rec * (var(unbiased).sqrt() + 1e-6) + mean``; OmniMAE puts
the epsilon inside the root, ``eps_inside_sqrt=True``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from einops import rearrange

from mmmae.layers.patchify import patchify, patchify_video, unpatchify, unpatchify_video
from mmmae.targets import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["VIEWS", "MASK_FILL", "denormalize", "image_views", "video_views", "patch_views", "pixel_target_views"]

VIEWS = ("original", "masked", "reconstruction", "pasted")
MASK_FILL = 0.1  # hidden patches show dark grey in the "masked" view


def denormalize(x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Undo the input normalisation: (B, C, ...) normalised -> (B, C, ...) pixels (not clamped)."""
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(shape)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(shape)
    return x.float() * s + m


def _views(pixels: torch.Tensor, rec: torch.Tensor, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pixels, reconstruction and a pixel mask (1 = hidden), all in [0, 1] space -> the four views."""
    pixels, rec = pixels.clamp(0, 1), rec.clamp(0, 1)
    return {"original": pixels, "masked": pixels * (1 - hidden) + MASK_FILL * hidden,
            "reconstruction": rec, "pasted": pixels * (1 - hidden) + rec * hidden}


@torch.no_grad()
def image_views(image: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool, *,
                mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> dict[str, torch.Tensor]:
    """image (B, C, H, W) normalised with ``mean``/``std``; pred (B, L, p*p*C) in MAE's patch layout
    (per-patch normalised with ``norm_pix``); mask (B, L) bool, True = hidden -> the four views,
    each (B, C, H, W) in [0, 1], on the CPU."""
    img = image.detach().float().cpu()
    pred = pred.detach().float().cpu()
    c, h, w = img.shape[1:]
    grid = (h // patch_size, w // patch_size)
    if pred.shape[1:] != (grid[0] * grid[1], patch_size**2 * c):
        raise ValueError(f"pred {tuple(pred.shape)} is not a (B, {grid[0] * grid[1]}, {patch_size**2 * c}) patch "
                         f"prediction for images {tuple(img.shape)} with {patch_size}-px patches")
    if norm_pix:
        tgt = patchify(img, patch_size)
        pred = pred * (tgt.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + tgt.mean(dim=-1, keepdim=True)
    hidden = unpatchify(mask.detach().cpu()[..., None].float().expand(-1, -1, pred.shape[-1]), patch_size, grid, c)
    return _views(denormalize(img, mean, std), denormalize(unpatchify(pred, patch_size, grid, c), mean, std), hidden)


@torch.no_grad()
def video_views(video: torch.Tensor, pred: torch.Tensor, shown: torch.Tensor, patch_size: int, tubelet_size: int,
                norm_pix: bool, *, eps_inside_sqrt: bool = False, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> dict[str, torch.Tensor]:
    """video (B, C, T, H, W) normalised; pred (B, L, pt*p*p*C) in VideoMAE's tubelet layout (per-channel
    normalised with ``norm_pix``); shown (B, L) bool marks the tokens whose prediction is drawn (the
    hidden ones) -> the four views, each (B, C, T, H, W) in [0, 1], on the CPU."""
    v = denormalize(video.detach().cpu(), mean, std)
    pred = pred.detach().float().cpu()
    c, t, h, w = v.shape[1:]
    grid = (t // tubelet_size, h // patch_size, w // patch_size)
    if norm_pix:
        tgt = patchify_video(v, patch_size, tubelet_size, split_channels=True)  # (B, L, P, C)
        var = tgt.var(dim=-2, keepdim=True)
        scale = (var + 1e-6).sqrt() if eps_inside_sqrt else var.sqrt() + 1e-6
        pred = (rearrange(pred, "b l (p c) -> b l p c", c=c) * scale + tgt.mean(dim=-2, keepdim=True)).flatten(2)
    rec = unpatchify_video(pred, patch_size, tubelet_size, grid, c)
    hidden = unpatchify_video(shown.detach().cpu()[..., None].float().expand(-1, -1, pred.shape[-1]), patch_size,
                              tubelet_size, grid, c)
    return _views(v, rec, hidden)


def patch_views(model: Any, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor], *,
                mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
                ) -> dict[str, torch.Tensor] | None:
    """A method visualiser (``MethodSpec.visualize``) for MAE's layout: ``out["pred"]`` (B, L, p*p*C)
    over ``batch["image"]`` with ``out["mask"]`` (B, L), de-normalised with the model's
    ``cfg.norm_pix_loss``; None for a batch without images (M3AE's text-only batches)."""
    if "image" not in batch or "pred" not in out or "mask" not in out:
        return None
    return image_views(batch["image"], out["pred"], out["mask"], model.cfg.patch_size, model.cfg.norm_pix_loss,
                       mean=mean, std=std)


def pixel_target_views(model: Any, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor], *,
                       mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
                       ) -> dict[str, torch.Tensor] | None:
    """:func:`patch_views` for a method whose ``cfg.target`` chooses pixels or HOG: None for HOG."""
    return patch_views(model, batch, out, mean=mean, std=std) if model.cfg.target == "pixel" else None
