"""Pictures of reconstructions: original | masked input | reconstruction (| reconstruction + visible)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mmmae.layers.patchify import patchify, unpatchify
from mmmae.targets import IMAGENET_MEAN, IMAGENET_STD


def _denorm(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (x.float().cpu() * std + mean).clamp(0, 1)


def reconstruction_panel(image: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
                         norm_pix: bool, max_rows: int = 4) -> torch.Tensor:
    """One row per sample: original | masked | reconstruction | reconstruction with visible patches
    pasted back. image (B, 3, H, W) normalised, pred (B, L, p*p*3), mask (B, L) -> (3, rows*H, 4*W) in [0, 1].

    With a per-patch normalised target the prediction is mapped back with the original patch's mean
    and variance (as MAE's visualisation does), so the picture shows pixels.
    """
    n = min(max_rows, image.shape[0])
    img = image[:n].float().cpu()
    pred = pred[:n].float().cpu()
    m = mask[:n].cpu()
    h, w = img.shape[-2:]
    grid = (h // patch_size, w // patch_size)
    if norm_pix:
        tgt = patchify(img, patch_size)
        mean, var = tgt.mean(-1, keepdim=True), tgt.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    rec = unpatchify(pred, patch_size, grid)
    pix_mask = unpatchify(m[..., None].float().expand(-1, -1, patch_size**2 * 3), patch_size, grid)
    masked = img * (1 - pix_mask) + (-3.0) * pix_mask  # hidden patches show dark
    pasted = img * (1 - pix_mask) + rec * pix_mask
    rows = [torch.cat([_denorm(a) for a in (img[i], masked[i], rec[i], pasted[i])], dim=-1) for i in range(n)]
    return torch.cat(rows, dim=-2)


def save_png(panel_chw: torch.Tensor, path: str | Path, min_side: int = 256) -> None:
    """Save a (3, H, W) picture in [0, 1]; small pictures (tiny test models) are enlarged with
    nearest-neighbour so patches stay crisp."""
    scale = min(8, max(1, min_side // max(min(panel_chw.shape[1:]), 1)))
    if scale > 1:
        panel_chw = panel_chw.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    arr = (panel_chw.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


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
