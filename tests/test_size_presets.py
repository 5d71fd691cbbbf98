"""Size presets describe encoders only; each method's recipe decides what a size means for the rest.

Reference figures: VideoMAE's decoders (MCG-NJU/VideoMAE modeling_pretrain.py, scripts' --decoder_depth 4):
ViT-S 192 wide / 3 heads, ViT-B 384 / 6, ViT-L 512 / 8, ViT-H 640 / 8, 4 blocks each, 16-px patches; MAE's
decoder (facebookresearch/mae models_mae.py) and M3AE's (m3ae_public model.py) are 512 / 8 blocks / 16 heads
for every size.
"""

from __future__ import annotations

import pytest
import torch

import mmmae
from mmmae.registry import PRESET_KEYS, list_sizes, load_size, resolve_model_cfg

REAL_SIZES = ["vit_small", "vit_base", "vit_large", "vit_huge", "vit_giant"]
ENCODERS = {  # (embed_dim, depth, num_heads) of the ViT family (timm / MAE; ViT-g: VideoMAEv2)
    "vit_small": (384, 12, 6), "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16), "vit_huge": (1280, 32, 16),
    "vit_giant": (1408, 40, 16)}


def test_presets_set_encoder_keys_only() -> None:
    assert set(list_sizes()) >= set(REAL_SIZES) | {"vit_tiny_test"}
    for size in list_sizes():
        assert set(load_size(size)) <= set(PRESET_KEYS), size


@pytest.mark.parametrize("size,decoder", [
    ("vit_small", (192, 4, 3)), ("vit_base", (384, 4, 6)), ("vit_large", (512, 4, 8)), ("vit_huge", (640, 4, 8))])
def test_videomae_decoder_follows_the_encoder(size: str, decoder: tuple[int, int, int]) -> None:
    cfg = resolve_model_cfg("videomae", size)
    assert (cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads) == decoder
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == ENCODERS[size]
    assert cfg.patch_size == 16  # VideoMAE's ViT-H is patch 16 too


@pytest.mark.parametrize("method", ["mae", "m3ae"])
@pytest.mark.parametrize("size", REAL_SIZES)
def test_mae_and_m3ae_keep_one_decoder(method: str, size: str) -> None:
    cfg = resolve_model_cfg(method, size)
    assert (cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads) == (512, 8, 16)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == ENCODERS[size]


def test_videomaev2_giant_recipe() -> None:
    """VideoMAEv2 models/modeling_pretrain.py pretrain_videomae_giant_patch14_224: encoder 1408 x 40, 16 heads,
    mlp_ratio 48/11, patch 14; decoder 512 wide with 8 heads (4 blocks, the scripts' --decoder_depth)."""
    cfg = resolve_model_cfg("videomae", "vit_giant")
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size) == (1408, 40, 16, 14)
    assert cfg.mlp_ratio == 48 / 11 and int(cfg.embed_dim * cfg.mlp_ratio) == 6144
    assert (cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads) == (512, 4, 8)


def test_mae_vit_huge_is_patch_14() -> None:
    assert resolve_model_cfg("mae", "vit_huge").patch_size == 14  # MAE's ViT-H/14


@pytest.mark.parametrize("method", ["mae", "simmim", "bevt_spatial", "m3ae", "retrieval"])
def test_an_image_method_refuses_frames_by_name(method: str) -> None:
    """create_model("mae", num_frames=16) used to die in a tuple unpack inside the patch embedding."""
    with pytest.raises(ValueError, match=f"model '{method}' reads .* so num_frames=16 does not apply") as e:
        mmmae.create_model(method, size="vit_tiny_test", num_frames=16)
    assert "videomae" in str(e.value)
    assert mmmae.create_model("classifier", size="vit_tiny_test", img_size=32, patch_size=8, num_frames=4)


def test_overrides_beat_the_recipe() -> None:
    cfg = resolve_model_cfg("videomae", "vit_base", decoder_embed_dim=512)
    assert cfg.decoder_embed_dim == 512 and cfg.decoder_num_heads == 6


@pytest.mark.parametrize("size", REAL_SIZES + ["vit_tiny_test"])
@pytest.mark.parametrize("method", mmmae.list_models())
def test_every_method_builds_at_every_size(method: str, size: str) -> None:
    """Every method x every preset resolves and builds (on the meta device: no memory, no init)."""
    cfg = resolve_model_cfg(method, size)
    model = mmmae.registry.build_from_cfg(method, cfg, device="meta")
    n_params = sum(p.numel() for p in model.parameters())
    enc = ENCODERS.get(size)
    if enc is not None:
        d, depth = enc[0], enc[1]
        assert n_params > depth * 12 * d * d  # at least the encoder's blocks (12 d^2 per block)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert isinstance(model, torch.nn.Module)


def test_unknown_size_names_the_nearest() -> None:
    with pytest.raises(ValueError, match="vit_base"):
        resolve_model_cfg("mae", "vit_bsae")
