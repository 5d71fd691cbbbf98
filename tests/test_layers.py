"""Unit tests for mmmae.layers: patchify, sin-cos tables, attention, drop path, patch embeddings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmmae.layers import (Attention, DropPath, PatchEmbed2d, TubeletEmbed3d, drop_path, key_padding_bias,
                          patchify, patchify_video, sincos_1d, sincos_pos_embed_1d, sincos_pos_embed_2d,
                          sincos_pos_embed_3d, unpatchify, unpatchify_video)


# ----------------------------------------------------------------------------------------------------
# patchify / unpatchify


@pytest.mark.parametrize("hw, patch", [((32, 32), 8), ((16, 24), 8), ((24, 16), (4, 8)), ((12, 20), (6, 5))])
@pytest.mark.parametrize("channels", [1, 3])
def test_patchify_round_trip_and_layout(hw: tuple[int, int], patch, channels: int) -> None:
    h, w = hw
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    imgs = torch.randn(2, channels, h, w)
    x = patchify(imgs, patch)
    gh, gw = h // ph, w // pw
    assert x.shape == (2, gh * gw, ph * pw * channels)
    # Patch 0 is the top-left ph x pw window, flattened (p, q, c) with the channel fastest (MAE).
    top_left = imgs[:, :, :ph, :pw].permute(0, 2, 3, 1).reshape(2, -1)
    assert torch.equal(x[:, 0], top_left)
    # Tokens are row-major over the grid: token 1 is one patch to the right, token gw one patch down.
    if gw > 1:
        assert torch.equal(x[:, 1], imgs[:, :, :ph, pw:2 * pw].permute(0, 2, 3, 1).reshape(2, -1))
    if gh > 1:
        assert torch.equal(x[:, gw], imgs[:, :, ph:2 * ph, :pw].permute(0, 2, 3, 1).reshape(2, -1))
    # Channel-fastest: the first C values are pixel (0, 0) of every channel.
    assert torch.equal(x[:, 0, :channels], imgs[:, :, 0, 0])
    assert torch.equal(unpatchify(x, patch, (gh, gw), channels), imgs)


def test_patchify_rejects_indivisible_sizes() -> None:
    with pytest.raises(ValueError, match="multiple"):
        patchify(torch.randn(1, 3, 30, 32), 8)
    with pytest.raises(ValueError, match="do not match"):
        unpatchify(torch.randn(1, 16, 8 * 8 * 3), 8, (4, 5))


@pytest.mark.parametrize("thw, patch, tubelet", [((4, 16, 16), 8, 2), ((6, 16, 24), 8, 3),
                                                 ((4, 12, 20), (6, 4), 2), ((2, 8, 8), 4, 1)])
def test_patchify_video_round_trip_and_layout(thw: tuple[int, int, int], patch, tubelet: int) -> None:
    t, h, w = thw
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    c = 3
    videos = torch.randn(2, c, t, h, w)
    x = patchify_video(videos, patch, tubelet)
    grid = (t // tubelet, h // ph, w // pw)
    assert x.shape == (2, math.prod(grid), tubelet * ph * pw * c)
    # Token 0 is the first tubelet at the top-left, flattened (pt, ph, pw, c) with the channel fastest.
    first = videos[:, :, :tubelet, :ph, :pw].permute(0, 2, 3, 4, 1).reshape(2, -1)
    assert torch.equal(x[:, 0], first)
    # t-major: token H*W is the next tubelet in time at the top-left.
    if grid[0] > 1:
        nxt = videos[:, :, tubelet:2 * tubelet, :ph, :pw].permute(0, 2, 3, 4, 1).reshape(2, -1)
        assert torch.equal(x[:, grid[1] * grid[2]], nxt)
    # split_channels keeps C apart, same values.
    xs = patchify_video(videos, patch, tubelet, split_channels=True)
    assert xs.shape == (2, math.prod(grid), tubelet * ph * pw, c)
    assert torch.equal(xs.flatten(2), x)
    assert torch.equal(unpatchify_video(x, patch, tubelet, grid, c), videos)


def test_patchify_video_rejects_indivisible_sizes() -> None:
    with pytest.raises(ValueError, match="multiple"):
        patchify_video(torch.randn(1, 3, 5, 16, 16), 8, 2)


# ----------------------------------------------------------------------------------------------------
# sin-cos position tables


def _mae_1d_reference(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """facebookresearch/mae util/pos_embed.py get_1d_sincos_pos_embed_from_grid, re-typed."""
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _mae_2d_reference(embed_dim: int, gh: int, gw: int) -> np.ndarray:
    """facebookresearch/mae get_2d_sincos_pos_embed (generalised to a non-square grid)."""
    grid = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))  # w goes first
    emb_a = _mae_1d_reference(embed_dim // 2, grid[0])  # MAE calls this emb_h, but grid[0] is w
    emb_b = _mae_1d_reference(embed_dim // 2, grid[1])
    return np.concatenate([emb_a, emb_b], axis=1)


def _videomae_reference(n_position: int, d_hid: int) -> np.ndarray:
    """MCG-NJU/VideoMAE (and HF VideoMAE) get_sinusoid_encoding_table: sin/cos *interleaved*."""
    table = np.array([[pos / np.power(10000, 2 * (j // 2) / d_hid) for j in range(d_hid)]
                      for pos in range(n_position)])
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return table


def test_sincos_shapes() -> None:
    assert sincos_pos_embed_1d(8, 5).shape == (5, 8)
    assert sincos_pos_embed_2d(16, (3, 5)).shape == (15, 16)
    assert sincos_pos_embed_3d(32, (2, 3, 4)).shape == (24, 32)
    assert sincos_1d(6, torch.zeros(2, 3)).shape == (6, 6)
    for t in (sincos_pos_embed_1d(8, 5), sincos_pos_embed_2d(16, (3, 5)), sincos_pos_embed_3d(32, (2, 3, 4))):
        assert t.dtype == torch.float32


def test_sincos_rejects_bad_dims() -> None:
    with pytest.raises(ValueError, match="even"):
        sincos_pos_embed_1d(7, 3)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(6, (2, 2))
    with pytest.raises(ValueError, match="divisible by 16"):
        sincos_pos_embed_3d(24, (2, 2, 2))


def test_sincos_1d_known_values() -> None:
    t = sincos_pos_embed_1d(4, 3)
    # D=4: omega = [1, 1/100]; row p = [sin(p), sin(p/100), cos(p), cos(p/100)].
    assert torch.allclose(t[0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert torch.allclose(t[1], torch.tensor([math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]))
    assert torch.allclose(t[2], torch.tensor([math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]))
    ref = _mae_1d_reference(64, np.arange(50))
    assert np.allclose(sincos_pos_embed_1d(64, 50).numpy(), ref, atol=1e-6)
    # Fractional positions (sincos_1d takes any positions).
    pos = torch.tensor([0.5, 3.25])
    assert np.allclose(sincos_1d(8, pos).numpy(), _mae_1d_reference(8, pos.numpy()), atol=1e-6)


def test_sincos_1d_matches_videomae_table() -> None:
    assert np.allclose(sincos_pos_embed_1d(16, 12, interleave=True).numpy(), _videomae_reference(12, 16), atol=1e-6)


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (6, 2)])
def test_sincos_2d_matches_official_mae_layout(grid: tuple[int, int]) -> None:
    d = 32
    gh, gw = grid
    table = sincos_pos_embed_2d(d, grid)
    assert np.allclose(table.numpy(), _mae_2d_reference(d, gh, gw), atol=1e-6)
    t = table.reshape(gh, gw, d)
    first, second = t[..., : d // 2], t[..., d // 2:]
    # First half encodes w only: constant down each column, varies along w.
    assert torch.allclose(first, first[:1].expand_as(first))
    assert not torch.allclose(first[:, :1], first[:, -1:])
    # Second half encodes h only: constant along each row, varies along h.
    assert torch.allclose(second, second[:, :1].expand_as(second))
    assert not torch.allclose(second[:1], second[-1:])
    # And each half is the 1-D table of its coordinate.
    assert torch.allclose(first[0], sincos_pos_embed_1d(d // 2, gw))
    assert torch.allclose(second[:, 0], sincos_pos_embed_1d(d // 2, gh))


def test_sincos_3d_layout() -> None:
    d, grid = 32, (3, 2, 4)
    gt, gh, gw = grid
    t = sincos_pos_embed_3d(d, grid).reshape(gt, gh * gw, d)
    d_t = d // 4
    spatial, temporal = t[..., : d - d_t], t[..., d - d_t:]
    # Spatial part: the 2-D table, the same for every time slice; temporal part: constant within a slice.
    assert torch.allclose(spatial, sincos_pos_embed_2d(d - d_t, (gh, gw))[None].expand_as(spatial))
    assert torch.allclose(temporal, sincos_pos_embed_1d(d_t, gt)[:, None].expand_as(temporal))


# ----------------------------------------------------------------------------------------------------
# attention


def _twin_attention(qkv_bias: str = "qkv") -> tuple[Attention, Attention]:
    torch.manual_seed(0)
    a = Attention(32, 4, qkv_bias=qkv_bias, attn_impl="sdpa")  # type: ignore[arg-type]
    b = Attention(32, 4, qkv_bias=qkv_bias, attn_impl="math")  # type: ignore[arg-type]
    with torch.no_grad():
        for p in a.parameters():
            p.normal_(0, 0.1)  # O(1) activations and gradients, so atol=1e-5 is meaningful
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("qkv_bias", ["qkv", "qv", "none"])
@pytest.mark.parametrize("padded", [False, True])
def test_attention_sdpa_matches_math(qkv_bias: str, padded: bool) -> None:
    a, b = _twin_attention(qkv_bias)
    x = torch.randn(3, 7, 32)
    bias = None
    if padded:
        pad = torch.zeros(3, 7, dtype=torch.bool)
        pad[0, 5:] = True
        pad[2, 1] = True
        bias = key_padding_bias(pad, torch.float32)
        assert bias.shape == (3, 1, 1, 7)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa, bias), b(xb, bias)
    assert torch.allclose(ya, yb, atol=1e-5)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-5)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5), na


def test_attention_padding_bias_hides_keys() -> None:
    a, _ = _twin_attention()
    x = torch.randn(2, 6, 32)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[:, 4:] = True
    y = a(x, key_padding_bias(pad, x.dtype))
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 2, 32) * 10  # the padded keys' content must not matter to other queries
    y2 = a(x2, key_padding_bias(pad, x.dtype))
    assert torch.allclose(y[:, :4], y2[:, :4], atol=1e-5)


def test_attention_qv_bias_has_no_k_bias() -> None:
    a = Attention(16, 2, qkv_bias="qv")
    names = {n for n, _ in a.named_parameters()}
    assert names == {"qkv.weight", "q_bias", "v_bias", "proj.weight", "proj.bias"}
    assert a.qkv.bias is None
    with torch.no_grad():
        a.q_bias.normal_()
        a.v_bias.normal_()
    # Same as a "qkv" module whose bias is [q_bias, 0, v_bias]: the k bias is exactly zero.
    ref = Attention(16, 2, qkv_bias="qkv", attn_impl="math")
    with torch.no_grad():
        ref.qkv.weight.copy_(a.qkv.weight)
        ref.qkv.bias.copy_(torch.cat([a.q_bias, torch.zeros(16), a.v_bias]))
        ref.proj.load_state_dict(a.proj.state_dict())
    x = torch.randn(2, 5, 16)
    assert torch.allclose(a(x), ref(x), atol=1e-6)
    # q_bias and v_bias learn; nothing else turns into a k bias.
    a(x).pow(2).sum().backward()
    assert a.q_bias.grad is not None and a.v_bias.grad is not None
    assert a.q_bias.grad.abs().sum() > 0 and a.v_bias.grad.abs().sum() > 0


def test_attention_none_bias_has_no_bias_params() -> None:
    a = Attention(16, 2, qkv_bias="none")
    assert {n for n, _ in a.named_parameters()} == {"qkv.weight", "proj.weight", "proj.bias"}


def test_attention_rejects_bad_args() -> None:
    with pytest.raises(ValueError, match="divisible"):
        Attention(10, 3)
    with pytest.raises(ValueError, match="qkv_bias"):
        Attention(16, 2, qkv_bias="k")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attn_impl"):
        Attention(16, 2, attn_impl="flash")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# drop path


def test_drop_path_identity_in_eval_and_at_zero() -> None:
    x = torch.randn(8, 5, 4)
    m = DropPath(0.5).eval()
    assert torch.equal(m(x), x)
    assert torch.equal(drop_path(x, 0.0, training=True), x)


def test_drop_path_zeroes_whole_samples_in_train() -> None:
    torch.manual_seed(0)
    x = torch.rand(256, 5, 4) + 0.5  # strictly positive so a dropped sample is all zeros
    m = DropPath(0.5).train()
    y = m(x)
    dropped = (y == 0).flatten(1).all(dim=1)
    kept = torch.isclose(y, x / 0.5).flatten(1).all(dim=1)
    assert bool((dropped | kept).all()), "every sample is either dropped whole or kept and rescaled"
    assert 0 < int(dropped.sum()) < 256
    assert abs(dropped.float().mean().item() - 0.5) < 0.15


# ----------------------------------------------------------------------------------------------------
# patch / tubelet embeddings


def test_patch_embed_2d_shapes_and_errors() -> None:
    pe = PatchEmbed2d((16, 24), 8, in_chans=3, embed_dim=12)
    assert pe.grid_size == (2, 3) and pe.num_patches == 6
    assert pe(torch.randn(2, 3, 16, 24)).shape == (2, 6, 12)
    for bad in [(2, 3, 24, 16), (2, 1, 16, 24), (3, 16, 24)]:
        with pytest.raises(ValueError) as e:
            pe(torch.randn(*bad))
        msg = str(e.value)
        assert "(B, 3, 16, 24)" in msg and str(bad) in msg, msg
    with pytest.raises(ValueError, match="multiple"):
        PatchEmbed2d(30, 8)


def test_patch_embed_2d_token_order_matches_patchify() -> None:
    # A conv with stride p is a linear map of each patch: tokens must line up with patchify's order.
    pe = PatchEmbed2d((16, 24), 8, in_chans=3, embed_dim=5)
    x = torch.randn(2, 3, 16, 24)
    w = pe.proj.weight.permute(0, 2, 3, 1).reshape(5, -1)  # (D, p*q*c) in patchify's order
    ref = patchify(x, 8) @ w.t() + pe.proj.bias
    assert torch.allclose(pe(x), ref, atol=1e-5)


def test_tubelet_embed_3d_shapes_and_errors() -> None:
    te = TubeletEmbed3d((16, 24), 8, num_frames=4, tubelet_size=2, in_chans=3, embed_dim=12)
    assert te.grid_size == (2, 2, 3) and te.num_patches == 12
    assert te(torch.randn(2, 3, 4, 16, 24)).shape == (2, 12, 12)
    for bad in [(2, 3, 6, 16, 24), (2, 3, 4, 24, 16), (2, 1, 4, 16, 24), (2, 3, 16, 24)]:
        with pytest.raises(ValueError) as e:
            te(torch.randn(*bad))
        msg = str(e.value)
        assert "(B, 3, 4, 16, 24)" in msg and str(bad) in msg, msg
    with pytest.raises(ValueError, match="multiple"):
        TubeletEmbed3d(16, 8, num_frames=5, tubelet_size=2)


def test_tubelet_token_order_matches_patchify_video() -> None:
    te = TubeletEmbed3d((16, 24), 8, num_frames=4, tubelet_size=2, in_chans=3, embed_dim=5)
    x = torch.randn(2, 3, 4, 16, 24)
    w = te.proj.weight.permute(0, 2, 3, 4, 1).reshape(5, -1)  # (D, pt*p*q*c)
    ref = patchify_video(x, 8, 2) @ w.t() + te.proj.bias
    assert torch.allclose(te(x), ref, atol=1e-5)


def test_inflate_from_2d_static_clip_matches_image() -> None:
    torch.manual_seed(0)
    pe = PatchEmbed2d((16, 24), 8, in_chans=3, embed_dim=12)
    te = TubeletEmbed3d((16, 24), 8, num_frames=6, tubelet_size=3, in_chans=3, embed_dim=12)
    te.inflate_from_2d(pe.proj.weight, pe.proj.bias)
    img = torch.randn(2, 3, 16, 24)
    clip = img.unsqueeze(2).expand(-1, -1, 6, -1, -1)
    tok2d = pe(img)  # (B, 6, D)
    tok3d = te(clip).reshape(2, 2, 6, 12)  # (B, T', H*W, D)
    for t in range(2):
        assert torch.allclose(tok3d[:, t], tok2d, atol=1e-5)
