"""Mask generators and the token gather / restore ops.

One convention everywhere: a bool ``mask`` of shape (B, L) with ``True`` = hidden. Index forms:
``ids_keep`` (B, K) are the visible token indices in increasing order, ``ids_mask`` (B, M) the hidden
ones, ``ids_restore`` (B, L) the permutation that puts ``cat([kept, hidden])`` back in token order.
Every sample in a batch hides the same number of tokens (batched gathers need a common K); the
boundary functions check it.

The one exception is BEiT's block-wise masking (BEVT), whose hidden count varies by sample: such
masks only feed the mask-token path (``check_mask(..., equal_counts=False)``), never index gathers.

Generators are plain functions of an explicit ``torch.Generator`` so the data pipeline (collate) makes
masks reproducibly; they run on CPU and return CPU tensors.

Count rules. How many of L tokens a ratio hides differs between the references, so the generators take
the rule as an argument (``count_rule``) and each method passes its own reference's:
``num_masked`` (MAE, M3AE: keep ``int(L * (1 - ratio))``; 147 of 196 at 0.75) and ``num_masked_floor``
(VideoMAE / VideoMAEv2 TubeMaskingGenerator per frame, OmniMAE RandMasking: hide ``int(ratio * L)``;
176 of 196 per frame at 0.9, 1411 of 1568 where MAE's rule gives 177 and 1412).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

# (num_tokens, mask_ratio) -> hidden count.
CountRule = Callable[[int, float], int]
# A BEiT mask block: (top, left, height, width) in tokens.
Block = tuple[int, int, int, int]


def _checked_count(num_tokens: int, mask_ratio: float, hidden: int) -> int:
    """The shared bounds of every count rule: a ratio in [0, 1) that leaves a visible token."""
    if hidden >= num_tokens:
        raise ValueError(f"mask_ratio {mask_ratio} hides all {num_tokens} tokens and leaves none visible; "
                         "use a smaller ratio or more tokens")
    return hidden


def _check_ratio(num_tokens: int, mask_ratio: float) -> None:
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")


def num_masked(num_tokens: int, mask_ratio: float) -> int:
    """MAE's count rule (facebookresearch/mae models_mae.py ``random_masking``; also M3AE): keep
    ``int(L * (1 - ratio))`` tokens, hide the rest."""
    _check_ratio(num_tokens, mask_ratio)
    return _checked_count(num_tokens, mask_ratio, num_tokens - int(num_tokens * (1 - mask_ratio)))


def num_masked_floor(num_tokens: int, mask_ratio: float) -> int:
    """VideoMAE's and OmniMAE's count rule: hide ``int(ratio * L)`` tokens (MCG-NJU/VideoMAE and
    OpenGVLab/VideoMAEv2 masking_generator.py ``TubeMaskingGenerator``, per frame; facebookresearch/omnivore
    omnivision/data/transforms/mask_image_modeling.py ``RandMasking``, over the whole clip)."""
    _check_ratio(num_tokens, mask_ratio)
    return _checked_count(num_tokens, mask_ratio, int(mask_ratio * num_tokens))


def _rand_topk_mask(batch_size: int, num_tokens: int, count: int,
                    generator: torch.Generator | None) -> torch.Tensor:
    """(B, N) bool with exactly ``count`` True per row, uniformly at random (argsort of noise, as MAE)."""
    noise = torch.rand(batch_size, num_tokens, generator=generator)
    ids = noise.argsort(dim=1)[:, :count]
    mask = torch.zeros(batch_size, num_tokens, dtype=torch.bool)
    mask.scatter_(1, ids, True)
    return mask


def random_mask(batch_size: int, num_tokens: int, mask_ratio: float, *, count_rule: CountRule = num_masked,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random masking -> (B, L) bool with ``count_rule(L, ratio)`` hidden per row (default
    MAE's rule; OmniMAE passes ``num_masked_floor``)."""
    return _rand_topk_mask(batch_size, num_tokens, count_rule(num_tokens, mask_ratio), generator)


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
              count_rule: CountRule = num_masked_floor, generator: torch.Generator | None = None) -> torch.Tensor:
    """VideoMAE tube masking: one random 2-D mask repeated over every time slice.

    ``count_rule(H*W, ratio)`` tokens are hidden per slice; the default is VideoMAE's
    ``TubeMaskingGenerator`` rule, ``int(ratio * H*W)`` (176 of 196 at 0.9, 1408 of 1568 at 8x14x14).
    grid_size (T, H, W) in tokens -> (B, T*H*W) bool, t-major like the tubelet embedding.
    """
    gt, gh, gw = grid_size
    frame = random_mask(batch_size, gh * gw, mask_ratio, count_rule=count_rule, generator=generator)
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


def _beit_log_aspect(min_aspect: float, max_aspect: float | None) -> tuple[float, float]:
    """BEiT's log aspect range; ``max_aspect=None`` means 1 / min_aspect (``max_aspect or 1 / min_aspect``)."""
    if not min_aspect > 0.0:
        raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
    hi = max_aspect or 1.0 / min_aspect
    if hi < min_aspect:
        raise ValueError(f"aspect range must satisfy min_aspect <= max_aspect, got ({min_aspect}, {hi})")
    return math.log(min_aspect), math.log(hi)


def _check_beit_args(grid_size: tuple[int, int], num_masking_patches: int, min_num_patches: int,
                     max_num_patches: int | None) -> None:
    gh, gw = grid_size
    if gh < 2 or gw < 2:
        raise ValueError(f"BEiT block masking needs a token grid of at least 2x2 (blocks are smaller than the "
                         f"grid), got {grid_size}")
    if not 0 <= num_masking_patches < gh * gw:
        raise ValueError(f"num_masking_patches must be in [0, {gh * gw}) for a {grid_size} token grid so that a "
                         f"token stays visible, got {num_masking_patches}")
    if min_num_patches < 1:
        raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
    if max_num_patches is not None and max_num_patches < 1:
        raise ValueError(f"max_num_patches must be >= 1 or None (the target count), got {max_num_patches}")


def _beit_try_block(mask: torch.Tensor, budget: int, min_num_patches: int, log_aspect: tuple[float, float],
                    generator: torch.Generator | None) -> Block | None:
    """BEiT's ``MaskingGenerator._mask``: up to 10 attempts at one rectangle that adds between 1 and
    ``budget`` new hidden tokens; paints it into ``mask`` (H, W) and returns it, or None."""
    gh, gw = mask.shape
    for _ in range(10):
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        # random.uniform(min_num_patches, budget): also valid when budget < min_num_patches.
        area = min_num_patches + (budget - min_num_patches) * u[0]
        aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u[1])
        # Python's round (half to even), as BEiT's int(round(...)).
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if w < gw and h < gh:  # strictly smaller than the grid
            top = min(int(u[2] * (gh - h + 1)), gh - h)  # random.randint(0, H - h), inclusive
            left = min(int(u[3] * (gw - w + 1)), gw - w)
            new = h * w - int(mask[top:top + h, left:left + w].sum())
            if 0 < new <= budget:
                mask[top:top + h, left:left + w] = True
                return top, left, h, w
    return None


def beit_blocks(grid_size: tuple[int, int], num_masking_patches: int, *, min_num_patches: int = 4,
                max_num_patches: int | None = None, min_aspect: float = 0.3, max_aspect: float | None = None,
                generator: torch.Generator | None = None) -> list[Block]:
    """One BEiT block-wise mask, as the rectangles it is the union of, in the order they were drawn.

    A re-statement of microsoft/unilm beit/masking_generator.py ``MaskingGenerator`` (copied unchanged
    into xyzforever/BEVT mmaction/datasets/pipelines/mask_generator.py): while fewer than
    ``num_masking_patches`` tokens are hidden, draw a rectangle of area ~ U(min_num_patches, budget)
    (budget = min(remaining, max_num_patches); ``None`` = BEiT's default, the target count) and
    aspect ratio log-uniform in [min_aspect, max_aspect] (``None`` = 1 / min_aspect), strictly smaller
    than the grid, kept if it adds 1..budget new tokens; stop when 10 attempts in a row fail. The
    hidden count never exceeds the target and may fall short of it (mean ~97.5 of 98 on 14x14 with
    min_num_patches=16). Rounding lets a block be a little smaller than min_num_patches.
    """
    _check_beit_args(grid_size, num_masking_patches, min_num_patches, max_num_patches)
    log_aspect = _beit_log_aspect(min_aspect, max_aspect)
    cap = num_masking_patches if max_num_patches is None else max_num_patches
    mask = torch.zeros(grid_size, dtype=torch.bool)
    blocks: list[Block] = []
    count = 0
    while count < num_masking_patches:
        block = _beit_try_block(mask, min(num_masking_patches - count, cap), min_num_patches, log_aspect, generator)
        if block is None:
            break
        blocks.append(block)
        count = int(mask.sum())
    return blocks


def paint_blocks(grid_size: tuple[int, int], blocks: list[Block]) -> torch.Tensor:
    """The (H*W,) bool mask, row-major, that hides the union of ``blocks``."""
    mask = torch.zeros(grid_size, dtype=torch.bool)
    for top, left, h, w in blocks:
        mask[top:top + h, left:left + w] = True
    return mask.flatten()


def beit_block_mask(batch_size: int, grid_size: tuple[int, int], num_masking_patches: int, *,
                    min_num_patches: int = 4, max_num_patches: int | None = None, min_aspect: float = 0.3,
                    max_aspect: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """BEiT block-wise masking (``beit_blocks``) per sample -> (B, H*W) bool, row-major.

    Hidden counts vary by sample (at most ``num_masking_patches``): use with mask tokens only.
    Defaults are BEiT's ``MaskingGenerator`` defaults; BEiT's and BEVT's configs pass
    min_num_patches=16.
    """
    _check_beit_args(grid_size, num_masking_patches, min_num_patches, max_num_patches)
    _beit_log_aspect(min_aspect, max_aspect)
    rows = [paint_blocks(grid_size, beit_blocks(grid_size, num_masking_patches, min_num_patches=min_num_patches,
                                                max_num_patches=max_num_patches, min_aspect=min_aspect,
                                                max_aspect=max_aspect, generator=generator))
            for _ in range(batch_size)]
    return torch.stack(rows) if rows else torch.zeros(0, grid_size[0] * grid_size[1], dtype=torch.bool)


def cyclic_run_bounds(num_slices: int, tube_range: tuple[float, float]) -> tuple[int, int]:
    """BEVT's run lengths (mask_generator.py ``MaskedPositionGenerate``): from ``max(int(lo * T), 1)``
    to ``min(int(hi * T), T)`` time slices, inclusive; (0.5, 1.0) over 8 slices -> (4, 8)."""
    lo_share, hi_share = tube_range
    if not 0.0 <= lo_share <= hi_share <= 1.0:
        raise ValueError(f"tube_range must satisfy 0 <= low <= high <= 1, got {tube_range}")
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    lo, hi = max(int(lo_share * num_slices), 1), min(int(hi_share * num_slices), num_slices)
    if hi < lo:
        raise ValueError(f"tube_range {tube_range} over {num_slices} time slices gives no run length "
                         f"(from {lo} to {hi})")
    return lo, hi


def cyclic_tube_mask(frame_mask: torch.Tensor, num_slices: int, tube_range: tuple[float, float] = (0.5, 1.0), *,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """BEVT's video masking: each sample's 2-D mask over a random cyclic run of time slices.

    xyzforever/BEVT mask_generator.py ``MaskedPositionGenerate``: start ~ U{0..T-1}, length ~
    U{lo..hi} (``cyclic_run_bounds``), and a run that passes the last slice wraps to the first.
    frame_mask (B, H*W) bool -> (B, T*H*W) bool, t-major.
    """
    b, hw = frame_mask.shape
    lo, hi = cyclic_run_bounds(num_slices, tube_range)
    start = torch.randint(0, num_slices, (b,), generator=generator)
    length = torch.randint(lo, hi + 1, (b,), generator=generator)
    offset = (torch.arange(num_slices)[None, :] - start[:, None]) % num_slices  # (B, T) slices after the start
    on = offset < length[:, None]
    return (on[:, :, None] & frame_mask[:, None, :]).reshape(b, num_slices * hw)


@dataclass(frozen=True)
class MaskIndices:
    """Index forms of a mask: ``ids_keep`` (B, K), ``ids_mask`` (B, M), ``ids_restore`` (B, L)."""

    ids_keep: torch.Tensor
    ids_mask: torch.Tensor
    ids_restore: torch.Tensor


def check_mask(mask: torch.Tensor, num_tokens: int | None = None, *, equal_counts: bool = True) -> int:
    """Validate a (B, L) bool mask and return the common hidden count M (the largest per-sample count
    with ``equal_counts=False``).

    ``equal_counts=False`` is for the mask-token path only (SimMIM / BEVT replace hidden tokens in place,
    so BEiT's per-sample counts are fine there); dropping tokens (``ids_keep``) needs a common count.
    """
    if mask.dtype != torch.bool or mask.ndim != 2:
        raise ValueError(f"mask must be a (B, L) bool tensor, got {mask.dtype} of shape {tuple(mask.shape)}")
    if num_tokens is not None and mask.shape[1] != num_tokens:
        raise ValueError(f"mask covers {mask.shape[1]} tokens but the input has {num_tokens}")
    if not mask.shape[0]:
        return 0
    counts = mask.sum(dim=1)
    if equal_counts and bool((counts != counts[0]).any()):
        raise ValueError("every sample in a batch must hide the same number of tokens; got hidden counts "
                         f"{counts.tolist()}")
    return int(counts.max())


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
