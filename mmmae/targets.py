"""Reconstruction targets and masked losses."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmmae.layers.fixed import register_fixed_buffer
from mmmae.layers.patchify import patchify, patchify_video

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_per_patch(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's ``norm_pix_loss`` target: each patch (..., P) to zero mean, unit (unbiased) variance."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def image_pixel_target(imgs: torch.Tensor, patch_size: int, norm_pix: bool) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), optionally normalised per patch (MAE)."""
    target = patchify(imgs.float(), patch_size)
    return normalize_per_patch(target) if norm_pix else target


def video_pixel_target(videos: torch.Tensor, patch_size: int, tubelet_size: int, norm_pix: bool, *,
                       unnormalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """VideoMAE's target: (B, C, T, H, W) -> (B, L, pt*p*p*C).

    VideoMAE first undoes the ImageNet normalisation (pixels back to [0, 1]); with ``norm_pix`` every
    tubelet is then normalised per channel over its pt*p*p pixels (unbiased std + eps, outside the
    square root, as in the reference and Hugging Face ``VideoMAEForPreTraining``).
    """
    v = videos.float()
    if unnormalize and v.shape[1] == 3:
        mean = torch.tensor(IMAGENET_MEAN, device=v.device)[None, :, None, None, None]
        std = torch.tensor(IMAGENET_STD, device=v.device)[None, :, None, None, None]
        v = v * std + mean
    t = patchify_video(v, patch_size, tubelet_size, split_channels=True)  # (B, L, P, C)
    if norm_pix:
        t = (t - t.mean(dim=-2, keepdim=True)) / (t.var(dim=-2, keepdim=True).sqrt() + eps)
    return t.flatten(2)


class HOGTarget(nn.Module):
    """Histograms of oriented gradients as a reconstruction target (MaskFeat, Wei et al. 2022, sec. 3).

    Per RGB channel: Sobel gradients, unsigned orientation quantised into ``nbins`` bins (9), the
    gradient magnitude (Gaussian-weighted inside each patch window as MaskFeat does) summed over
    ``cell_size`` x ``cell_size`` cells (8x8); each patch's histograms are L2-normalised together.
    (B, C, H, W) -> (B, L, C * nbins * (p/cell)^2).
    """

    def __init__(self, patch_size: int = 16, nbins: int = 9, cell_size: int = 8, gaussian_sigma: float | None = None) -> None:
        super().__init__()
        if patch_size % cell_size:
            raise ValueError(f"patch_size {patch_size} must be a multiple of cell_size {cell_size}")
        self.patch_size, self.nbins, self.cell_size = patch_size, nbins, cell_size
        def sobel() -> torch.Tensor:
            return torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])

        def window() -> torch.Tensor:
            sigma = gaussian_sigma if gaussian_sigma is not None else patch_size / 2
            r = torch.arange(patch_size, dtype=torch.float32) - (patch_size - 1) / 2
            g = torch.exp(-(r**2) / (2 * sigma**2))
            return torch.outer(g, g)

        register_fixed_buffer(self, "weight_x", lambda: sobel()[None, None])
        register_fixed_buffer(self, "weight_y", lambda: sobel().t()[None, None].contiguous())
        register_fixed_buffer(self, "window", window)

    def out_dim(self, in_chans: int = 3) -> int:
        return in_chans * self.nbins * (self.patch_size // self.cell_size) ** 2

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        b, c, h, w = imgs.shape
        x = F.pad(imgs.float().reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="reflect")
        gx = F.conv2d(x, self.weight_x.float())  # buffers may have been cast to bf16 with the model
        gy = F.conv2d(x, self.weight_y.float())
        mag = torch.sqrt(gx**2 + gy**2)
        # Unsigned orientation in [0, pi) -> nbins bins.
        phase = torch.atan2(gy, gx) % math.pi
        bins = (phase / math.pi * self.nbins).long().clamp_(max=self.nbins - 1)
        p = self.patch_size
        mag = mag * self.window.float().repeat(h // p, w // p)[None, None]
        hist = torch.zeros(b * c, self.nbins, h, w, device=imgs.device)
        hist.scatter_(1, bins, mag)
        cs = self.cell_size
        hist = F.avg_pool2d(hist, cs, stride=cs) * cs * cs  # sum over each cell: (B*C, nbins, h/cs, w/cs)
        hist = hist.reshape(b, c, self.nbins, h // cs, w // cs)
        k = p // cs
        # Group cells by patch: (B, L, C * nbins * k * k).
        hist = hist.reshape(b, c, self.nbins, h // p, k, w // p, k).permute(0, 3, 5, 1, 2, 4, 6)
        hist = hist.reshape(b, (h // p) * (w // p), -1)
        return F.normalize(hist, dim=-1)


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average a (B, L) per-token loss over the tokens where ``mask`` is True only."""
    w = mask.to(per_token.dtype)
    return (per_token * w).sum() / w.sum().clamp(min=1.0)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked tokens: pred/target (B, L, P), mask (B, L) bool."""
    return masked_mean(((pred.float() - target.float()) ** 2).mean(dim=-1), mask)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the masked tokens (SimMIM)."""
    return masked_mean((pred.float() - target.float()).abs().mean(dim=-1), mask)
