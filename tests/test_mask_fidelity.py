"""Mask counts and mask shapes per method, locked with figures from each method's reference code.

References: facebookresearch/mae models_mae.py ``random_masking``; MCG-NJU/VideoMAE and
OpenGVLab/VideoMAEv2 masking_generator.py (``TubeMaskingGenerator``, ``RunningCellMaskingGenerator``)
and VideoMAEv2 engine_for_pretraining.py; facebookresearch/omnivore
omnivision/data/transforms/mask_image_modeling.py (``RandMasking``) with
omnimae_vitbase_ssv2_in1k.yaml; microsoft/unilm beit/masking_generator.py (``MaskingGenerator``) and
xyzforever/BEVT mmaction/datasets/pipelines/mask_generator.py (``MaskedPositionGenerate``) with
swin_base_patch244_window877_bevt_in1k_k400.py. The reference rules are re-stated here independently
(plain Python ``random``), never by calling mmmae's code.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import mmmae
from mmmae.config import load_config, model_cfg
from mmmae.encoder import MaskedEncoder
from mmmae.image.mae import MAECfg
from mmmae.masking import (beit_block_mask, beit_blocks, check_mask, cyclic_run_bounds, cyclic_tube_mask,
                           mask_to_indices, paint_blocks)
from mmmae.registry import get_spec
from mmmae.video.models import BEVTCfg, BEVTSpatialCfg, OmniMAECfg, VideoMAECfg
from mmmae.vl.models import M3AECfg


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _masks(name: str, cfg: object, batch_size: int, seed: int = 0, **kw: str) -> dict[str, torch.Tensor]:
    return get_spec(name).make_mask_fn(cfg)(batch_size, _gen(seed), **kw)


# ----------------------------------------------------------------------------------------------------
# counts per method (16x224 clips: 8x14x14 tokens; 224 images: 14x14)


def test_videomae_hides_176_per_slice_1408_in_all() -> None:
    """VideoMAE / VideoMAEv2 TubeMaskingGenerator: num_masks_per_frame = int(0.9 * 196) = 176."""
    mask = _masks("videomae", VideoMAECfg(), 3)["mask"]
    assert mask.shape == (3, 1568)
    assert mask.sum(1).tolist() == [1408] * 3
    per_slice = mask.view(3, 8, 196)
    assert per_slice.sum(-1).unique().tolist() == [176]
    assert torch.equal(per_slice, per_slice[:, :1].expand_as(per_slice))


def _running_cell_maps(frames: int, height: int, width: int) -> list[torch.Tensor]:
    """VideoMAEv2 RunningCellMaskingGenerator(mask_ratio=0.5).all_mask_maps, re-stated: a 2x2 cell queue
    [1, 1, 0, 0]; for each start pointer the pointer advances once per frame before the cell is read."""
    queue = [1, 1, 0, 0]
    maps = []
    for ptr in range(4):
        rows = []
        for _ in range(frames):
            ptr += 1
            cell = [queue[(i + ptr) % 4] for i in range(4)]
            rows.append([cell[(r % 2) * 2 + (c % 2)] for r in range(height) for c in range(width)])
        maps.append(torch.tensor(rows, dtype=torch.bool).flatten())
    return maps


def test_videomaev2_decoder_mask_is_the_running_cell_and_the_loss_counts_704() -> None:
    """At 16x224, 0.9 tube + 0.5 running cell, the reference decodes the 784 running-cell positions and its
    loss counts ``bool_masked_pos[~decode_masked_pos]``: 704 hidden tokens in every sample. mmmae's
    decoder mask is then exactly one of the reference's four running-cell maps (nothing moved)."""
    out = _masks("videomae", VideoMAECfg(decoder_mask_ratio=0.5), 6, seed=4)
    mask, decode_mask = out["mask"], out["decode_mask"]
    maps = _running_cell_maps(8, 14, 14)
    assert all(int(m.sum()) == 784 for m in maps)
    for i in range(6):
        assert any(torch.equal(decode_mask[i], m) for m in maps), f"sample {i} is not a running-cell map"
    assert (mask & ~decode_mask).sum(1).tolist() == [704] * 6


def test_omnimae_hides_int_ratio_times_tokens() -> None:
    """omnivision RandMasking: int(pred_ratio * T*H*W): 1411 of 1568 at 0.9 (video), 147 of 196 at 0.75
    (image, TubeMasking over one slice); the paper's 0.95 / 0.9 give 1489 and 176."""
    cfg = OmniMAECfg()
    assert _masks("omnimae", cfg, 2, modality="video")["mask"].sum(1).tolist() == [1411, 1411]
    assert _masks("omnimae", cfg, 2, modality="image")["mask"].sum(1).tolist() == [147, 147]
    paper = OmniMAECfg(image_mask_ratio=0.9, video_mask_ratio=0.95)
    assert _masks("omnimae", paper, 2, modality="video")["mask"].sum(1).tolist() == [1489, 1489]
    assert _masks("omnimae", paper, 2, modality="image")["mask"].sum(1).tolist() == [176, 176]


def test_mae_and_m3ae_keep_int_length_times_one_minus_ratio() -> None:
    """MAE random_masking: len_keep = int(196 * 0.25) = 49 -> 147 hidden; at 0.9 it keeps 19 (177 hidden).
    M3AE (m3ae/model.py) keeps int(L * (1 - ratio)): 256 px / 16 -> 256 patches, 64 kept; text 64 -> 16 kept."""
    assert _masks("mae", MAECfg(), 2)["mask"].sum(1).tolist() == [147, 147]
    assert _masks("mae", MAECfg(mask_ratio=0.9), 2)["mask"].sum(1).tolist() == [177, 177]
    m3ae = _masks("m3ae", M3AECfg(), 2)
    assert m3ae["mask"].sum(1).tolist() == [192, 192]
    assert m3ae["text_mask"].sum(1).tolist() == [48, 48]


# ----------------------------------------------------------------------------------------------------
# BEiT's block-wise generator


def _reference_beit(rng: random.Random, height: int = 14, width: int = 14, target: int = 98,
                    min_num_patches: int = 16, min_aspect: float = 0.3) -> int:
    """BEiT MaskingGenerator.__call__ (max_num_patches=None), re-stated; returns the hidden count."""
    mask = [[0] * width for _ in range(height)]
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    count = 0
    while count < target:
        budget = target - count
        delta = 0
        for _ in range(10):
            area = rng.uniform(min_num_patches, budget)
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < width and h < height:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                cells = [(i, j) for i in range(top, top + h) for j in range(left, left + w)]
                new = sum(1 for i, j in cells if not mask[i][j])
                if 0 < new <= budget:
                    for i, j in cells:
                        mask[i][j] = 1
                    delta = new
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return count


def _reachable(h: int, w: int, lo: float, hi: float, min_aspect: float = 0.3) -> bool:
    """Whether h = round(sqrt(A r)), w = round(sqrt(A / r)) is possible for A in [lo, hi] and r in
    [min_aspect, 1 / min_aspect]: with x = sqrt(A r) in [h - 1/2, h + 1/2] and y = sqrt(A / r) in
    [w - 1/2, w + 1/2], A = x y and r = x / y (necessary conditions)."""
    return ((h + 0.5) * (w + 0.5) >= lo and (h - 0.5) * (w - 0.5) <= hi
            and (h + 0.5) / (w - 0.5) >= min_aspect and (h - 0.5) / (w + 0.5) <= 1 / min_aspect)


def test_beit_blocks_obey_the_reference_constraints() -> None:
    g = _gen(0)
    for _ in range(300):
        blocks = beit_blocks((14, 14), 98, min_num_patches=16, generator=g)
        assert blocks
        painted = torch.zeros(14, 14, dtype=torch.bool)
        for top, left, h, w in blocks:
            budget = 98 - int(painted.sum())
            assert 1 <= h < 14 and 1 <= w < 14  # strictly smaller than the grid
            assert 0 <= top <= 14 - h and 0 <= left <= 14 - w
            assert _reachable(h, w, min(16, budget), max(16, budget)), (h, w, budget)
            before = int(painted.sum())
            painted[top:top + h, left:left + w] = True
            assert 0 < int(painted.sum()) - before <= budget  # adds 1..budget new tokens
        assert int(painted.sum()) <= 98
        assert torch.equal(paint_blocks((14, 14), blocks), painted.flatten())


def test_beit_hidden_count_matches_the_reference_distribution() -> None:
    """BEVT's 98 of 196 with min_num_patches=16: never above 98, mean ~97.5 (the re-stated reference over
    6000 draws; its per-draw sd is ~0.9)."""
    rng = random.Random(0)
    ref = [_reference_beit(rng) for _ in range(6000)]
    ref_mean = sum(ref) / len(ref)
    ref_full = sum(c == 98 for c in ref) / len(ref)
    ours = beit_block_mask(2000, (14, 14), 98, min_num_patches=16, generator=_gen(1)).sum(1)
    assert int(ours.max()) <= 98 and max(ref) <= 98
    assert 97.3 < ref_mean < 97.7
    assert abs(float(ours.float().mean()) - ref_mean) < 0.1, (float(ours.float().mean()), ref_mean)
    assert abs(float((ours == 98).float().mean()) - ref_full) < 0.05
    assert len(ours.unique()) > 1  # the count varies by sample, as in BEiT


def test_beit_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="num_masking_patches must be in"):
        beit_block_mask(1, (4, 4), 16)
    with pytest.raises(ValueError, match="min_num_patches"):
        beit_block_mask(1, (4, 4), 8, min_num_patches=0)
    with pytest.raises(ValueError, match="min_aspect"):
        beit_block_mask(1, (4, 4), 8, min_aspect=0.0)
    with pytest.raises(ValueError, match="at least 2x2"):
        beit_block_mask(1, (1, 8), 4)


# ----------------------------------------------------------------------------------------------------
# BEVT's masks


def test_bevt_run_bounds() -> None:
    """MaskedPositionGenerate: max(int(0.5 * 8), 1) = 4 to min(int(1.0 * 8), 8) = 8 slices."""
    assert cyclic_run_bounds(8, (0.5, 1.0)) == (4, 8)
    assert cyclic_run_bounds(2, (0.5, 1.0)) == (1, 2)
    assert cyclic_run_bounds(8, (0.5, 0.75)) == (4, 6)  # the class default range
    with pytest.raises(ValueError, match="tube_range"):
        cyclic_run_bounds(8, (0.8, 0.5))
    with pytest.raises(ValueError, match="no run length"):
        cyclic_run_bounds(2, (0.0, 0.2))


def test_bevt_video_mask_is_one_beit_mask_over_a_cyclic_run() -> None:
    cfg = BEVTCfg()
    out = _masks("bevt", cfg, 1200, seed=2)
    mask = out["mask"].view(1200, 8, 196)
    on = mask.any(-1)  # (B, T) slices the run covers
    lengths, starts = set(), set()
    wrapped = 0
    for i in range(1200):
        slices = on[i].nonzero().squeeze(1).tolist()
        n = len(slices)
        assert 4 <= n <= 8
        lengths.add(n)
        # A cyclic run: exactly one slice is "on" with its predecessor "off" (unless all 8 are on).
        begins = [t for t in slices if not bool(on[i, (t - 1) % 8])]
        assert len(begins) == (0 if n == 8 else 1)
        if n < 8:
            starts.add(begins[0])
            wrapped += begins[0] + n > 8
        frame = mask[i, slices[0]]
        assert int(frame.sum()) <= 98
        assert all(torch.equal(mask[i, t], frame) for t in slices)
    assert lengths == {4, 5, 6, 7, 8} and starts == set(range(8)) and wrapped > 0
    # Hidden share: E[BEiT count] / 196 * E[length] / 8 = ~97.5 / 196 * 6 / 8 = ~0.373 (not 0.5).
    share = float(out["mask"].float().mean())
    assert abs(share - 97.5 / 196 * 6 / 8) < 0.012, share


def test_bevt_image_masks_are_beit_masks_with_varying_counts() -> None:
    counts = _masks("bevt", BEVTCfg(), 64, seed=3)["image_mask"].sum(1)
    spatial = _masks("bevt_spatial", BEVTSpatialCfg(), 64, seed=3)["mask"].sum(1)
    for c in (counts, spatial):
        assert int(c.max()) <= 98 and int(c.min()) >= 80 and len(c.unique()) > 1


def test_bevt_named_options_keep_the_exact_count_masks() -> None:
    old = BEVTCfg(image_mask_type="block", video_mask_type="tube")
    out = _masks("bevt", old, 2)
    assert out["mask"].sum(1).tolist() == [784, 784]  # int(0.5 * 196) per slice x 8
    assert out["image_mask"].sum(1).tolist() == [100, 100]  # ceil(49 * 0.5) = 25 blocks of 2x2 tokens
    with pytest.raises(ValueError, match="video_mask_type"):
        get_spec("bevt").make_mask_fn(BEVTCfg(video_mask_type="random"))
    with pytest.raises(ValueError, match="mask_type must be one of"):
        get_spec("bevt_spatial").make_mask_fn(BEVTSpatialCfg(mask_type="grid"))
    with pytest.raises(ValueError, match="image_mask_type must be one of"):
        mmmae.create_model("bevt", size="vit_tiny_test", img_size=32, patch_size=8, num_frames=4,
                           image_mask_type="random")
    with pytest.raises(ValueError, match="tube_range"):
        get_spec("bevt").make_mask_fn(BEVTCfg(tube_min_share=0.9, tube_max_share=0.5))
    with pytest.raises(ValueError, match="hides all"):
        mmmae.create_model("bevt_spatial", size="vit_tiny_test", img_size=32, patch_size=16, mask_ratio=0.9,
                           mask_type="block", mask_patch_size=16)


def test_bevt_temporal_config_takes_bevt_clip_settings() -> None:
    """BEVT's video pipeline: SampleFrames(clip_len=16, frame_interval=8, num_clips=1)."""
    cfg = load_config("bevt_temporal.yaml")
    assert (cfg.model.num_frames, cfg.data.sampling_rate, cfg.data.num_samples) == (16, 8, 1)
    mcfg = model_cfg(cfg.model)
    assert (mcfg.video_mask_type, mcfg.image_mask_type, mcfg.min_num_patches) == ("bevt", "beit", 16)
    assert (mcfg.tube_min_share, mcfg.tube_max_share, mcfg.min_aspect) == (0.5, 1.0, 0.3)


# ----------------------------------------------------------------------------------------------------
# unequal counts: fine with mask tokens, refused where tokens are dropped


def test_mask_tokens_accept_unequal_counts_index_paths_refuse_them() -> None:
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :5] = True
    mask[1, 3:10] = True
    assert check_mask(mask, 16, equal_counts=False) == 7
    with pytest.raises(ValueError, match="same number"):
        check_mask(mask, 16)
    with pytest.raises(ValueError, match="same number"):
        mask_to_indices(mask)
    enc = MaskedEncoder(16, 1, 2, cls_token=False, mask_token=True)
    assert enc(torch.randn(2, 16, 16), mask=mask).shape == (2, 16, 16)

    torch.manual_seed(0)
    model = mmmae.create_model("bevt", size="vit_tiny_test", img_size=32, patch_size=8, num_frames=4).eval()
    gen = _gen(5)
    video, image = torch.randn(2, 3, 4, 32, 32, generator=gen), torch.randn(2, 3, 32, 32, generator=gen)
    vmask = torch.zeros(2, 32, dtype=torch.bool)
    vmask[0, :9] = True
    vmask[1, 16:20] = True
    with torch.no_grad():
        out = model({"video": video, "mask": vmask, "image": image, "image_mask": mask})
    assert torch.isfinite(out["loss"]) and torch.equal(out["image_mask"], mask)
    # The loss is the mean over every hidden token of the batch (BEVT's CE over logits[bool_masked_pos]).
    per_token = ((out["image_pred"] - model.frame_target(image)) ** 2).mean(-1)
    assert torch.allclose(out["image_loss"], per_token[mask].mean(), atol=1e-6)
