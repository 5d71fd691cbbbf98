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

# Per-channel (mean, std) that images in [0, 1] are normalised with, by the names of
# young-geng/m3ae_public m3ae/data.py ``ImageTextDataset`` (``config.image_normalization``, default
# "cc12m": CC12M's own statistics; "imagenet" is its ImageNet datasets' default; "none" leaves [0, 1]).
IMAGE_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cc12m": ((0.5762, 0.5503, 0.5213), (0.3207, 0.3169, 0.3307)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


def image_stats(name: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) of a normalisation named as in M3AE's data config (``IMAGE_STATS``)."""
    if name not in IMAGE_STATS:
        raise ValueError(f"image normalisation must be one of {', '.join(IMAGE_STATS)}, got {name!r}")
    return IMAGE_STATS[name]


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
                       unnormalize: bool = True, eps: float = 1e-6, eps_inside_sqrt: bool = False) -> torch.Tensor:
    """Per-channel tubelet pixels as a target: (B, C, T, H, W) -> (B, L, pt*p*p*C).

    The ImageNet normalisation is undone first (pixels back to [0, 1]); with ``norm_pix`` every
    tubelet is then normalised per channel over its pt*p*p pixels with the unbiased variance. Where
    the epsilon goes differs between the references, and matters on flat patches (std ~ 0):
    VideoMAE (MCG-NJU/VideoMAE engine_for_pretraining.py, as Hugging Face ``VideoMAEForPreTraining``)
    divides by ``std + eps`` (the default here); OmniMAE (facebookresearch/omnivore
    omnivision/losses/mae_loss.py ``MAELoss.compute_mae_loss`` with ``norm_pix_per_channel``) divides by
    ``(var + eps) ** 0.5`` (``eps_inside_sqrt=True``), as MAE does per patch.
    """
    v = videos.float()
    if unnormalize and v.shape[1] == 3:
        mean = torch.tensor(IMAGENET_MEAN, device=v.device)[None, :, None, None, None]
        std = torch.tensor(IMAGENET_STD, device=v.device)[None, :, None, None, None]
        v = v * std + mean
    t = patchify_video(v, patch_size, tubelet_size, split_channels=True)  # (B, L, P, C)
    if norm_pix:
        var = t.var(dim=-2, keepdim=True)
        scale = (var + eps).sqrt() if eps_inside_sqrt else var.sqrt() + eps
        t = (t - t.mean(dim=-2, keepdim=True)) / scale
    return t.flatten(2)


HOG_VARIANTS = ("maskfeat", "mmpretrain")


def gaussian_window(size: int, std: float) -> torch.Tensor:
    """(size, size) Gaussian, centred between the middle pixels, normalised to sum 1 (mmpretrain
    ``HOGGenerator.get_gaussian_kernel``; SlowFast ``slowfast/models/utils.py`` ``get_gkern``)."""
    r = (torch.arange(size, dtype=torch.float32) - (size - 1) / 2) / std
    g = torch.exp(-0.5 * r**2)
    g2 = torch.outer(g, g)
    return g2 / g2.sum()


class HOGTarget(nn.Module):
    """Histograms of oriented gradients as a reconstruction target (MaskFeat, Wei et al. 2022, sec. 3).

    As SlowFast's ``HOGLayerC`` (slowfast/models/operators.py) and the way ``MaskMViT._get_hog_label_2d``
    (slowfast/models/masked.py) groups it: per colour channel, 3x3 Sobel gradients on the reflect-padded
    image; each pixel's magnitude goes to bin ``floor(atan2(gx, gy) / pi * nbins) mod nbins``
    (unsigned orientation, 9 bins); bins are summed over ``cell_size`` x ``cell_size`` cells (8x8) and
    each cell's histogram is L2-normalised on its own (per channel); a patch's target is its cells'
    histograms, ordered (channel, bin, cell row, cell column).
    (B, C, H, W) -> (B, L, C * nbins * (p/cell)^2).

    ``variant="maskfeat"`` (default) uses no spatial weighting, as MaskFeat's own code (``HOGLayerC``
    is built with ``gaussian_window=0``). ``variant="mmpretrain"`` weights each magnitude by a
    ``gaussian_window``-pixel Gaussian (std ``gaussian_window // 2``, normalised to sum 1) tiled over
    the image, as open-mmlab/mmpretrain's ``HOGGenerator`` (mmpretrain/models/selfsup/maskfeat.py,
    ``gaussian_window=16``).
    """

    def __init__(self, patch_size: int = 16, nbins: int = 9, cell_size: int = 8, variant: str = "maskfeat",
                 gaussian_window_size: int = 16) -> None:
        super().__init__()
        if variant not in HOG_VARIANTS:
            raise ValueError(f"HOG variant must be one of {HOG_VARIANTS}, got {variant!r}")
        if patch_size % cell_size:
            raise ValueError(f"patch_size {patch_size} must be a multiple of cell_size {cell_size}")
        if variant == "mmpretrain" and gaussian_window_size <= 0:
            raise ValueError(f"gaussian_window_size must be > 0 for the mmpretrain HOG, got {gaussian_window_size}")
        self.patch_size, self.nbins, self.cell_size, self.variant = patch_size, nbins, cell_size, variant
        self.window_size = gaussian_window_size if variant == "mmpretrain" else 0

        def sobel_x() -> torch.Tensor:  # HOGLayerC's weight_x; weight_y is its transpose
            return torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])[None, None]

        register_fixed_buffer(self, "weight_x", sobel_x)
        register_fixed_buffer(self, "weight_y", lambda: sobel_x().transpose(2, 3).contiguous())
        if self.window_size:
            size = self.window_size
            register_fixed_buffer(self, "window", lambda: gaussian_window(size, float(size // 2)))

    def out_dim(self, in_chans: int = 3) -> int:
        return in_chans * self.nbins * (self.patch_size // self.cell_size) ** 2

    def _check_size(self, h: int, w: int) -> None:
        for side in (self.patch_size, self.window_size):
            if side and (h % side or w % side):
                raise ValueError(f"HOG needs image sides that are multiples of {side}, got {h}x{w}")

    def cell_histograms(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, nbins, H/cell, W/cell): each cell's histogram, unit L2 norm (or zero)."""
        b, c, h, w = imgs.shape
        self._check_size(h, w)
        x = F.pad(imgs.float().reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="reflect")
        gx = F.conv2d(x, self.weight_x.float())  # buffers may have been cast to bf16 with the model
        gy = F.conv2d(x, self.weight_y.float())
        mag = torch.sqrt(gx**2 + gy**2)
        # HOGLayerC's binning, argument order included: atan2(gx, gy) in (-pi, pi] scaled to (-9, 9],
        # floored, then taken mod 9 (so opposite gradients share a bin).
        bins = torch.floor(torch.atan2(gx, gy) / math.pi * self.nbins).long().remainder(self.nbins)
        if self.window_size:
            ws = self.window_size
            mag = mag * self.window.float().repeat(h // ws, w // ws)
        hist = torch.zeros(b * c, self.nbins, h, w, device=imgs.device)
        hist.scatter_add_(1, bins, mag)
        cs = self.cell_size
        hist = hist.reshape(b, c, self.nbins, h // cs, cs, w // cs, cs).sum(dim=(4, 6))
        return F.normalize(hist, p=2, dim=2)  # per cell and channel, over the bins (HOGLayerC)

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, C * nbins * k * k), k = patch/cell, tokens in row-major patch order."""
        hist = self.cell_histograms(imgs)
        b, c, nb, hc, wc = hist.shape
        k = self.patch_size // self.cell_size
        # MaskMViT._get_hog_label_2d: flatten (channel, bin), unfold k x k cells per patch.
        hist = hist.reshape(b, c, nb, hc // k, k, wc // k, k).permute(0, 3, 5, 1, 2, 4, 6)
        return hist.reshape(b, (hc // k) * (wc // k), -1)

    @torch.no_grad()
    def forward_video(self, videos: torch.Tensor, tubelet_size: int) -> torch.Tensor:
        """MaskFeat's video target (``MaskMViT._get_hog_label_3d``): the HOG of the first frame of each
        tubelet (frames ``::tubelet_size``). (B, C, T, H, W) -> (B, T/pt * h*w, C * nbins * k * k)."""
        if videos.ndim != 5 or videos.shape[2] % tubelet_size:
            raise ValueError(f"expected videos (B, C, T, H, W) with T a multiple of {tubelet_size}, "
                             f"got {tuple(videos.shape)}")
        b = videos.shape[0]
        frames = videos[:, :, ::tubelet_size].transpose(1, 2).flatten(0, 1)  # (B*T/pt, C, H, W)
        per_frame = self(frames)
        return per_frame.reshape(b, -1, per_frame.shape[-1])


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
