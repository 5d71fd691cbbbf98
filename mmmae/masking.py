"""Mask generators and the token gather / restore ops.

One convention everywhere: a bool ``mask`` of shape (B, L) with ``True`` = hidden. Index forms:
``ids_keep`` (B, K) are the visible token indices in increasing order, ``ids_mask`` (B, M) the hidden
ones, ``ids_restore`` (B, L) the permutation that puts ``cat([kept, hidden])`` back in token order.
Every sample in a batch hides the same number of tokens (batched gathers need a common K); the
boundary functions check it.

Generators are plain functions of an explicit ``torch.Generator`` so the data pipeline (collate) makes
masks reproducibly; they run on CPU and return CPU tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def num_masked(num_tokens: int, mask_ratio: float) -> int:
    """Tokens hidden for a ratio; MAE keeps ``int(L * (1 - ratio))`` tokens."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return num_tokens - int(num_tokens * (1 - mask_ratio))


def _rand_topk_mask(batch_size: int, num_tokens: int, count: int,
                    generator: torch.Generator | None) -> torch.Tensor:
    """(B, N) bool with exactly ``count`` True per row, uniformly at random (argsort of noise, as MAE)."""
    noise = torch.rand(batch_size, num_tokens, generator=generator)
    ids = noise.argsort(dim=1)[:, :count]
    mask = torch.zeros(batch_size, num_tokens, dtype=torch.bool)
    mask.scatter_(1, ids, True)
    return mask


def random_mask(batch_size: int, num_tokens: int, mask_ratio: float, *,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """MAE's per-sample random masking -> (B, L) bool."""
    return _rand_topk_mask(batch_size, num_tokens, num_masked(num_tokens, mask_ratio), generator)


def mask_from_noise(noise: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """The mask MAE (and Hugging Face ViTMAE) derive from per-token noise: the lowest
    ``int(L * (1 - ratio))`` noise values stay visible. noise (B, L) -> mask (B, L) bool."""
    b, n = noise.shape
    keep = n - num_masked(n, mask_ratio)
    ids_keep = noise.argsort(dim=1)[:, :keep]
    mask = torch.ones(b, n, dtype=torch.bool, device=noise.device)
    mask.scatter_(1, ids_keep, False)
    return mask


def block_mask(batch_size: int, grid_size: tuple[int, int], mask_ratio: float, *, mask_patch_size: int = 2,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """SimMIM block-wise masking: hide whole ``mask_patch_size x mask_patch_size`` token blocks.

    ``mask_patch_size`` is in tokens (SimMIM's 32-px blocks over 16-px patches -> 2). Exactly
    ``ceil(blocks * ratio)`` blocks are hidden, so every sample hides the same number of tokens.
    Returns (B, H*W) bool, row-major over the token grid.
    """
    gh, gw = grid_size
    s = mask_patch_size
    if gh % s or gw % s:
        raise ValueError(f"token grid {grid_size} is not a multiple of mask_patch_size {s}")
    bh, bw = gh // s, gw // s
    count = int(math.ceil(bh * bw * mask_ratio))
    if count >= bh * bw:
        raise ValueError(f"block masking of a {grid_size} token grid in {s}x{s} blocks at ratio {mask_ratio} hides "
                         f"all {bh * bw} blocks; use a smaller mask_patch_size or a larger image")
    blocks = _rand_topk_mask(batch_size, bh * bw, count, generator).view(batch_size, bh, bw)
    mask = blocks.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)
    return mask.reshape(batch_size, gh * gw)


def tube_mask(batch_size: int, grid_size: tuple[int, int, int], mask_ratio: float, *,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """VideoMAE tube masking: one random 2-D mask repeated over every time slice.

    grid_size (T, H, W) in tokens -> (B, T*H*W) bool, t-major like the tubelet embedding.
    """
    gt, gh, gw = grid_size
    frame = random_mask(batch_size, gh * gw, mask_ratio, generator=generator)
    return frame[:, None, :].expand(batch_size, gt, gh * gw).reshape(batch_size, gt * gh * gw)


def running_cell_mask(batch_size: int, grid_size: tuple[int, int, int], mask_ratio: float = 0.5, *,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """VideoMAEv2's running-cell masking, used to choose which tokens the decoder reconstructs.

    The token grid is tiled by 2x2 cells; in each cell ``int(4 * ratio)`` positions are hidden and
    the hidden positions shift by one step every time slice, so over time every location is covered.
    One random phase per sample. Returns (B, T*H*W) bool (True = not reconstructed).
    """
    gt, gh, gw = grid_size
    if gh % 2 or gw % 2:
        raise ValueError(f"running-cell masking needs an even spatial token grid, got {(gh, gw)}")
    hidden_per_cell = int(4 * mask_ratio)  # VideoMAEv2 truncates
    if not 0 < hidden_per_cell < 4:
        raise ValueError(f"running-cell mask_ratio must give 1..3 of 4 cell positions, got {mask_ratio}")
    queue = torch.tensor([True] * hidden_per_cell + [False] * (4 - hidden_per_cell))
    phase = torch.randint(0, 4, (batch_size,), generator=generator)
    steps = phase[:, None] + torch.arange(1, gt + 1)[None, :]  # (B, T): VideoMAEv2 advances before use
    cells = (torch.arange(4)[None, None, :] + steps[:, :, None]) % 4  # (B, T, 4)
    cell_masks = queue[cells].view(batch_size, gt, 2, 2)
    full = cell_masks.repeat(1, 1, gh // 2, gw // 2)  # tile the 2x2 cell over the grid
    return full.reshape(batch_size, gt * gh * gw)


@dataclass(frozen=True)
class MaskIndices:
    """Index forms of a mask: ``ids_keep`` (B, K), ``ids_mask`` (B, M), ``ids_restore`` (B, L)."""

    ids_keep: torch.Tensor
    ids_mask: torch.Tensor
    ids_restore: torch.Tensor


def check_mask(mask: torch.Tensor, num_tokens: int | None = None) -> int:
    """Validate a (B, L) bool mask and return the common hidden count M."""
    if mask.dtype != torch.bool or mask.ndim != 2:
        raise ValueError(f"mask must be a (B, L) bool tensor, got {mask.dtype} of shape {tuple(mask.shape)}")
    if num_tokens is not None and mask.shape[1] != num_tokens:
        raise ValueError(f"mask covers {mask.shape[1]} tokens but the input has {num_tokens}")
    counts = mask.sum(dim=1)
    if mask.shape[0] and bool((counts != counts[0]).any()):
        raise ValueError("every sample in a batch must hide the same number of tokens; got hidden counts "
                         f"{counts.tolist()}")
    return int(counts[0]) if mask.shape[0] else 0


def mask_to_indices(mask: torch.Tensor) -> MaskIndices:
    """(B, L) bool -> index forms. Visible and hidden indices come out in increasing order."""
    m = check_mask(mask)
    # A stable sort of the 0/1 mask lists visible tokens first, each group in token order.
    ids_shuffle = mask.to(torch.uint8).argsort(dim=1, stable=True)
    ids_restore = ids_shuffle.argsort(dim=1)
    k = mask.shape[1] - m
    return MaskIndices(ids_keep=ids_shuffle[:, :k], ids_mask=ids_shuffle[:, k:], ids_restore=ids_restore)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (B, L, D), ids (B, K) -> (B, K, D). Also accepts x (1, L, D) (a shared table)."""
    if x.shape[0] == 1 and ids.shape[0] != 1:
        return x[0][ids]
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def restore_tokens(x_kept: torch.Tensor, ids_restore: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Put visible tokens back in place and fill the hidden ones.

    x_kept (B, K, D), ids_restore (B, L), fill broadcastable to (B, L-K, D) (e.g. a (1, 1, D) mask
    token) -> (B, L, D).
    """
    b, k, d = x_kept.shape
    n = ids_restore.shape[1]
    filler = fill.to(x_kept.dtype).expand(b, n - k, d)
    return gather_tokens(torch.cat([x_kept, filler], dim=1), ids_restore)
