"""Pictures of reconstructions: original | masked input | reconstruction (| reconstruction + visible).

The four views come from each method's visualiser (``MethodSpec.visualize``, built on
:mod:`mmmae.visualize`; shared with ``tools/visualize.py``); this module lays them out and saves them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from mmmae.registry import MethodSpec
from mmmae.targets import IMAGENET_MEAN, IMAGENET_STD
from mmmae.visualize import VIEWS


def views_row(views: dict[str, torch.Tensor], index: int) -> torch.Tensor:
    """Sample ``index`` of image views (B, 3, H, W) side by side, in ``VIEWS`` order -> (3, H, 4*W)."""
    return torch.cat([views[k][index] for k in VIEWS], dim=-1)


def image_panel(views: dict[str, torch.Tensor], max_rows: int = 4) -> torch.Tensor:
    """Image views (B, 3, H, W) as one picture: a row per sample (up to ``max_rows``) of the four
    views -> (3, rows*H, 4*W)."""
    n = min(max_rows, views["original"].shape[0])
    return torch.cat([views_row(views, i) for i in range(n)], dim=-2)


def video_panel(views: dict[str, torch.Tensor], max_rows: int = 2, max_frames: int = 4) -> torch.Tensor:
    """Video views (B, 3, T, H, W) as one picture: for each of up to ``max_rows`` samples three strips
    (original | masked input | reconstruction with the visible patches pasted back) of up to
    ``max_frames`` evenly spaced frames -> (3, rows*3*H, frames*W)."""
    n = min(max_rows, views["original"].shape[0])
    t = views["original"].shape[2]
    frames = sorted({int(round(float(i))) for i in torch.linspace(0, t - 1, min(max_frames, t))})
    rows = [torch.cat([views[k][i, :, f] for f in frames], dim=-1)
            for i in range(n) for k in ("original", "masked", "pasted")]
    return torch.cat(rows, dim=-2)


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


def reconstruction_views(spec: MethodSpec, model: Any, batch: dict[str, torch.Tensor],
                         out: dict[str, torch.Tensor], *, mean: Sequence[float] = IMAGENET_MEAN,
                         std: Sequence[float] = IMAGENET_STD) -> dict[str, torch.Tensor] | None:
    """The four views (``mmmae.visualize.VIEWS``) of a forward output, drawn by the method's own
    visualiser (``spec.visualize``): images (B, 3, H, W), videos (B, 3, T, H, W), in [0, 1]; None where
    the method draws none or this output is not pixels. ``mean``/``std``: the normalisation of the
    batch's images."""
    if spec.visualize is None:
        return None
    return spec.visualize(model, batch, out, mean=mean, std=std)


def panel_for(spec: MethodSpec, model: Any, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor]
              ) -> torch.Tensor | None:
    """The training picture: :func:`image_panel` or :func:`video_panel` of the method's views, or None."""
    views = reconstruction_views(spec, model, batch, out)
    if views is None:
        return None
    return video_panel(views) if views["original"].ndim == 5 else image_panel(views)
