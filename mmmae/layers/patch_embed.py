"""Patch and tubelet embeddings: pixels -> tokens (no position information; tokenizers add it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def patch_linear(x: torch.Tensor, proj: nn.Conv2d | nn.Conv3d, pattern: str, **sizes: int) -> torch.Tensor:
    """A stride-equals-kernel convolution as one matmul over non-overlapping patches.

    Same weights (the conv kernel flattened in (C, [pt,] p, p) order) and the same result as the
    convolution, but its backward is a plain matmul: on CPU the convolution's backward took ~7% of a
    ViT-B MAE step (mkldnn, bf16), the matmul a fraction of that. Inputs arrive in fp32; under bf16 /
    fp16 training the weights do not, so the input takes the weights' dtype.
    """
    w = proj.weight
    patches = rearrange(x.to(w.dtype), pattern, **sizes)
    return F.linear(patches, w.flatten(1), proj.bias)


def _pair(x: int | tuple[int, int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


class PatchEmbed2d(nn.Module):
    """(B, C, H, W) -> (B, L, D) with a stride-p convolution; L = (H/p)*(W/p), row-major."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 16,
                 in_chans: int = 3, embed_dim: int = 768, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.in_chans = in_chans
        if self.img_size[0] % self.patch_size[0] or self.img_size[1] % self.patch_size[1]:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, self.patch_size, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.in_chans, *self.img_size):
            raise ValueError(f"expected images of shape (B, {self.in_chans}, {self.img_size[0]}, "
                             f"{self.img_size[1]}), got {tuple(x.shape)}")
        return patch_linear(x, self.proj, "b c (h p) (w q) -> b (h w) (c p q)", p=self.patch_size[0],
                            q=self.patch_size[1])

    def init_weights(self) -> None:
        # MAE: initialise the projection like nn.Linear (xavier on the flattened kernel).
        w = self.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.proj.bias)


class TubeletEmbed3d(nn.Module):
    """(B, C, T, H, W) -> (B, L, D) with a (pt, p, p)-strided 3-D convolution; L t-major."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 16,
                 num_frames: int = 16, tubelet_size: int = 2, in_chans: int = 3, embed_dim: int = 768,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.num_frames = num_frames
        self.tubelet_size = tubelet_size
        self.in_chans = in_chans
        if num_frames % tubelet_size:
            raise ValueError(f"num_frames {num_frames} is not a multiple of tubelet_size {tubelet_size}")
        if self.img_size[0] % self.patch_size[0] or self.img_size[1] % self.patch_size[1]:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        self.grid_size = (num_frames // tubelet_size, self.img_size[0] // self.patch_size[0],
                          self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]
        kernel = (tubelet_size, *self.patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel, kernel, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.in_chans, self.num_frames, *self.img_size)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected videos of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        return patch_linear(x, self.proj, "b c (t u) (h p) (w q) -> b (t h w) (c u p q)", u=self.tubelet_size,
                            p=self.patch_size[0], q=self.patch_size[1])

    def init_weights(self) -> None:
        w = self.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.proj.bias)

    @torch.no_grad()
    def inflate_from_2d(self, weight_2d: torch.Tensor, bias_2d: torch.Tensor | None) -> None:
        """Load a 2-D patch kernel (D, C, p, p): repeated over the tubelet's frames and divided by
        their number, so a static clip gives the same token as the image (BEVT / I3D inflation)."""
        w = weight_2d.unsqueeze(2).repeat(1, 1, self.tubelet_size, 1, 1) / self.tubelet_size
        self.proj.weight.copy_(w)
        if bias_2d is not None:
            self.proj.bias.copy_(bias_2d)
