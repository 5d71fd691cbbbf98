"""Reconstruction targets and masked losses (mmmae.targets)."""

from __future__ import annotations

import math

import pytest
import torch

from mmmae.layers import patchify
from mmmae.targets import (IMAGENET_MEAN, IMAGENET_STD, HOGTarget, image_pixel_target, masked_l1, masked_mean,
                           masked_mse, normalize_per_patch, video_pixel_target)

# ----------------------------------------------------------------------------------------------------
# pixel targets


def test_normalize_per_patch_by_hand() -> None:
    patch = torch.tensor([1.0, 2.0, 3.0, 6.0])
    mean = 3.0
    var = ((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 3  # unbiased: 14/3
    expected = (patch - mean) / math.sqrt(var + 1e-6)
    got = normalize_per_patch(patch[None, None])
    assert torch.allclose(got[0, 0], expected, atol=1e-6)
    # Each patch independently: zero mean, unit unbiased variance.
    x = torch.randn(2, 5, 48) * 3 + 1
    y = normalize_per_patch(x)
    assert torch.allclose(y.mean(-1), torch.zeros(2, 5), atol=1e-5)
    assert torch.allclose(y.var(-1), torch.ones(2, 5), atol=1e-4)
    # A constant patch maps to zeros (eps keeps it finite).
    assert torch.equal(normalize_per_patch(torch.full((1, 1, 4), 5.0)), torch.zeros(1, 1, 4))


@pytest.mark.parametrize("norm_pix", [False, True])
def test_image_pixel_target(norm_pix: bool) -> None:
    imgs = torch.randn(2, 3, 16, 24)
    t = image_pixel_target(imgs, 8, norm_pix)
    raw = patchify(imgs, 8)
    assert t.shape == (2, 6, 192)
    assert torch.allclose(t, normalize_per_patch(raw) if norm_pix else raw)


def test_video_pixel_target_per_channel_by_hand() -> None:
    torch.manual_seed(0)
    v = torch.randn(1, 3, 2, 8, 8)
    t = video_pixel_target(v, 4, 2, norm_pix=True)  # (1, 4, 2*4*4*3)
    assert t.shape == (1, 4, 96)
    # Hand computation for token 0, channel 1: unnormalise, then (x - mean) / (unbiased std + eps).
    raw = v[0, 1, :2, :4, :4] * IMAGENET_STD[1] + IMAGENET_MEAN[1]
    expected = (raw - raw.mean()) / (raw.flatten().std() + 1e-6)
    got = t[0, 0].view(2 * 4 * 4, 3)[:, 1].view(2, 4, 4)  # (pt, p, q) per channel, channel fastest
    assert torch.allclose(got, expected, atol=1e-5)
    # Without normalisation it is the unnormalised pixels in patchify_video's order.
    t_raw = video_pixel_target(v, 4, 2, norm_pix=False)
    assert torch.allclose(t_raw[0, 0].view(32, 3)[:, 1].view(2, 4, 4), raw, atol=1e-6)
    t_nounnorm = video_pixel_target(v, 4, 2, norm_pix=False, unnormalize=False)
    assert torch.allclose(t_nounnorm[0, 0].view(32, 3)[:, 1].view(2, 4, 4), v[0, 1, :2, :4, :4])


# ----------------------------------------------------------------------------------------------------
# masked losses


@pytest.mark.parametrize("loss_fn", [masked_mse, masked_l1])
def test_masked_loss_ignores_visible_tokens(loss_fn) -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    mask = torch.tensor([[True, False, True, False, False, True], [False, True, True, False, True, False]])
    loss = loss_fn(pred, target, mask)
    pred2 = pred.clone()
    pred2[~mask] = torch.randn_like(pred2[~mask]) * 100
    assert torch.allclose(loss_fn(pred2, target, mask), loss)
    # Changing a hidden token's prediction does change it.
    pred3 = pred.clone()
    pred3[0, 0] += 1.0
    assert not torch.allclose(loss_fn(pred3, target, mask), loss)
    # Mean over hidden tokens of the per-token mean error.
    err = (pred - target) ** 2 if loss_fn is masked_mse else (pred - target).abs()
    assert torch.allclose(loss, err.mean(-1)[mask].mean())


@pytest.mark.parametrize("loss_fn", [masked_mse, masked_l1])
def test_single_masked_token_gives_its_own_error(loss_fn) -> None:
    pred = torch.zeros(2, 4, 3)
    target = torch.zeros(2, 4, 3)
    target[1, 2] = torch.tensor([1.0, -2.0, 3.0])
    target[0, 1] = 100.0  # visible: must not count
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1, 2] = True
    expected = (1 + 4 + 9) / 3 if loss_fn is masked_mse else (1 + 2 + 3) / 3
    assert torch.allclose(loss_fn(pred, target, mask), torch.tensor(expected))


def test_masked_losses_accept_low_precision_and_return_float32() -> None:
    pred = torch.randn(2, 4, 3).bfloat16()
    target = torch.randn(2, 4, 3)
    mask = torch.tensor([[True, False, True, False], [False, True, False, True]])
    assert masked_mse(pred, target, mask).dtype == torch.float32
    assert masked_l1(pred, target, mask).dtype == torch.float32


def test_masked_mean_with_nothing_hidden_is_zero() -> None:
    assert masked_mean(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0


# ----------------------------------------------------------------------------------------------------
# HOG (MaskFeat)


@pytest.mark.parametrize("patch", [8, 16])
def test_hog_shape_nonneg_unit_norm(patch: int) -> None:
    torch.manual_seed(0)
    hog = HOGTarget(patch_size=patch)
    imgs = torch.rand(2, 3, 32, 48)
    out = hog(imgs)
    k = patch // 8
    assert out.shape == (2, (32 // patch) * (48 // patch), 3 * 9 * k * k)
    assert hog.out_dim(3) == out.shape[-1]
    assert bool((out >= 0).all())
    assert torch.allclose(out.norm(dim=-1), torch.ones(out.shape[:2]), atol=1e-5)


def test_hog_vertical_edge_goes_to_bin_0() -> None:
    hog = HOGTarget(patch_size=16)
    imgs = torch.zeros(1, 3, 32, 32)
    imgs[..., 5:] = 1.0  # vertical edge between columns 4 and 5: horizontal gradient, orientation 0
    out = hog(imgs).view(1, 4, 3, 9, 2, 2)  # (B, L, C, bins, cell rows, cell cols)
    # Patches 0 and 2 (left column of the 2x2 patch grid) contain the edge; only their first cell
    # column sees it, in every channel, all of it in bin 0.
    for patch in (0, 2):
        h = out[0, patch]
        assert bool((h[:, 0, :, 0] > 0).all())
        assert torch.allclose(h[:, 1:].sum(), torch.tensor(0.0))
        assert torch.allclose(h[:, :, :, 1].sum(), torch.tensor(0.0))
    # Patches away from the edge have no gradient at all.
    for patch in (1, 3):
        assert torch.equal(out[0, patch], torch.zeros(3, 9, 2, 2))


def test_hog_horizontal_edge_goes_to_middle_bin() -> None:
    # A horizontal edge has a vertical gradient (orientation pi/2): bin floor(0.5 * 9) = 4.
    hog = HOGTarget(patch_size=16)
    imgs = torch.zeros(1, 1, 16, 16)
    imgs[..., 5:, :] = 1.0
    out = hog(imgs).view(1, 1, 1, 9, 2, 2)
    assert out[0, 0, 0, 4].sum() > 0
    assert torch.allclose(out[0, 0, 0].sum() - out[0, 0, 0, 4].sum(), torch.tensor(0.0))


def test_hog_rejects_bad_patch_size() -> None:
    with pytest.raises(ValueError, match="multiple"):
        HOGTarget(patch_size=12)
