"""Parity: our ``mae`` against Hugging Face ``ViTMAEForPreTraining`` on the same weights and mask.

The weights go through ``mmmae.convert.from_hf_vitmae`` (which checks HF's sin-cos tables against ours
instead of loading them), so agreement also proves the 2-D position-table layout.
"""

from __future__ import annotations

import pytest
import torch

import mmmae
from mmmae.convert import from_hf_vitmae
from mmmae.masking import mask_from_noise

transformers = pytest.importorskip("transformers")

HIDDEN, LAYERS, HEADS, DEC_HIDDEN, DEC_LAYERS, DEC_HEADS = 64, 2, 4, 32, 1, 4
IMG, PATCH, BATCH, RATIO = 32, 8, 3, 0.75
NUM_PATCHES = (IMG // PATCH) ** 2


def _hf_model(norm_pix_loss: bool) -> torch.nn.Module:
    cfg = transformers.ViTMAEConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=4 * HIDDEN,
        decoder_hidden_size=DEC_HIDDEN, decoder_num_hidden_layers=DEC_LAYERS,
        decoder_num_attention_heads=DEC_HEADS, decoder_intermediate_size=4 * DEC_HIDDEN, image_size=IMG,
        patch_size=PATCH, num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True,
        norm_pix_loss=norm_pix_loss, mask_ratio=RATIO, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    hf = transformers.ViTMAEForPreTraining(cfg).eval()
    # transformers 5.x does not fill the sin-cos tables on construction; do what from_pretrained's
    # init would have done.
    hf.vit.embeddings.patch_embeddings.projection._is_hf_initialized = False
    hf.vit.embeddings.initialize_weights()
    hf.decoder.initialize_weights(NUM_PATCHES)
    # Move every trainable weight off its init (LayerNorms at 1/0, zero biases) so that a swapped or
    # dropped parameter cannot hide behind a symmetric initial value.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return hf


def _ours(norm_pix_loss: bool, attn_impl: str) -> torch.nn.Module:
    return mmmae.create_model(
        "mae", embed_dim=HIDDEN, depth=LAYERS, num_heads=HEADS, mlp_ratio=4.0, decoder_embed_dim=DEC_HIDDEN,
        decoder_depth=DEC_LAYERS, decoder_num_heads=DEC_HEADS, img_size=IMG, patch_size=PATCH,
        mask_ratio=RATIO, norm_pix_loss=norm_pix_loss, attn_impl=attn_impl).eval()


@pytest.fixture(scope="module", params=[True, False], ids=["norm_pix", "raw_pix"])
def hf_pair(request: pytest.FixtureRequest) -> tuple[bool, torch.nn.Module]:
    return request.param, _hf_model(request.param)


@pytest.mark.parametrize("attn_impl", ["math", "sdpa"])
def test_mae_matches_hf_vitmae(hf_pair: tuple[bool, torch.nn.Module], attn_impl: str) -> None:
    norm_pix, hf = hf_pair
    ours = _ours(norm_pix, attn_impl)
    ours.load_state_dict(from_hf_vitmae(hf.state_dict()), strict=True)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(BATCH, 3, IMG, IMG, generator=gen)
    noise = torch.rand(BATCH, NUM_PATCHES, generator=gen)
    mask = mask_from_noise(noise, RATIO)
    with torch.no_grad():
        ref = hf(pixel_values=x, noise=noise)
        out = ours({"image": x, "mask": mask})
    assert torch.equal(ref.mask.bool(), out["mask"])
    assert out["pred"].shape == ref.logits.shape == (BATCH, NUM_PATCHES, PATCH * PATCH * 3)
    assert torch.allclose(out["pred"], ref.logits, atol=1e-5), (out["pred"] - ref.logits).abs().max()
    assert torch.allclose(out["loss"], ref.loss, atol=1e-5), (out["loss"].item(), ref.loss.item())


def test_converter_rejects_a_swapped_position_table(hf_pair: tuple[bool, torch.nn.Module]) -> None:
    _, hf = hf_pair
    state = dict(hf.state_dict())
    table = state["vit.embeddings.position_embeddings"]
    half = table.shape[-1] // 2
    state["vit.embeddings.position_embeddings"] = torch.cat([table[..., half:], table[..., :half]], dim=-1)
    with pytest.raises(ValueError, match="position table"):
        from_hf_vitmae(state)


def test_converter_output_is_complete(hf_pair: tuple[bool, torch.nn.Module]) -> None:
    _, hf = hf_pair
    converted = from_hf_vitmae(hf.state_dict())
    ours = _ours(True, "math")
    assert set(converted) == set(ours.state_dict())
