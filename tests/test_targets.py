"""Reconstruction targets and masked losses (mmmae.targets)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import mmmae
from mmmae.layers import patchify
from mmmae.targets import (IMAGENET_MEAN, IMAGENET_STD, HOGTarget, image_pixel_target, masked_l1, masked_mean,
                           masked_mse, normalize_per_patch, video_pixel_target)

from conftest import COCO_MINI

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


def _one_bright_pixel_tubelet(d: float) -> torch.Tensor:
    """A low-contrast (1, 3, 2, 4, 4) clip in [0, 1]: every pixel 0.5 but one, 0.5 + d, in every channel."""
    v = torch.full((1, 3, 2, 4, 4), 0.5)
    v[:, :, 1, 2, 3] += d
    return v


def test_video_target_epsilon_videomae_outside_omnimae_inside_the_root() -> None:
    d = 2.0**-10  # exact in float32, as is 0.5 + d
    v = _one_bright_pixel_tubelet(d)
    # Reference figures for the bright pixel of this 32-pixel tubelet: deviation 31/32 d, unbiased
    # variance d^2 / 32. VideoMAE (engine_for_pretraining.py): / (std + 1e-6) = 5.4485;
    # OmniMAE (omnivision losses/mae_loss.py MAELoss): / (var + 1e-6) ** 0.5 = 0.9323.
    dev, var = 31 / 32 * d, d * d / 32
    videomae, omnimae = dev / (math.sqrt(var) + 1e-6), dev / math.sqrt(var + 1e-6)
    assert round(videomae, 4) == 5.4485 and round(omnimae, 4) == 0.9323 and videomae - omnimae > 2
    bright = (2 - 1) * 16 + 2 * 4 + 3  # (pt, p, q) index of the bright pixel inside its tubelet
    for eps_inside, expected in ((False, videomae), (True, omnimae)):
        t = video_pixel_target(v, 4, 2, norm_pix=True, unnormalize=False, eps_inside_sqrt=eps_inside)
        per_channel = t[0, 0].view(32, 3)
        assert torch.allclose(per_channel[bright], torch.full((3,), expected), rtol=1e-5)
        others = -d / 32 / ((math.sqrt(var) + 1e-6) if not eps_inside else math.sqrt(var + 1e-6))
        assert torch.allclose(per_channel[torch.arange(32) != bright], torch.full((31, 3), others), rtol=1e-5)


def _omnivision_target(clip: torch.Tensor, p: int, pt: int) -> torch.Tensor:
    """omnivision MAELoss.compute_mae_loss (norm_pix_per_channel, unnormalize_img = ImageNet stats),
    written out: (B, 3, T, H, W) normalised -> (B, L, pt*p*p*3) with (var + 1e-6) ** 0.5, var unbiased."""
    x = clip.double() * torch.tensor(IMAGENET_STD, dtype=torch.float64)[:, None, None, None]
    x = x + torch.tensor(IMAGENET_MEAN, dtype=torch.float64)[:, None, None, None]
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t // pt, pt, h // p, p, w // p, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
    x = x.reshape(b, (t // pt) * (h // p) * (w // p), pt * p * p, c)
    x = (x - x.mean(dim=-2, keepdim=True)) / (x.var(dim=-2, keepdim=True) + 1e-6) ** 0.5
    return x.flatten(2)


@pytest.mark.parametrize("modality", ["video", "image"])
def test_omnimae_loss_uses_its_reference_normalisation(modality: str) -> None:
    torch.manual_seed(0)
    model = mmmae.create_model("omnimae", size="vit_tiny_test", img_size=32, patch_size=8, num_frames=4,
                               tubelet_size=2).eval()
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    shape = (2, 3, 4, 32, 32) if modality == "video" else (2, 3, 32, 32)
    pixels = 0.5 + 1e-3 * torch.rand(shape)  # low contrast: per-tubelet std ~ 3e-4, below sqrt(1e-6)
    x = (pixels - (mean[:, None] if modality == "video" else mean)) / (std[:, None] if modality == "video" else std)
    with torch.no_grad():
        out = model({modality: x})
    clip = x if modality == "video" else x.unsqueeze(2).expand(-1, -1, 2, -1, -1)  # PadIm2Video(repeat, 2)
    target = _omnivision_target(clip, 8, 2)
    per_token = ((out["pred"].double() - target) ** 2).mean(-1)
    expected = per_token[out["mask"]].mean()
    assert torch.allclose(out["loss"].double(), expected, rtol=1e-4)
    # VideoMAE's std + eps gives a different loss on this input.
    videomae = video_pixel_target(clip, 8, 2, norm_pix=True).double()
    wrong = ((out["pred"].double() - videomae) ** 2).mean(-1)[out["mask"]].mean()
    assert abs(wrong.item() - out["loss"].item()) > 0.05 * out["loss"].item()


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

PHOTO = COCO_MINI / "val2017" / "000000000139.jpg"


def _photo(size: int = 224) -> torch.Tensor:
    """A real COCO photo, centre-cropped and resized, as float pixel values 0..255: (1, 3, S, S).

    A missing sample fails the test. Integer pixels make every Sobel sum exact in float32 and float64
    alike, so the reference written in numpy sees the same gradients as the conv2d. (HOG with per-cell
    normalisation is invariant to the per-channel ImageNet normalisation; on normalised inputs only the
    sign of a rounding residue differs where gx is exactly 0, which moves such pixels between bins 0 and
    8 in the reference's own floor(atan2(gx, gy) / pi * 9) mod 9 as well.)
    """
    img = Image.open(PHOTO).convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32).transpose(2, 0, 1).copy())[None]


def _reference_hog(img: np.ndarray, patch: int = 16, cell: int = 8, nbins: int = 9, window: int = 0) -> np.ndarray:
    """SlowFast's HOGLayerC + MaskMViT._get_hog_label_2d (slowfast/models/operators.py, masked.py), or with
    ``window`` mmpretrain's HOGGenerator (mmpretrain/models/selfsup/maskfeat.py), written out in numpy for
    one image (C, H, W) -> (L, C * nbins * (patch/cell)^2)."""
    c, h, w = img.shape
    xp = np.pad(img, ((0, 0), (1, 1), (1, 1)), mode="reflect")
    # Cross-correlation with weight_x = [[1, 0, -1], [2, 0, -2], [1, 0, -1]] and weight_y = weight_x^T.
    gx = sum(k * (xp[:, r:r + h, 0:w] - xp[:, r:r + h, 2:w + 2]) for r, k in ((0, 1.0), (1, 2.0), (2, 1.0)))
    gy = sum(k * (xp[:, 0:h, q:q + w] - xp[:, 2:h + 2, q:q + w]) for q, k in ((0, 1.0), (1, 2.0), (2, 1.0)))
    mag = np.hypot(gx, gy)
    # atan2(gx, gy) (that argument order) folded into [0, pi), split into nbins equal sectors.
    theta = np.arctan2(gx, gy)
    theta = np.where(theta < 0, theta + np.pi, theta)
    theta = np.where(theta >= np.pi, theta - np.pi, theta)
    bins = np.minimum((theta // (np.pi / nbins)).astype(np.int64), nbins - 1)
    if window:
        r = (np.arange(window) - (window - 1) / 2) / (window // 2)
        g = np.exp(-0.5 * r[:, None] ** 2) * np.exp(-0.5 * r[None, :] ** 2)
        mag = mag * np.tile(g / g.sum(), (h // window, w // window))
    hist = np.zeros((c, nbins, h // cell, w // cell))
    for b in range(nbins):
        hist[:, b] = (mag * (bins == b)).reshape(c, h // cell, cell, w // cell, cell).sum(axis=(2, 4))
    hist = hist / np.maximum(np.sqrt((hist**2).sum(axis=1, keepdims=True)), 1e-12)  # per cell, over its bins
    k = patch // cell
    out = []
    for pr in range(h // patch):
        for pc in range(w // patch):
            out.append(hist[:, :, pr * k:(pr + 1) * k, pc * k:(pc + 1) * k].reshape(-1))  # (channel, bin, row, col)
    return np.stack(out)


@pytest.mark.parametrize(("variant", "window"), [("maskfeat", 0), ("mmpretrain", 16)])
def test_hog_matches_the_reference_formula_on_a_real_photo(variant: str, window: int) -> None:
    x = _photo()
    got = HOGTarget(patch_size=16, variant=variant)(x)
    expected = _reference_hog(x[0].double().numpy(), window=window)
    assert got.shape == (1, 196, 108) == (1, *expected.shape)  # MaskFeat ViT-B/16: 3 x 9 x 2 x 2 per patch
    assert np.abs(got[0].numpy() - expected).max() <= 1e-5
    # The two variants differ (the window reweights pixels inside each cell).
    other = HOGTarget(patch_size=16, variant="mmpretrain" if variant == "maskfeat" else "maskfeat")(x)
    assert (other - got).abs().max() > 1e-2


def test_hog_cells_are_unit_norm_per_channel() -> None:
    torch.manual_seed(0)
    hog = HOGTarget(patch_size=16)
    out = hog(torch.rand(2, 3, 32, 48))
    assert out.shape == (2, 2 * 3, 3 * 9 * 2 * 2) and hog.out_dim(3) == 108
    assert bool((out >= 0).all())
    cells = out.view(2, 6, 3, 9, 2, 2)
    # HOGLayerC normalises each cell's 9 bins, per channel: so a 16-px patch has norm sqrt(3 * 4), not 1.
    assert torch.allclose(cells.norm(dim=3), torch.ones(2, 6, 3, 2, 2), atol=1e-5)
    assert torch.allclose(out.norm(dim=-1), torch.full((2, 6), 12**0.5), atol=1e-4)


def test_hog_vertical_edge_goes_to_bin_4() -> None:
    # A vertical edge has only a horizontal gradient: atan2(gx, 0) = -pi/2 -> floor(-4.5) = -5 -> mod 9 = 4.
    hog = HOGTarget(patch_size=16)
    imgs = torch.zeros(1, 3, 32, 32)
    imgs[..., 5:] = 1.0  # edge between columns 4 and 5
    out = hog(imgs).view(1, 4, 3, 9, 2, 2)  # (B, L, C, bins, cell rows, cell cols)
    for patch in (0, 2):  # left column of the 2x2 patch grid; only its first cell column sees the edge
        h = out[0, patch]
        assert torch.allclose(h[:, 4, :, 0], torch.ones(3, 2))  # the cell's whole (unit) histogram
        assert torch.equal(h[:, :, :, 1], torch.zeros(3, 9, 2))
    for patch in (1, 3):  # no gradient at all: a zero cell stays zero
        assert torch.equal(out[0, patch], torch.zeros(3, 9, 2, 2))


def test_hog_horizontal_edge_goes_to_bin_0() -> None:
    # A horizontal edge has only a vertical gradient: atan2(0, gy) = 0 or pi -> bin 0 (9 mod 9).
    hog = HOGTarget(patch_size=16)
    for sign in (1.0, -1.0):
        imgs = torch.zeros(1, 1, 16, 16)
        imgs[..., 5:, :] = sign
        out = hog(imgs).view(1, 1, 1, 9, 2, 2)
        assert torch.allclose(out[0, 0, 0, 0, 0], torch.ones(2))
        assert torch.equal(out[0, 0, 0, 1:], torch.zeros(8, 2, 2))


def test_hog_video_takes_the_first_frame_of_each_tubelet() -> None:
    # MaskMViT._get_hog_label_3d: frames [:, :, ::PATCH_STRIDE[0]], per-frame HOG, tokens (t, h, w).
    torch.manual_seed(0)
    hog = HOGTarget(patch_size=16)
    video = torch.rand(2, 3, 4, 32, 32)
    out = hog.forward_video(video, tubelet_size=2)
    assert out.shape == (2, 2 * 4, 108)
    for t, frame in enumerate((0, 2)):
        for b in range(2):
            expected = _reference_hog(video[b, :, frame].double().numpy())
            assert np.abs(out[b, t * 4:(t + 1) * 4].numpy() - expected).max() <= 1e-5
    with pytest.raises(ValueError, match="multiple of 2"):
        hog.forward_video(torch.rand(1, 3, 3, 32, 32), tubelet_size=2)


def test_hog_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="multiple"):
        HOGTarget(patch_size=12)
    with pytest.raises(ValueError, match=r"HOG variant must be one of \('maskfeat', 'mmpretrain'\), got 'skimage'"):
        HOGTarget(variant="skimage")
    with pytest.raises(ValueError, match="multiples of 16, got 24x32"):
        HOGTarget(patch_size=8, variant="mmpretrain")(torch.rand(1, 3, 24, 32))
    with pytest.raises(ValueError, match="multiples of 16, got 32x40"):
        HOGTarget(patch_size=16)(torch.rand(1, 3, 32, 40))


def test_mae_and_bevt_thread_the_hog_variant() -> None:
    kw = {"size": "vit_tiny_test", "img_size": 32, "patch_size": 16, "target": "hog"}
    for name in ("mae", "bevt_spatial"):
        assert mmmae.create_model(name, **kw).cfg.hog_variant == "maskfeat"
        model = mmmae.create_model(name, **kw, hog_variant="mmpretrain")
        hog = model.hog if name == "mae" else model.frame_target.hog
        assert hog.variant == "mmpretrain" and hog.window.shape == (16, 16)
        with pytest.raises(ValueError, match="hog_variant"):
            mmmae.create_model(name, **kw, hog_variant="gaussian")
