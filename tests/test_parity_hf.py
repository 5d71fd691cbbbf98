"""Parity: our ``mae`` against Hugging Face ``ViTMAEForPreTraining`` on the same weights and mask.

The weights go through ``mmmae.convert.from_hf_vitmae`` (which checks HF's sin-cos tables against ours
instead of loading them), so agreement also proves the 2-D position-table layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mmmae
from mmmae.convert import from_hf_vitmae
from mmmae.masking import mask_from_noise

import transformers  # noqa: E402  (a required dependency: no skip)

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


# ----------------------------------------------------------------------------------------------------
# Hugging Face directories in, and mmmae exported to the transformers classes (mmmae.weights)


def _moved(model: torch.nn.Module, seed: int = 5) -> torch.nn.Module:
    """Every weight off its init (zero biases, unit norms, zero q/v biases, layer scales at init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def _mmmae(name: str, **kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    common = {"embed_dim": HIDDEN, "depth": LAYERS, "num_heads": HEADS, "mlp_ratio": 4.0, "img_size": IMG,
              "patch_size": PATCH, "attn_impl": "math"}
    return _moved(mmmae.create_model(name, **{**common, **kw}))


VIDEO = {"num_frames": 4, "tubelet_size": 2, "pos_embed": "sincos_1d", "cls_token": False, "qkv_bias": "qv"}


def _from_export(model: torch.nn.Module, tmp_path: Path, hf_class: str, **load_kw: object) -> torch.nn.Module:
    from mmmae.weights import export
    assert export(model, "hf", tmp_path, hf_class=hf_class)["class"] == hf_class
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [hf_class]
    hf, info = getattr(transformers, hf_class).from_pretrained(str(tmp_path), output_loading_info=True, **load_kw)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return hf.eval()


def test_vitmae_directory_loads_and_matches(tmp_path: Path, hf_pair: tuple[bool, torch.nn.Module]) -> None:
    from mmmae.weights import load
    norm_pix, hf = hf_pair
    hf.save_pretrained(str(tmp_path))
    ours = _ours(norm_pix, "math")
    rep = load(ours, tmp_path)
    assert rep.layout == "hf_vit" and rep.ok
    assert set(rep.fixed) == {"vit.embeddings.position_embeddings", "decoder.decoder_pos_embed"}  # checked sin-cos
    gen = torch.Generator().manual_seed(3)
    x, noise = torch.randn(BATCH, 3, IMG, IMG, generator=gen), torch.rand(BATCH, NUM_PATCHES, generator=gen)
    with torch.no_grad():
        assert torch.allclose(ours({"image": x, "mask": mask_from_noise(noise, RATIO)})["pred"],
                              hf(pixel_values=x, noise=noise).logits, atol=1e-5)


def test_mae_exports_to_vitmae_for_pretraining(tmp_path: Path) -> None:
    ours = _mmmae("mae", decoder_embed_dim=DEC_HIDDEN, decoder_depth=DEC_LAYERS, decoder_num_heads=DEC_HEADS,
                  mask_ratio=RATIO, norm_pix_loss=True)
    hf = _from_export(ours, tmp_path, "ViTMAEForPreTraining")
    gen = torch.Generator().manual_seed(4)
    x, noise = torch.randn(BATCH, 3, IMG, IMG, generator=gen), torch.rand(BATCH, NUM_PATCHES, generator=gen)
    with torch.no_grad():
        out, ref = ours({"image": x, "mask": mask_from_noise(noise, RATIO)}), hf(pixel_values=x, noise=noise)
    assert torch.allclose(out["pred"], ref.logits, atol=1e-5) and torch.allclose(out["loss"], ref.loss, atol=1e-5)


def test_encoder_with_layer_scale_exports_to_vit_model(tmp_path: Path) -> None:
    ours = _mmmae("mae", init_values=0.1, decoder_embed_dim=DEC_HIDDEN, decoder_depth=1, decoder_num_heads=4)
    # ViTModel has no layer scale: the exporter folds gamma into attn.proj / mlp.fc2 (exact).
    hf = _from_export(ours, tmp_path, "ViTModel", add_pooling_layer=False)
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(hf(pixel_values=x).last_hidden_state, ours.encoder.forward_features(x), atol=1e-5)


def test_token_classifier_exports_to_vit_for_image_classification_and_back(tmp_path: Path) -> None:
    from mmmae.weights import WeightsError, load
    ours = _mmmae("classifier", num_classes=7, global_pool="token")
    hf = _from_export(ours, tmp_path, "ViTForImageClassification")
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.allclose(hf(pixel_values=x).logits, ours({"image": x})["logits"], atol=1e-5)
    # The directory in again: a token classifier takes it; a mean-pooled one (no final norm) refuses it.
    again = mmmae.create_model("classifier", embed_dim=HIDDEN, depth=LAYERS, num_heads=HEADS, img_size=IMG,
                               patch_size=PATCH, num_classes=7, global_pool="token").eval()
    assert load(again, tmp_path).ok
    with torch.no_grad():
        assert torch.allclose(again({"image": x})["logits"], hf(pixel_values=x).logits, atol=1e-5)
    avg = mmmae.create_model("classifier", embed_dim=HIDDEN, depth=LAYERS, num_heads=HEADS, img_size=IMG,
                             patch_size=PATCH, num_classes=7, global_pool="avg")
    with pytest.raises(WeightsError, match="fc_norm.weight"):
        load(avg, tmp_path)


def test_videomae_exports_to_videomae_for_pretraining_with_its_qv_biases(tmp_path: Path) -> None:
    from mmmae.masking import tube_mask
    ours = _mmmae("videomae", decoder_embed_dim=DEC_HIDDEN, decoder_depth=1, decoder_num_heads=DEC_HEADS,
                  norm_pix_loss=True, **VIDEO)
    hf = _from_export(ours, tmp_path, "VideoMAEForPreTraining")
    layer = hf.videomae.encoder.layer[0].attention.attention
    assert layer.key.bias is None  # transformers 5: q/v biases on query / value, none on key
    assert torch.equal(layer.query.bias, ours.encoder.blocks[0].attn.q_bias)
    assert torch.equal(layer.value.bias, ours.encoder.blocks[0].attn.v_bias)
    hf.decoder.norm.eps = 1e-6  # transformers hard-codes LayerNorm's default 1e-5 here (VideoMAE's is 1e-6)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 4, IMG, IMG, generator=gen)
    mask = tube_mask(2, (2, 4, 4), RATIO, generator=gen)
    with torch.no_grad():
        out, ref = ours({"video": x, "mask": mask}), hf(pixel_values=x.transpose(1, 2), bool_masked_pos=mask)
    assert torch.allclose(out["pred"][mask].view(2, -1, out["pred"].shape[-1]), ref.logits, atol=1e-5)


def test_video_encoder_exports_to_videomae_model(tmp_path: Path) -> None:
    ours = _mmmae("videomae", decoder_embed_dim=DEC_HIDDEN, decoder_depth=1, decoder_num_heads=DEC_HEADS, **VIDEO)
    from mmmae.weights import export
    export(ours, "hf", tmp_path, part="encoder")
    hf, info = transformers.VideoMAEModel.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = torch.randn(2, 3, 4, IMG, IMG, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = hf.eval()(pixel_values=x.transpose(1, 2)).last_hidden_state
        assert torch.allclose(ref, ours.encoder.forward_features(x), atol=1e-5)


def test_video_classifier_exports_to_videomae_for_video_classification_and_back(tmp_path: Path) -> None:
    from mmmae.weights import load
    ours = _mmmae("classifier", num_classes=6, global_pool="avg", **VIDEO)
    hf = _from_export(ours, tmp_path, "VideoMAEForVideoClassification")
    x = torch.randn(2, 3, 4, IMG, IMG, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        raw = hf(pixel_values=x.transpose(1, 2)).logits
        hf.fc_norm.eps = 1e-6  # transformers: nn.LayerNorm(hidden_size), eps 1e-5; VideoMAE's fc_norm: 1e-6
        assert torch.allclose(hf(pixel_values=x.transpose(1, 2)).logits, ours({"video": x})["logits"], atol=1e-5)
        assert (raw - ours({"video": x})["logits"]).abs().max() < 1e-3  # what the eps alone changes
    again = mmmae.create_model("classifier", embed_dim=HIDDEN, depth=LAYERS, num_heads=HEADS, img_size=IMG,
                               patch_size=PATCH, num_classes=6, global_pool="avg", **VIDEO).eval()
    rep = load(again, tmp_path)
    assert rep.layout == "hf_videomae" and rep.ok
    with torch.no_grad():
        assert torch.allclose(again({"video": x})["logits"], ours({"video": x})["logits"], atol=1e-6)


def test_export_refuses_what_the_class_cannot_hold(tmp_path: Path) -> None:
    from mmmae.weights import ExportError, export
    avg = _mmmae("classifier", num_classes=3, global_pool="avg")
    with pytest.raises(ExportError, match="always apply a final layernorm"):
        export(avg, "hf", tmp_path)
    with pytest.raises(ExportError, match="unknown export format 'onnx'"):
        export(avg, "onnx", tmp_path)
    omni_bias = _mmmae("classifier", num_classes=3, global_pool="avg", **{**VIDEO, "qkv_bias": "qkv"})
    with pytest.raises(ExportError, match="non-zero k bias"):
        export(omni_bias, "hf", tmp_path)


def test_saved_videomae_classification_directory_loads(tmp_path: Path) -> None:
    """transformers 5 writes VideoMAE's q/v biases back under the hub's names (attention.attention.q_bias /
    v_bias); both those and the in-memory query.bias / value.bias read as mmmae's q_bias / v_bias."""
    from mmmae.weights import load
    cfg = transformers.VideoMAEConfig(image_size=IMG, patch_size=PATCH, num_frames=4, tubelet_size=2,
                                      hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      intermediate_size=4 * HIDDEN, num_labels=6, layer_norm_eps=1e-6,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    hf = _moved(transformers.VideoMAEForVideoClassification(cfg))
    hf.save_pretrained(str(tmp_path))
    ours = mmmae.create_model("classifier", embed_dim=HIDDEN, depth=LAYERS, num_heads=HEADS, img_size=IMG,
                              patch_size=PATCH, num_classes=6, global_pool="avg", **VIDEO).eval()
    rep = load(ours, tmp_path)
    assert rep.layout == "hf_videomae" and rep.ok
    assert rep.renamed["encoder.blocks.0.attn.q_bias"].endswith(("q_bias", "query.bias"))
    hf.fc_norm.eps = 1e-6
    x = torch.randn(2, 3, 4, IMG, IMG, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        assert torch.allclose(ours({"video": x})["logits"], hf(pixel_values=x.transpose(1, 2)).logits, atol=1e-5)
