"""Patchify / unpatchify for images and videos, in the layouts the reference targets use.

Images follow MAE: patch ``(p, q, c)`` with the channel fastest (``nchpwq->nhwpqc``).
Videos follow VideoMAE: tokens ordered ``(t, h, w)``, each patch ``(pt, ph, pw, c)`` with the channel
fastest, which is what its per-channel normalised target expects.
"""

from __future__ import annotations

import torch
from einops import rearrange


def _as_pair(x: int | tuple[int, int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def patchify(imgs: torch.Tensor, patch_size: int | tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, ph*pw*C), L = (H/ph)*(W/pw), row-major over the patch grid."""
    ph, pw = _as_pair(patch_size)
    b, c, h, w = imgs.shape
    if h % ph or w % pw:
        raise ValueError(f"image size {(h, w)} is not a multiple of the patch size {(ph, pw)}")
    return rearrange(imgs, "b c (h p) (w q) -> b (h w) (p q c)", p=ph, q=pw)


def unpatchify(x: torch.Tensor, patch_size: int | tuple[int, int], grid_size: tuple[int, int],
               channels: int = 3) -> torch.Tensor:
    """(B, L, ph*pw*C) -> (B, C, H, W); the inverse of :func:`patchify`."""
    ph, pw = _as_pair(patch_size)
    gh, gw = grid_size
    if x.shape[1] != gh * gw or x.shape[2] != ph * pw * channels:
        raise ValueError(f"tokens {tuple(x.shape)} do not match grid {grid_size}, patch {(ph, pw)}, C={channels}")
    return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=gh, w=gw, p=ph, q=pw, c=channels)


def patchify_video(videos: torch.Tensor, patch_size: int | tuple[int, int], tubelet_size: int,
                   *, split_channels: bool = False) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, L, pt*ph*pw*C), or (B, L, pt*ph*pw, C) with ``split_channels``.

    L = (T/pt)*(H/ph)*(W/pw), t-major. ``split_channels`` keeps C apart for per-channel statistics.
    """
    ph, pw = _as_pair(patch_size)
    b, c, t, h, w = videos.shape
    if t % tubelet_size or h % ph or w % pw:
        raise ValueError(f"video size {(t, h, w)} is not a multiple of the tubelet {(tubelet_size, ph, pw)}")
    pattern = "b c (t u) (h p) (w q) -> b (t h w) (u p q) c" if split_channels \
        else "b c (t u) (h p) (w q) -> b (t h w) (u p q c)"
    return rearrange(videos, pattern, u=tubelet_size, p=ph, q=pw)


def unpatchify_video(x: torch.Tensor, patch_size: int | tuple[int, int], tubelet_size: int,
                     grid_size: tuple[int, int, int], channels: int = 3) -> torch.Tensor:
    """(B, L, pt*ph*pw*C) -> (B, C, T, H, W); the inverse of :func:`patchify_video`."""
    ph, pw = _as_pair(patch_size)
    gt, gh, gw = grid_size
    if x.shape[1] != gt * gh * gw or x.shape[2] != tubelet_size * ph * pw * channels:
        raise ValueError(f"tokens {tuple(x.shape)} do not match grid {grid_size}, tubelet "
                         f"{(tubelet_size, ph, pw)}, C={channels}")
    return rearrange(x, "b (t h w) (u p q c) -> b c (t u) (h p) (w q)", t=gt, h=gh, w=gw,
                     u=tubelet_size, p=ph, q=pw, c=channels)
