"""Mask generators and the gather / restore ops (mmmae.masking)."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from mmmae.masking import (beit_block_mask, block_mask, check_mask, cyclic_tube_mask, gather_tokens, mask_from_noise,
                           mask_to_indices, num_masked, num_masked_floor, random_mask, restore_tokens,
                           running_cell_mask, tube_mask)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# exact counts


# (L, ratio, hidden): MAE keeps int(L * (1 - ratio)) tokens; the rest are hidden.
RANDOM_CASES = [(196, 0.75, 147), (196, 0.9, 177), (16, 0.75, 12), (16, 0.5, 8), (49, 0.6, 30), (10, 0.0, 0),
                (1568, 0.9, 1412), (7, 0.25, 2)]


@pytest.mark.parametrize("length, ratio, hidden", RANDOM_CASES)
def test_random_mask_exact_count(length: int, ratio: float, hidden: int) -> None:
    assert num_masked(length, ratio) == hidden
    m = random_mask(5, length, ratio, generator=_gen(0))
    assert m.dtype == torch.bool and m.shape == (5, length)
    assert m.sum(dim=1).tolist() == [hidden] * 5


# (L, ratio, hidden): VideoMAE's TubeMaskingGenerator (per frame) and OmniMAE's RandMasking hide int(ratio * L).
FLOOR_CASES = [(196, 0.9, 176), (1568, 0.9, 1411), (196, 0.75, 147), (196, 0.95, 186), (1568, 0.95, 1489),
               (16, 0.9, 14), (10, 0.0, 0), (7, 0.25, 1)]


@pytest.mark.parametrize("length, ratio, hidden", FLOOR_CASES)
def test_floor_count_rule(length: int, ratio: float, hidden: int) -> None:
    assert num_masked_floor(length, ratio) == hidden
    m = random_mask(3, length, ratio, count_rule=num_masked_floor, generator=_gen(0))
    assert m.sum(dim=1).tolist() == [hidden] * 3


@pytest.mark.parametrize("rule", [num_masked, num_masked_floor])
def test_count_rules_reject_bad_ratio(rule: Callable[[int, float], int]) -> None:
    for r in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="mask_ratio must be in"):
            rule(16, r)
    with pytest.raises(ValueError, match="num_tokens"):
        rule(0, 0.5)


def test_a_ratio_that_leaves_no_visible_token_is_an_error() -> None:
    # MAE's rule keeps int(4 * (1 - 0.8)) = int(0.8) = 0 of 4 tokens, and int(1 * 0.5) = 0 of 1.
    with pytest.raises(ValueError, match="0.8 hides all 4 tokens"):
        num_masked(4, 0.8)
    with pytest.raises(ValueError, match="0.8 hides all 4 tokens"):
        random_mask(2, 4, 0.8)
    with pytest.raises(ValueError, match="hides all 1 tokens"):
        tube_mask(2, (2, 1, 1), 0.5, count_rule=num_masked)
    # The floor rule hides int(ratio * L) < L for every ratio < 1, so it always leaves a token visible.
    assert num_masked_floor(4, 0.8) == 3 and num_masked_floor(1, 0.5) == 0


# (grid, s, ratio, hidden blocks): SimMIM hides ceil(blocks * ratio) whole s x s blocks.
BLOCK_CASES = [((8, 8), 2, 0.6, 10), ((8, 8), 2, 0.5, 8), ((8, 8), 2, 0.25, 4), ((12, 12), 2, 0.6, 22),
               ((6, 4), 2, 0.5, 3), ((4, 4), 2, 0.6, 3), ((6, 6), 3, 0.75, 3), ((8, 4), 4, 0.1, 1)]


@pytest.mark.parametrize("grid, s, ratio, blocks_hidden", BLOCK_CASES)
def test_block_mask_whole_blocks_exact_count(grid: tuple[int, int], s: int, ratio: float,
                                             blocks_hidden: int) -> None:
    gh, gw = grid
    m = block_mask(4, grid, ratio, mask_patch_size=s, generator=_gen(1))
    assert m.dtype == torch.bool and m.shape == (4, gh * gw)
    assert m.sum(dim=1).tolist() == [blocks_hidden * s * s] * 4
    # Every s x s block of tokens is either all hidden or all visible.
    blocks = m.view(4, gh // s, s, gw // s, s).permute(0, 1, 3, 2, 4).reshape(4, gh // s, gw // s, s * s)
    assert bool((blocks.all(-1) | ~blocks.any(-1)).all())
    assert blocks.all(-1).sum(dim=(1, 2)).tolist() == [blocks_hidden] * 4


def test_block_mask_rejects_indivisible_grid() -> None:
    with pytest.raises(ValueError, match="multiple"):
        block_mask(1, (5, 4), 0.5, mask_patch_size=2)


# (grid, ratio, hidden per slice): VideoMAE's TubeMaskingGenerator hides int(ratio * H*W) per slice.
TUBE_CASES = [((8, 4, 4), 0.9, 14), ((2, 14, 14), 0.75, 147), ((3, 2, 6), 0.5, 6), ((8, 14, 14), 0.9, 176)]


@pytest.mark.parametrize("grid, ratio, per_slice", TUBE_CASES)
def test_tube_mask_constant_over_time(grid: tuple[int, int, int], ratio: float, per_slice: int) -> None:
    gt, gh, gw = grid
    m = tube_mask(3, grid, ratio, generator=_gen(2))
    assert m.shape == (3, gt * gh * gw)
    per_frame = m.view(3, gt, gh * gw)
    assert torch.equal(per_frame, per_frame[:, :1].expand_as(per_frame))
    assert m.sum(dim=1).tolist() == [gt * per_slice] * 3


def test_tube_mask_takes_a_count_rule() -> None:
    # 8x14x14 at 0.9: VideoMAE's rule hides 176 per slice (1408), MAE's rule would hide 177 (1416).
    assert tube_mask(2, (8, 14, 14), 0.9, generator=_gen(2)).sum(1).tolist() == [1408, 1408]
    assert tube_mask(2, (8, 14, 14), 0.9, count_rule=num_masked, generator=_gen(2)).sum(1).tolist() == [1416, 1416]


@pytest.mark.parametrize("ratio, per_cell", [(0.5, 2), (0.25, 1), (0.75, 3), (0.6, 2), (0.7, 2)])
def test_running_cell_mask(ratio: float, per_cell: int) -> None:
    b, (gt, gh, gw) = 8, (6, 4, 6)
    m = running_cell_mask(b, (gt, gh, gw), ratio, generator=_gen(3))
    assert m.dtype == torch.bool and m.shape == (b, gt * gh * gw)
    cells = m.view(b, gt, gh // 2, 2, gw // 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(b, gt, -1, 4)
    # Exactly int(4 * ratio) hidden (VideoMAEv2 truncates) in every 2x2 cell of every frame.
    assert bool((cells.sum(-1) == per_cell).all())
    # One pattern per frame, tiled over the grid.
    assert torch.equal(cells, cells[:, :, :1].expand_as(cells))
    pattern = cells[:, :, 0]  # (B, T, 4), cell positions in row-major (0,0),(0,1),(1,0),(1,1) order
    # The pattern runs one step per frame (a cyclic shift of the cell's queue).
    for t in range(gt - 1):
        assert torch.equal(pattern[:, t + 1], torch.roll(pattern[:, t], shifts=-1, dims=-1))
    # Over 4 frames every location is visible at least once.
    assert bool((~pattern[:, :4]).any(dim=1).all())
    assert m.sum(dim=1).tolist() == [gt * gh * gw * per_cell // 4] * b


def test_running_cell_mask_rejects_bad_args() -> None:
    with pytest.raises(ValueError, match="even"):
        running_cell_mask(1, (2, 3, 4), 0.5)
    with pytest.raises(ValueError, match="1..3"):
        running_cell_mask(1, (2, 4, 4), 0.05)


# ----------------------------------------------------------------------------------------------------
# seeding


GENERATORS: dict[str, Callable[[torch.Generator], torch.Tensor]] = {
    "random": lambda g: random_mask(16, 64, 0.75, generator=g),
    "block": lambda g: block_mask(16, (8, 8), 0.5, mask_patch_size=2, generator=g),
    "tube": lambda g: tube_mask(16, (4, 8, 8), 0.9, generator=g),
    "running_cell": lambda g: running_cell_mask(16, (4, 4, 4), 0.5, generator=g),
}


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_same_seed_same_mask_different_seed_different(kind: str) -> None:
    make = GENERATORS[kind]
    a, b, c = make(_gen(123)), make(_gen(123)), make(_gen(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    check_mask(a)  # every generator keeps a common hidden count


def test_beit_and_cyclic_tube_masks_are_seeded() -> None:
    def make(g: torch.Generator) -> torch.Tensor:
        frames = beit_block_mask(8, (14, 14), 98, min_num_patches=16, generator=g)
        return cyclic_tube_mask(frames, 8, (0.5, 1.0), generator=g)

    a, b, c = make(_gen(123)), make(_gen(123)), make(_gen(124))
    assert torch.equal(a, b) and not torch.equal(a, c)
    check_mask(a, 8 * 196, equal_counts=False)  # BEiT's counts vary by sample


# ----------------------------------------------------------------------------------------------------
# MAE's noise rule


def _mae_random_masking(noise: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """facebookresearch/mae models_mae.py random_masking (and HF ViTMAE), mask part only."""
    n, length = noise.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(n, length)
    mask[:, :len_keep] = 0
    return torch.gather(mask, dim=1, index=ids_restore).bool()


@pytest.mark.parametrize("length, ratio", [(16, 0.75), (196, 0.75), (49, 0.6), (50, 0.9)])
def test_mask_from_noise_matches_mae(length: int, ratio: float) -> None:
    noise = torch.rand(4, length, generator=_gen(5))
    m = mask_from_noise(noise, ratio)
    assert torch.equal(m, _mae_random_masking(noise, ratio))
    # The smallest noise values are the visible ones.
    keep = length - num_masked(length, ratio)
    assert torch.equal(m.sum(1), torch.full((4,), length - keep))
    assert bool((noise[~m].view(4, keep).max(1).values < noise[m].view(4, -1).min(1).values).all())


# ----------------------------------------------------------------------------------------------------
# index forms, gather / restore


def test_mask_to_indices_sorted_and_consistent() -> None:
    m = random_mask(6, 20, 0.7, generator=_gen(7))
    idx = mask_to_indices(m)
    k = 20 - num_masked(20, 0.7)
    assert idx.ids_keep.shape == (6, k) and idx.ids_mask.shape == (6, 20 - k) and idx.ids_restore.shape == (6, 20)
    assert torch.equal(idx.ids_keep, idx.ids_keep.sort(dim=1).values)
    assert torch.equal(idx.ids_mask, idx.ids_mask.sort(dim=1).values)
    assert not bool(m.gather(1, idx.ids_keep).any())
    assert bool(m.gather(1, idx.ids_mask).all())
    # ids_restore puts cat([kept, hidden]) back in token order.
    shuffle = torch.cat([idx.ids_keep, idx.ids_mask], dim=1)
    assert torch.equal(shuffle.gather(1, idx.ids_restore), torch.arange(20).expand(6, -1))


def test_gather_restore_round_trip() -> None:
    b, length, d = 4, 12, 5
    x = torch.randn(b, length, d)
    m = random_mask(b, length, 0.5, generator=_gen(8))
    idx = mask_to_indices(m)
    kept = gather_tokens(x, idx.ids_keep)
    assert kept.shape == (b, length - num_masked(length, 0.5), d)
    assert torch.equal(kept, x[~m].view(b, -1, d))
    fill = torch.full((1, 1, d), -7.0)
    y = restore_tokens(kept, idx.ids_restore, fill)
    assert y.shape == x.shape
    assert torch.equal(y[~m], x[~m])
    assert bool((y[m] == -7.0).all())
    # A per-sample fill (B, M, D) lands at the hidden positions in token order.
    fill_b = torch.randn(b, int(m[0].sum()), d)
    y2 = restore_tokens(kept, idx.ids_restore, fill_b)
    assert torch.equal(y2[m].view(b, -1, d), fill_b)
    assert torch.equal(y2[~m], x[~m])


def test_gather_tokens_shared_table() -> None:
    table = torch.randn(1, 10, 3)
    ids = torch.tensor([[0, 4, 9], [1, 2, 3]])
    out = gather_tokens(table, ids)
    assert out.shape == (2, 3, 3)
    assert torch.equal(out[0], table[0, [0, 4, 9]]) and torch.equal(out[1], table[0, [1, 2, 3]])


def test_check_mask_rejects_unequal_counts() -> None:
    m = torch.zeros(3, 8, dtype=torch.bool)
    m[0, :4] = True
    m[1, :4] = True
    m[2, :3] = True
    with pytest.raises(ValueError) as e:
        check_mask(m)
    msg = str(e.value)
    assert "same number" in msg and "[4, 4, 3]" in msg, msg
    with pytest.raises(ValueError):
        mask_to_indices(m)


def test_check_mask_rejects_bad_dtype_shape_and_length() -> None:
    with pytest.raises(ValueError, match="bool"):
        check_mask(torch.zeros(2, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="bool"):
        check_mask(torch.zeros(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="8 tokens.*16"):
        check_mask(torch.zeros(2, 8, dtype=torch.bool), num_tokens=16)
    ok = torch.zeros(2, 8, dtype=torch.bool)
    ok[:, 2:5] = True
    assert check_mask(ok, 8) == 3


def test_block_mask_refuses_to_hide_every_block() -> None:
    with pytest.raises(ValueError, match="hides all 1 blocks"):
        block_mask(2, (4, 4), 0.6, mask_patch_size=4)
