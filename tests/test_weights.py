"""The weights layer: every released layout in (``mmmae.weights.load``), mmmae out to timm and the
official layouts (Hugging Face exports: tests/test_parity_hf.py).

Each layout-in test builds a state dict in the reference's exact key layout, its key list and shapes
written here from the reference's module structure:

- facebookresearch/mae models_mae.py ``MaskedAutoencoderViT`` (pretraining), models_vit.py (a timm
  ``VisionTransformer``; global_pool: ``fc_norm`` replaces ``norm``), main_linprobe.py (``head =
  Sequential(BatchNorm1d(affine=False, eps=1e-6), head)``);
- MCG-NJU/VideoMAE modeling_pretrain.py / modeling_finetune.py (q/v biases, ``gamma_1/2``; no [cls]);
  OpenGVLab/VideoMAEv2 models/modeling_finetune.py ``vit_giant_patch14_224`` (1408 wide, 40 deep, 16
  heads, mlp_ratio 48/11);
- facebookresearch/omnivore omnimae/omni_mae_model.py ``OmniMAE(trunk, head)`` over
  omnivision/models/vision_transformer.py (``patch_embed.proj.1`` after PadIm2Video, a sin-cos
  ``pos_embed`` buffer, global_pool then ``norm``);
- microsoft/SimMIM models/simmim.py + models/vision_transformer.py (shared ``rel_pos_bias``,
  ``gamma_1/2``, ``decoder.0``).

Agreement is checked on outputs against references computed independently: the real timm
``VisionTransformer`` (which MAE's models subclass) where it is the reference, and the references'
forward passes written out below for VideoMAE's, omnivision's and SimMIM's ViTs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmmae
from mmmae import weights
from mmmae.engine.trainer import load_init_weights
from mmmae.weights.export import official_state

import timm  # noqa: E402  (a required dependency: no skip)

ROOT = Path(__file__).resolve().parents[1]
D, DEPTH, HEADS, HIDDEN = 32, 2, 2, 64  # vit_tiny_test: mlp_ratio 2
DD, DDEPTH, DHEADS, DHIDDEN = 16, 1, 2, 32  # TEST_DECODER (the decoder's mlp_ratio is the encoder's)
IMG, P, FRAMES, TUB = 32, 8, 4, 2
L = (IMG // P) ** 2  # 16
LV = (FRAMES // TUB) * L  # 32
K = 5  # classes


# ---------------------------------------------------------------------------- reference key layouts


def vit_block_keys(prefix: str, d: int, hidden: int, *, bias: str = "qkv", gamma: bool = False,
                   table_rows: int = 0, heads: int = HEADS) -> list[tuple[str, tuple[int, ...]]]:
    """One block of timm's ViT (bias='qkv') or BEiT / VideoMAE's (bias='qv': qkv without bias, q_bias
    and v_bias; ``gamma_1/2`` layer scale; ``table_rows``: a per-block relative position table)."""
    keys = [("norm1.weight", (d,)), ("norm1.bias", (d,)), ("attn.qkv.weight", (3 * d, d))]
    keys += [("attn.qkv.bias", (3 * d,))] if bias == "qkv" else [("attn.q_bias", (d,)), ("attn.v_bias", (d,))]
    if table_rows:
        keys += [("attn.relative_position_bias_table", (table_rows, heads))]
    keys += [("attn.proj.weight", (d, d)), ("attn.proj.bias", (d,)), ("norm2.weight", (d,)), ("norm2.bias", (d,)),
             ("mlp.fc1.weight", (hidden, d)), ("mlp.fc1.bias", (hidden,)), ("mlp.fc2.weight", (d, hidden)),
             ("mlp.fc2.bias", (d,))]
    if gamma:
        keys += [("gamma_1", (d,)), ("gamma_2", (d,))]
    return [(prefix + k, s) for k, s in keys]


def blocks(prefix: str, depth: int, d: int, hidden: int, **kw: object) -> list[tuple[str, tuple[int, ...]]]:
    return [k for i in range(depth) for k in vit_block_keys(f"{prefix}{i}.", d, hidden, **kw)]  # type: ignore[arg-type]


def fill(keys: list[tuple[str, tuple[int, ...]]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values off every symmetric init (norm weights near 1, the rest small)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in keys:
        base = 1.0 if (k.endswith("weight") and "norm" in k) or "gamma" in k else 0.0
        out[k] = base + 0.2 * torch.randn(shape, generator=g)
    return out


def mae_2d_sincos(embed_dim: int, grid: int, cls_token: bool) -> torch.Tensor:
    """facebookresearch/mae util/pos_embed.py get_2d_sincos_pos_embed, written out (1, [1+]L, D)."""
    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    w, h = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    emb = np.concatenate([one_d(embed_dim // 2, w), one_d(embed_dim // 2, h)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return torch.from_numpy(emb).float()[None]


def sinusoid_table(n: int, d: int) -> torch.Tensor:
    """VideoMAE / omnivision get_sinusoid_encoding_table, written out (1, n, d)."""
    t = np.array([[p / np.power(10000, 2 * (j // 2) / d) for j in range(d)] for p in range(n)])
    t[:, 0::2], t[:, 1::2] = np.sin(t[:, 0::2]), np.cos(t[:, 1::2])
    return torch.from_numpy(t).float()[None]


def mae_pretrain_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """models_mae.py MaskedAutoencoderViT (tiny): encoder at the top level, decoder_*, frozen sin-cos tables."""
    keys = [("cls_token", (1, 1, D)), ("patch_embed.proj.weight", (D, 3, P, P)), ("patch_embed.proj.bias", (D,))]
    keys += blocks("blocks.", DEPTH, D, HIDDEN) + [("norm.weight", (D,)), ("norm.bias", (D,))]
    keys += [("decoder_embed.weight", (DD, D)), ("decoder_embed.bias", (DD,)), ("mask_token", (1, 1, DD))]
    keys += blocks("decoder_blocks.", DDEPTH, DD, DHIDDEN)
    keys += [("decoder_norm.weight", (DD,)), ("decoder_norm.bias", (DD,)), ("decoder_pred.weight", (P * P * 3, DD)),
             ("decoder_pred.bias", (P * P * 3,))]
    state = fill(keys, seed)
    state["pos_embed"] = mae_2d_sincos(D, IMG // P, cls_token=True)
    state["decoder_pos_embed"] = mae_2d_sincos(DD, IMG // P, cls_token=True)
    return state


def mae_finetune_state(seed: int = 1, linprobe: bool = False) -> dict[str, torch.Tensor]:
    """models_vit.py (global_pool=True: fc_norm, no norm) or its linear probe (main_linprobe.py: cls
    token + norm, head = BatchNorm1d(affine=False) + Linear). The learned table has a trained [cls] row."""
    keys = [("cls_token", (1, 1, D)), ("pos_embed", (1, 1 + L, D)), ("patch_embed.proj.weight", (D, 3, P, P)),
            ("patch_embed.proj.bias", (D,))] + blocks("blocks.", DEPTH, D, HIDDEN)
    if linprobe:
        keys += [("norm.weight", (D,)), ("norm.bias", (D,)), ("head.1.weight", (K, D)), ("head.1.bias", (K,))]
    else:
        keys += [("fc_norm.weight", (D,)), ("fc_norm.bias", (D,)), ("head.weight", (K, D)), ("head.bias", (K,))]
    state = fill(keys, seed)
    if linprobe:
        g = torch.Generator().manual_seed(seed + 100)
        state["head.0.running_mean"] = torch.randn(D, generator=g)
        state["head.0.running_var"] = 0.5 + torch.rand(D, generator=g)
        state["head.0.num_batches_tracked"] = torch.tensor(7)
    return state


def videomae_pretrain_state(seed: int = 2) -> dict[str, torch.Tensor]:
    """modeling_pretrain.py PretrainVisionTransformer (tiny): q/v biases, no [cls], no stored tables."""
    keys = [("encoder.patch_embed.proj.weight", (D, 3, TUB, P, P)), ("encoder.patch_embed.proj.bias", (D,))]
    keys += blocks("encoder.blocks.", DEPTH, D, HIDDEN, bias="qv") + [("encoder.norm.weight", (D,)),
                                                                    ("encoder.norm.bias", (D,))]
    keys += [("encoder_to_decoder.weight", (DD, D)), ("mask_token", (1, 1, DD))]
    keys += blocks("decoder.blocks.", DDEPTH, DD, DHIDDEN, bias="qv")
    keys += [("decoder.norm.weight", (DD,)), ("decoder.norm.bias", (DD,)),
             ("decoder.head.weight", (3 * TUB * P * P, DD)), ("decoder.head.bias", (3 * TUB * P * P,))]
    return fill(keys, seed)


def videomae_finetune_keys(d: int, depth: int, hidden: int, patch: int, heads: int, classes: int,
                           gamma: bool) -> list[tuple[str, tuple[int, ...]]]:
    """modeling_finetune.py VisionTransformer (use_mean_pooling: norm is Identity, fc_norm + head)."""
    keys = [("patch_embed.proj.weight", (d, 3, TUB, patch, patch)), ("patch_embed.proj.bias", (d,))]
    keys += blocks("blocks.", depth, d, hidden, bias="qv", gamma=gamma, heads=heads)
    return keys + [("fc_norm.weight", (d,)), ("fc_norm.bias", (d,)), ("head.weight", (classes, d)),
                   ("head.bias", (classes,))]


def simmim_pretrain_state(seed: int = 4) -> dict[str, torch.Tensor]:
    """SimMIM(VisionTransformerForSimMIM) with the official ViT recipe: no absolute table, one shared
    relative position table, q/v biases, layer scale, and the 1x1-conv decoder ``decoder.0``."""
    rows = (2 * 4 - 1) ** 2 + 3
    keys = [("encoder.cls_token", (1, 1, D)), ("encoder.mask_token", (1, 1, D)),
            ("encoder.patch_embed.proj.weight", (D, 3, P, P)), ("encoder.patch_embed.proj.bias", (D,)),
            ("encoder.rel_pos_bias.relative_position_bias_table", (rows, HEADS))]
    keys += blocks("encoder.blocks.", DEPTH, D, HIDDEN, bias="qv", gamma=True)
    keys += [("encoder.norm.weight", (D,)), ("encoder.norm.bias", (D,)), ("decoder.0.weight", (P * P * 3, D, 1, 1)),
             ("decoder.0.bias", (P * P * 3,))]
    state = fill(keys, seed)
    state["encoder.rel_pos_bias.relative_position_index"] = beit_relative_position_index(4, 4)
    return state


def omnimae_state(seed: int = 5, pretrain: bool = False) -> dict[str, torch.Tensor]:
    """omnimae/omni_mae_model.py OmniMAE(trunk, head) (tiny): fine-tuned, or pretraining with its decoder."""
    keys = [("trunk.patch_embed.proj.1.weight", (D, 3, TUB, P, P)), ("trunk.patch_embed.proj.1.bias", (D,))]
    keys += blocks("trunk.blocks.", DEPTH, D, HIDDEN) + [("trunk.norm.weight", (D,)), ("trunk.norm.bias", (D,))]
    if pretrain:
        keys += [("trunk.mask_token", (1, D)), ("trunk.decoder.decoder_embed.weight", (DD, D)),
                 ("trunk.decoder.decoder_embed.bias", (DD,)), ("trunk.decoder.norm.weight", (DD,)),
                 ("trunk.decoder.norm.bias", (DD,))] + blocks("trunk.decoder.decoder_blocks.", 1, DD, DHIDDEN)
        keys += [("head.weight", (3 * TUB * P * P, DD)), ("head.bias", (3 * TUB * P * P,))]
    else:
        keys += [("head.weight", (K, D)), ("head.bias", (K,))]
    state = fill(keys, seed)
    state["trunk.pos_embed"] = sinusoid_table(LV, D)  # learnable_pos_embed=False: a registered buffer
    if pretrain:
        state["trunk.decoder.pos_embed"] = sinusoid_table(LV, D)
    return state


# ------------------------------------------------------------------------ reference forward passes


def beit_relative_position_index(wh: int, ww: int) -> torch.Tensor:
    """SimMIM models/vision_transformer.py RelativePositionBias's index, written out."""
    coords = torch.stack(torch.meshgrid([torch.arange(wh), torch.arange(ww)], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    n = (2 * wh - 1) * (2 * ww - 1) + 3
    index = torch.zeros((wh * ww + 1,) * 2, dtype=torch.long)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:], index[0:, 0], index[0, 0] = n - 3, n - 2, n - 1
    return index


def ref_block(sd: dict[str, torch.Tensor], p: str, x: torch.Tensor, heads: int,
              rel_bias: torch.Tensor | None = None) -> torch.Tensor:
    """timm / BEiT / VideoMAE / omnivision Block.forward (eps 1e-6, exact GELU)."""
    b, n, d = x.shape
    bias = sd.get(f"{p}attn.qkv.bias")
    if f"{p}attn.q_bias" in sd:
        bias = torch.cat([sd[f"{p}attn.q_bias"], torch.zeros_like(sd[f"{p}attn.v_bias"]), sd[f"{p}attn.v_bias"]])
    h = F.layer_norm(x, (d,), sd[f"{p}norm1.weight"], sd[f"{p}norm1.bias"], 1e-6)
    q, k, v = F.linear(h, sd[f"{p}attn.qkv.weight"], bias).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    attn = (q * (d // heads) ** -0.5) @ k.transpose(-2, -1)
    if rel_bias is not None:
        attn = attn + rel_bias
    y = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    y = F.linear(y, sd[f"{p}attn.proj.weight"], sd[f"{p}attn.proj.bias"])
    x = x + (sd[f"{p}gamma_1"] * y if f"{p}gamma_1" in sd else y)
    h = F.layer_norm(x, (d,), sd[f"{p}norm2.weight"], sd[f"{p}norm2.bias"], 1e-6)
    y = F.linear(F.gelu(F.linear(h, sd[f"{p}mlp.fc1.weight"], sd[f"{p}mlp.fc1.bias"])), sd[f"{p}mlp.fc2.weight"],
                 sd[f"{p}mlp.fc2.bias"])
    return x + (sd[f"{p}gamma_2"] * y if f"{p}gamma_2" in sd else y)


def ref_video_logits(sd: dict[str, torch.Tensor], x: torch.Tensor, prefix: str = "", *, pool_norm: str = "fc_norm",
                     kernel: str = "patch_embed.proj") -> torch.Tensor:
    """VideoMAE modeling_finetune.py forward (and omnivision's global_pool + norm): Conv3d tubelets,
    the sinusoid table, blocks, mean, norm, head."""
    w = sd[f"{prefix}{kernel}.weight"]
    t = F.conv3d(x, w, sd[f"{prefix}{kernel}.bias"], stride=w.shape[2:]).flatten(2).transpose(1, 2)
    t = t + sinusoid_table(t.shape[1], t.shape[2])
    depth = len({k.split(".")[1 + prefix.count(".")] for k in sd if k.startswith(f"{prefix}blocks.")})
    for i in range(depth):
        t = ref_block(sd, f"{prefix}blocks.{i}.", t, HEADS)
    f = F.layer_norm(t.mean(1), (t.shape[2],), sd[f"{pool_norm}.weight"], sd[f"{pool_norm}.bias"], 1e-6)
    return F.linear(f, sd["head.weight"], sd["head.bias"])


def timm_vit(**kw: object) -> torch.nn.Module:
    return timm.create_model("vit_base_patch16_224", pretrained=False, img_size=IMG, patch_size=P, embed_dim=D,
                             depth=DEPTH, num_heads=HEADS, mlp_ratio=HIDDEN / D, **kw).eval()


def ours(name: str, **kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return mmmae.create_model(name, **{"size": "vit_tiny_test", "img_size": IMG, "patch_size": P, **kw}).eval()


def video_kw(**kw: object) -> dict[str, object]:
    return {"num_frames": FRAMES, "tubelet_size": TUB, "pos_embed": "sincos_1d", "cls_token": False, **kw}


def image(seed: int = 7, size: int = IMG) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def video(seed: int = 8) -> torch.Tensor:
    return torch.randn(2, 3, FRAMES, IMG, IMG, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------- MAE


def test_official_mae_pretraining_loads_every_key_and_round_trips(tmp_path: Path) -> None:
    state = mae_pretrain_state()
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": state, "epoch": 799}, path)  # released files nest the weights under "model"
    model = ours("mae")
    rep = weights.load(model, path)
    assert rep.layout == "mae" and rep.ok and not rep.ignored
    assert set(rep.fixed) == {"pos_embed", "decoder_pos_embed"}  # MAE's frozen sin-cos: the model rebuilds them
    own = model.state_dict()
    for k, v in state.items():  # models_mae.py names -> mmmae: encoder at the top, decoder_* and mask_token
        if k.endswith("pos_embed"):
            continue
        name = f"decoder.{k}" if k.startswith("decoder_") or k == "mask_token" else f"encoder.{k}"
        assert torch.equal(own[name], v), k
    # The encoder is timm's VisionTransformer (models_mae.py builds it from timm's Block / PatchEmbed).
    ref = timm_vit(num_classes=0)
    ref.load_state_dict({k: v for k, v in state.items() if not k.startswith(("decoder", "mask_token"))})
    with torch.no_grad():
        assert torch.allclose(model.encoder.forward_features(image()), ref.forward_features(image()), atol=1e-5)
    written = weights.export(model, "official", tmp_path / "out")
    back = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)["model"]
    assert written["layout"] == "facebookresearch/mae models_mae.py" and set(back) == set(state)
    for k in state:
        assert torch.allclose(back[k], state[k], atol=1e-6), k


def test_official_mae_finetuned_gives_the_timm_logits_and_resizes_its_table() -> None:
    state = mae_finetune_state()
    ref = timm_vit(num_classes=K, global_pool="avg", fc_norm=True)  # models_vit.py with global_pool=True
    ref.load_state_dict(state, strict=True)
    model = ours("classifier", num_classes=K, global_pool="avg")
    rep = weights.load(model, state)
    assert rep.layout == "vit" and rep.variant.startswith("mae_finetune") and rep.ok
    assert "encoder.cls_token" in rep.converted  # the table's trained [cls] row rides on the cls token
    with torch.no_grad():
        assert torch.allclose(model({"image": image()})["logits"], ref(image()), atol=1e-5)
    # At 48 px (6 x 6 tokens) the table is MAE's interpolate_pos_embed of the stored one.
    big = ours("classifier", num_classes=K, global_pool="avg", img_size=48)
    rep = weights.load(big, state)
    assert rep.interpolated["encoder.pos_embed"] == {"from_grid": [4, 4], "to_grid": [6, 6]}
    pos = state["pos_embed"][:, 1:].reshape(1, 4, 4, D).permute(0, 3, 1, 2)
    expected = F.interpolate(pos, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)
    assert torch.allclose(big.encoder.pos_embed.detach(), expected, atol=1e-6)


def test_official_mae_linear_probe_head_is_batchnorm_then_linear(tmp_path: Path) -> None:
    state = mae_finetune_state(linprobe=True)
    model = ours("classifier", num_classes=K, global_pool="token", linear_probe=True)
    rep = weights.load(model, state)
    assert rep.variant.startswith("mae_linprobe") and rep.ok
    enc = timm_vit(num_classes=0)
    enc.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")})
    with torch.no_grad():
        f = enc(image())  # [cls] after the final norm
        bn = (f - state["head.0.running_mean"]) / torch.sqrt(state["head.0.running_var"] + 1e-6)
        assert torch.allclose(model({"image": image()})["logits"], F.linear(bn, state["head.1.weight"],
                                                                             state["head.1.bias"]), atol=1e-5)
    weights.export(model, "official", tmp_path)
    back = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["model"]
    assert {"head.0.running_mean", "head.0.running_var", "head.0.num_batches_tracked", "head.1.weight"} <= set(back)


def test_timm_vit_in_and_out_equal_features(tmp_path: Path) -> None:
    torch.manual_seed(3)
    ref = timm_vit(num_classes=0)  # vit_base_patch16_224.mae's layout: [cls] + final norm, no head
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model = ours("mae")
    # A learned table cannot go into MAE's fixed one; timm's .mae weights carry MAE's sin-cos table.
    with pytest.raises(weights.WeightsError, match="pos_embed: a learned position table"):
        weights.load(model, ref.state_dict(), part="encoder")
    with torch.no_grad():
        ref.pos_embed.copy_(mae_2d_sincos(D, IMG // P, cls_token=True))
    rep = weights.load(model, ref.state_dict(), part="encoder")
    assert rep.layout == "vit" and rep.ok and rep.initialised[0].startswith("decoder.")
    with torch.no_grad():
        assert torch.allclose(model.encoder.forward_features(image()), ref.forward_features(image()), atol=1e-5)
    # Out: timm loads the export strictly through its own pretrained-file path.
    spec = weights.export(model, "timm", tmp_path, part="encoder")
    kw = spec["kwargs"]
    back = timm.create_model(spec["architecture"], pretrained=True,
                             pretrained_cfg_overlay={"file": str(tmp_path / "model.safetensors"), "num_classes": 0},
                             **kw).eval()
    with torch.no_grad():
        assert torch.allclose(back.forward_features(image()), model.encoder.forward_features(image()), atol=1e-5)


def test_timm_export_of_a_mean_pooled_classifier_with_layer_scale(tmp_path: Path) -> None:
    model = ours("classifier", num_classes=K, global_pool="avg", init_values=0.1)
    rep = weights.load(model, mae_finetune_state(), strict=False)  # MAE has no layer scale: gammas stay at init
    assert rep.missing == [f"encoder.blocks.{i}.ls{j}.gamma" for i in range(DEPTH) for j in (1, 2)]
    spec = weights.export(model, "timm", tmp_path)
    assert spec["kwargs"]["fc_norm"] and spec["kwargs"]["num_classes"] == K
    back = timm.create_model(spec["architecture"], pretrained=True,
                             pretrained_cfg_overlay={"file": str(tmp_path / "model.safetensors"), "num_classes": K},
                             **spec["kwargs"]).eval()
    with torch.no_grad():
        assert torch.allclose(back(image()), model({"image": image()})["logits"], atol=1e-5)


# -------------------------------------------------------------------------------------- videos


def test_official_videomae_pretraining_in_wrappers_and_back(tmp_path: Path) -> None:
    state = videomae_pretrain_state()
    torch.save({"module": state}, tmp_path / "checkpoint.pth")  # VideoMAEv2 --model_key model|module
    model = ours("videomae", **video_kw(qkv_bias="qv"))
    rep = weights.load(model, tmp_path / "checkpoint.pth")
    assert rep.layout == "videomae" and rep.ok
    own = model.state_dict()
    assert torch.equal(own["decoder.decoder_embed.weight"], state["encoder_to_decoder.weight"])
    assert torch.equal(own["decoder.decoder_pred.weight"], state["decoder.head.weight"])
    assert torch.equal(own["decoder.decoder_blocks.0.attn.q_bias"], state["decoder.blocks.0.attn.q_bias"])
    weights.export(model, "official", tmp_path / "out")
    back = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)["model"]
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("gamma", [False, True], ids=["videomae", "videomaev2_layer_scale"])
def test_official_videomae_finetuned_gives_the_reference_logits(gamma: bool, tmp_path: Path) -> None:
    state = fill(videomae_finetune_keys(D, DEPTH, HIDDEN, P, HEADS, K, gamma), seed=6)
    model = ours("classifier", num_classes=K, global_pool="avg", qkv_bias="qv",
                 init_values=0.1 if gamma else 0.0, **video_kw())
    rep = weights.load(model, {"model": state})
    assert rep.variant.startswith("videomae_finetune") and rep.ok
    with torch.no_grad():
        assert torch.allclose(model({"video": video()})["logits"], ref_video_logits(state, video()), atol=1e-5)
    weights.export(model, "official", tmp_path)
    back = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["model"]
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_videomaev2_giant_key_list_matches_mmmaes_vit_g() -> None:
    """vit_giant_patch14_224: embed 1408, depth 40, 16 heads, mlp_ratio 48/11 (hidden int(1408*48/11) = 6144),
    patch 14, fine-tuned on 16 frames (Kinetics-710: 710 classes), against the vit_giant preset. Shapes only
    (meta tensors)."""
    keys = videomae_finetune_keys(1408, 40, 6144, 14, 16, 710, gamma=False)
    state = {k: torch.empty(s, device="meta") for k, s in keys}
    conv = weights.convert(state)
    cfg = mmmae.registry.resolve_model_cfg("classifier", "vit_giant", img_size=224, num_classes=710, qkv_bias="qv",
                                           **video_kw(num_frames=16))
    model = mmmae.registry.build_from_cfg("classifier", cfg, device="meta")
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert own == {k: tuple(v.shape) for k, v in conv.state.items()}
    assert own["encoder.blocks.39.mlp.fc1.weight"] == (6144, 1408)


def test_omnimae_finetuned_gives_the_reference_logits() -> None:
    state = omnimae_state()
    model = ours("classifier", num_classes=K, global_pool="avg", qkv_bias="qkv", **video_kw())
    rep = weights.load(model, state)
    assert rep.variant == "omnimae_finetune" and rep.ok and rep.fixed == ["trunk.pos_embed"]
    with torch.no_grad():
        ref = ref_video_logits(state, video(), "trunk.", pool_norm="trunk.norm", kernel="patch_embed.proj.1")
        assert torch.allclose(model({"video": video()})["logits"], ref, atol=1e-5)


def test_omnimae_pretraining_gives_its_encoder_and_names_the_decoder() -> None:
    state = omnimae_state(pretrain=True)
    model = ours("omnimae", **video_kw())
    with pytest.raises(weights.WeightsError, match="omnivision's MAE decoder"):
        weights.load(model, state)
    rep = weights.load(model, state, part="encoder")
    assert rep.ok and "trunk.decoder.decoder_embed.weight" in rep.ignored and "encoder.mask_token" in rep.ignored
    assert torch.equal(model.encoder.blocks[1].attn.qkv.bias, state["trunk.blocks.1.attn.qkv.bias"])


# ---------------------------------------------------------------------------------------- SimMIM


def test_simmim_pretraining_loads_and_expands_its_shared_table() -> None:
    state = simmim_pretrain_state()
    model = ours("simmim", mask_patch_size=16)
    rep = weights.load(model, {"model": state})
    assert rep.layout == "simmim" and rep.ok
    assert rep.fixed == ["encoder.rel_pos_bias.relative_position_index"]
    assert torch.equal(model.encoder.blocks[0].ls1.gamma, state["encoder.blocks.0.gamma_1"])
    assert torch.equal(model.decoder.proj.weight, state["decoder.0.weight"])
    # SimMIM's encoder forward (VisionTransformerForSimMIM without a mask) against ours.
    x = image()
    sd = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=P).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(2, -1, -1), t], dim=1)
    index = sd["rel_pos_bias.relative_position_index"]
    rel = sd["rel_pos_bias.relative_position_bias_table"][index.view(-1)].view(1 + L, 1 + L, -1).permute(2, 0, 1)
    for i in range(DEPTH):
        t = ref_block(sd, f"blocks.{i}.", t, HEADS, rel_bias=rel)
    t = F.layer_norm(t, (D,), sd["norm.weight"], sd["norm.bias"], 1e-6)
    with torch.no_grad():
        assert torch.allclose(model.encoder.forward_features(x), t, atol=1e-5)
    # Fine-tuning with per-block tables: the shared one is copied into every block (remap_pretrained_keys_vit).
    clf = ours("classifier", num_classes=K, rel_pos_bias="block", pos_embed="none", qkv_bias="qv", init_values=0.1)
    rep = weights.load(clf, state, part="auto")
    assert rep.part == "encoder" and rep.ok
    for blk in clf.encoder.blocks:
        assert torch.equal(blk.attn.relative_position_bias_table, sd["rel_pos_bias.relative_position_bias_table"])


def test_simmim_finetuned_vit_with_block_tables_gives_the_reference_logits() -> None:
    """SimMIM's fine-tuning ViT (USE_RPB: one table per block, USE_MEAN_POOLING: fc_norm, no absolute
    table), stored without the SimMIM wrapper's ``encoder.`` prefix."""
    rows = (2 * 4 - 1) ** 2 + 3
    keys = [("cls_token", (1, 1, D)), ("patch_embed.proj.weight", (D, 3, P, P)), ("patch_embed.proj.bias", (D,))]
    keys += blocks("blocks.", DEPTH, D, HIDDEN, bias="qv", gamma=True, table_rows=rows)
    keys += [("fc_norm.weight", (D,)), ("fc_norm.bias", (D,)), ("head.weight", (K, D)), ("head.bias", (K,))]
    state = fill(keys, seed=9)
    for i in range(DEPTH):
        state[f"blocks.{i}.attn.relative_position_index"] = beit_relative_position_index(4, 4)
    model = ours("classifier", num_classes=K, rel_pos_bias="block", pos_embed="none", qkv_bias="qv", init_values=0.1)
    rep = weights.load(model, state)
    assert rep.variant.startswith("beit_finetune") and rep.ok and len(rep.fixed) == DEPTH
    x = image()
    t = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=P).flatten(2).transpose(1, 2)
    t = torch.cat([state["cls_token"].expand(2, -1, -1), t], dim=1)
    for i in range(DEPTH):
        table, index = state[f"blocks.{i}.attn.relative_position_bias_table"], beit_relative_position_index(4, 4)
        rel = table[index.view(-1)].view(1 + L, 1 + L, -1).permute(2, 0, 1)
        t = ref_block(state, f"blocks.{i}.", t, HEADS, rel_bias=rel)
    ref = F.linear(F.layer_norm(t[:, 1:].mean(1), (D,), state["fc_norm.weight"], state["fc_norm.bias"], 1e-6),
                   state["head.weight"], state["head.bias"])
    with torch.no_grad():
        assert torch.allclose(model({"image": x})["logits"], ref, atol=1e-5)


def sin_table(window: int, heads: int = HEADS) -> torch.Tensor:
    """A fixed relative position table of a window x window grid: sin(0.7 k), k = 0, 1, ... row-major."""
    rows = (2 * window - 1) ** 2 + 3
    return torch.sin(torch.arange(rows * heads, dtype=torch.float64) * 0.7).reshape(rows, heads).float()


# microsoft/SimMIM utils.py remap_pretrained_keys_vit, run as written (scipy 1.13.1's interp2d, kind="cubic")
# on sin_table(src, 2) resized to a dst x dst grid: q, the outermost source offset, and rows of the new
# table by (dy, dx), i.e. row (dy + dst - 1) * (2 dst - 1) + (dx + dst - 1).
REF_REL_POS = {
    (7, 10): (1.1609931755065919, 9.0000038, {(0, 0): (-0.9780883, -0.8822032), (1, 0): (-0.6529826, -0.9873416),
                                              (4, -7): (1.0111843, 0.7928605), (-9, 9): (-0.8875660, -0.9756281),
                                              (9, 9): (0.4072599, -0.2768832), (2, 3): (0.6344090, 0.9741947),
                                              (-5, -1): (-0.5734786, 0.0890797)}),
    # 1 + q + q^2 = 5 has q = 1.56 > 1.5: q stays at the bracket's edge and the target offsets +-5 lie past
    # the outermost source offset +-4.75, where interp2d clamps to the edge.
    (4, 6): (1.49999906539917, 4.7499962, {(5, 5): (-0.9413315, -0.9373828), (-5, 0): (-0.8715758, -0.9824526),
                                           (4, -3): (-2.0035734, -0.3310184), (0, 2): (-1.0136323, -0.9225791)}),
}


def test_relative_position_table_resize_is_simmims_geometric_bicubic() -> None:
    from mmmae.weights.relpos import geometric_ratio, interpolate_rel_pos_table, source_offsets
    # 224 -> 384 px at patch 16 (14x14 -> 24x24 grid): the ratio the reference's comment names, 1.090307.
    assert geometric_ratio(27, 47) == pytest.approx(1.0903074455261228, abs=1e-12)
    for (src, dst), (q, outer, rows) in REF_REL_POS.items():
        assert geometric_ratio(2 * src - 1, 2 * dst - 1) == pytest.approx(q, abs=1e-12)
        offsets = source_offsets(2 * src - 1, q)
        assert offsets[src - 1] == 0 and offsets[src] == 1 and float(offsets[-1]) == pytest.approx(outer, abs=1e-6)
        table = sin_table(src)
        new = interpolate_rel_pos_table(table, dst)
        assert new.shape == ((2 * dst - 1) ** 2 + 3, HEADS) and new.dtype == torch.float32
        assert torch.equal(new[-3:], table[-3:])  # the [cls] rows are kept
        for (dy, dx), values in rows.items():
            row = (dy + dst - 1) * (2 * dst - 1) + dx + dst - 1
            assert new[row].tolist() == pytest.approx(values, abs=2e-7), (src, dst, dy, dx)
    with pytest.raises(ValueError, match="at least a 3x3 grid"):
        interpolate_rel_pos_table(sin_table(2), 4)  # FITPACK's bicubic spline needs 4 nodes per axis


def test_simmim_tables_load_at_another_grid() -> None:
    """A 4x4-grid checkpoint (32 px, patch 8) fine-tuned at 48 px (6x6): per-block tables (SimMIM /
    BEiT fine-tuned) and the shared pretraining table (copied into every block first) are resized."""
    rows = (2 * 4 - 1) ** 2 + 3
    keys = [("cls_token", (1, 1, D)), ("patch_embed.proj.weight", (D, 3, P, P)), ("patch_embed.proj.bias", (D,))]
    keys += blocks("blocks.", DEPTH, D, HIDDEN, bias="qv", gamma=True, table_rows=rows)
    keys += [("fc_norm.weight", (D,)), ("fc_norm.bias", (D,)), ("head.weight", (K, D)), ("head.bias", (K,))]
    finetuned = fill(keys, seed=9)
    pretrain = simmim_pretrain_state()
    for i in range(DEPTH):
        finetuned[f"blocks.{i}.attn.relative_position_bias_table"] = sin_table(4)
        finetuned[f"blocks.{i}.attn.relative_position_index"] = beit_relative_position_index(4, 4)
    pretrain["encoder.rel_pos_bias.relative_position_bias_table"] = sin_table(4)
    _, _, figures = REF_REL_POS[(4, 6)]
    for state, part in ((finetuned, "all"), (pretrain, "auto")):
        model = ours("classifier", img_size=48, num_classes=K, rel_pos_bias="block", pos_embed="none",
                     qkv_bias="qv", init_values=0.1)
        rep = weights.load(model, state, part=part)
        assert rep.ok
        for i, blk in enumerate(model.encoder.blocks):
            key = f"encoder.blocks.{i}.attn.relative_position_bias_table"
            assert rep.interpolated[key] == {"from_grid": [4, 4], "to_grid": [6, 6]}
            table = blk.attn.relative_position_bias_table.detach()
            for (dy, dx), values in figures.items():
                assert table[(dy + 5) * 11 + dx + 5].tolist() == pytest.approx(values, abs=2e-7)
            assert blk.attn.relative_position_index.shape == (37, 37)  # rebuilt for [cls] + 6x6
        with torch.no_grad():
            assert torch.isfinite(model({"image": image(size=48)})["logits"]).all()
    small = ours("classifier", img_size=16, num_classes=K, rel_pos_bias="block", pos_embed="none", qkv_bias="qv",
                 init_values=0.1)
    with pytest.raises(weights.WeightsError, match=r"blocks\.0\.attn\.relative_position_bias_table"):
        weights.load(ours("classifier", num_classes=K, rel_pos_bias="block", pos_embed="none", qkv_bias="qv",
                          init_values=0.1), {k: v for k, v in small.state_dict().items()})


# ---------------------------------------------------------------------- mmmae runs and DeepSpeed


def test_run_directory_and_file_types(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    src = ours("mae")
    run = tmp_path / "run"
    run.mkdir()
    save_file(src.state_dict(), str(run / "model.safetensors"))
    torch.save(src.state_dict(), tmp_path / "weights.bin")
    for where in (run, run / "model.safetensors", tmp_path / "weights.bin"):
        dst = mmmae.create_model("mae", size="vit_tiny_test", img_size=IMG, patch_size=P)
        rep = weights.load(dst, where)
        assert rep.layout == "mmmae" and rep.ok and len(rep.loaded) == len(src.state_dict())
        assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())


@pytest.mark.parametrize("stage", [0, 3])
def test_deepspeed_checkpoint_folders(stage: int, tmp_path: Path, dist_group: None) -> None:
    import deepspeed
    src = ours("mae")
    ref = {k: v.clone() for k, v in src.state_dict().items()}
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
           "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=src, optimizer=torch.optim.AdamW(src.parameters()), config=cfg)
    engine.save_checkpoint(str(tmp_path / "checkpoints"), tag="step_00000001", save_latest=False)
    (tmp_path / "checkpoints" / "step_00000001" / "COMPLETE").write_text("{}")  # published, as the trainer does
    dst = mmmae.create_model("mae", size="vit_tiny_test", img_size=IMG, patch_size=P)
    rep = weights.load(dst, tmp_path)  # the run folder: its newest complete checkpoint
    assert rep.ok and rep.source.endswith("step_00000001")
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in ref.items())


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_1_and_2_folders_give_the_fp32_master_weights(stage: int, tmp_path: Path,
                                                                     dist_group: None) -> None:
    """ZeRO-1/2 in DeepSpeed's bf16 mode, after one step: the folder's module file holds bf16 weights, the
    fp32 masters live in the optimizer partitions (bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt); the
    load gives the masters, as DeepSpeed's own safe_get_full_fp32_param reads them from the live engine."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    src = ours("mae")
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}, "bf16": {"enabled": True},
           "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=src, optimizer=torch.optim.AdamW(src.parameters(), lr=1e-3),
                                      config=cfg)
    engine.backward(engine({"image": image().bfloat16()})["loss"])
    engine.step()
    masters = {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}
    folder = tmp_path / "checkpoints" / "step_00000001"
    engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)
    (folder / "COMPLETE").write_text("{}")
    assert (folder / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    module = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    qkv = "encoder.blocks.0.attn.qkv.weight"
    assert module[qkv].dtype == torch.bfloat16 and not torch.equal(module[qkv].float(), masters[qkv])
    for where in (folder, tmp_path):
        dst = mmmae.create_model("mae", size="vit_tiny_test", img_size=IMG, patch_size=P)
        rep = weights.load(dst, where)
        assert rep.ok and rep.layout == "mmmae" and rep.source.endswith("step_00000001")
        got = dst.state_dict()
        assert all(got[k].dtype == torch.float32 and torch.equal(got[k], v) for k, v in masters.items())


# --------------------------------------------------------------------------- init_from and errors


def test_init_from_an_official_mae_file_is_strict(tmp_path: Path) -> None:
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": mae_pretrain_state()}, path)
    report = load_init_weights(ours("mae"), str(path))
    assert report["missing"] == [] and report["unexpected"] == [] and report["layout"] == "mae"
    json.dumps(report)
    # A fine-tuned file has no decoder: an MAE pretraining run refuses it unless told otherwise.
    torch.save({"model": mae_finetune_state()}, path)
    with pytest.raises(weights.WeightsError, match=r"decoder\.decoder_embed\.weight.*init_strict=false"):
        load_init_weights(ours("mae"), str(path))
    # Its encoder has no final norm (fc_norm instead) and a learned table: not an MAE encoder either.
    with pytest.raises(weights.WeightsError, match=r"encoder\.norm\.weight.*pos_embed: a learned position table"):
        load_init_weights(ours("mae"), str(path), part="encoder")
    report = load_init_weights(ours("mae"), str(path), strict=False)
    assert {"decoder.mask_token", "encoder.norm.weight"} <= set(report["missing"])
    assert {"pos_embed", "fc_norm.weight", "head.weight"} <= set(report["unexpected"])
    assert len(report["loaded"]) == DEPTH * 12 + 3  # 12 tensors a block, the cls token and patch embedding
    with pytest.raises(ValueError, match="init_part must be one of"):
        load_init_weights(ours("mae"), str(path), part="head")


def test_a_classifier_drops_a_head_of_another_size_as_mae_main_finetune() -> None:
    model = ours("classifier", num_classes=3, global_pool="avg")
    rep = weights.load(model, mae_finetune_state(), part="auto")
    assert rep.part == "encoder" and rep.ok and "dropped" in rep.ignored["head.weight"]


def test_errors_name_the_file_and_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        weights.load(ours("mae"), tmp_path / "nope.pth")
    with pytest.raises(ValueError, match=r"no known weight layout.*hf_vit.*First keys seen: \['foo.weight'\]"):
        weights.load(ours("mae"), {"foo.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="unknown layout 'maee'"):
        weights.load(ours("mae"), mae_pretrain_state(), layout="maee")
    path = tmp_path / "big.pth"
    torch.save(mae_pretrain_state(), path)
    with pytest.raises(weights.WeightsError, match=r"big\.pth.*wrong shape.*checkpoint \(32, 3, 8, 8\) vs model "
                                                   r"\(32, 3, 16, 16\)"):
        weights.load(ours("mae", img_size=64, patch_size=16), path)
    (tmp_path / "x.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown checkpoint file type '.npz'"):
        weights.load(ours("mae"), tmp_path / "x.npz")


def test_convert_tool_writes_and_reports_errors(tmp_path: Path) -> None:
    src = tmp_path / "mae.pth"
    torch.save({"model": mae_pretrain_state()}, src)
    args = [sys.executable, str(ROOT / "tools" / "convert.py"), "--config", "image_mae_tiny.yaml",
            "model.img_size=32", "model.patch_size=8"]
    ok = subprocess.run([*args, "--checkpoint", str(src), "--to", "official", "--out", str(tmp_path / "o")],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    back = torch.load(tmp_path / "o" / "checkpoint.pth", weights_only=True)["model"]
    assert torch.equal(back["blocks.1.attn.qkv.weight"], mae_pretrain_state()["blocks.1.attn.qkv.weight"])
    bad = subprocess.run([*args, "model.patch_size=4", "--checkpoint", str(src), "--to", "hf", "--out",
                          str(tmp_path / "h")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "mae.pth" in bad.stderr and "wrong shape" in bad.stderr
    bad = subprocess.run([*args, "--checkpoint", str(src), "--to", "onnx", "--out", str(tmp_path / "h")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice: 'onnx'" in bad.stderr


def test_layer_scale_folds_exactly_into_the_official_mae_layout() -> None:
    model = ours("classifier", num_classes=K, global_pool="avg", init_values=0.1)
    weights.load(model, mae_finetune_state(), strict=False)
    with torch.no_grad():
        for blk in model.encoder.blocks:
            blk.ls1.gamma.uniform_(0.5, 1.5)
            blk.ls2.gamma.uniform_(0.5, 1.5)
    state, layout = official_state(model)
    assert layout == "facebookresearch/mae models_vit.py" and not any("gamma" in k or ".ls" in k for k in state)
    ref = timm_vit(num_classes=K, global_pool="avg", fc_norm=True)  # models_vit.py has no layer scale
    ref.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.allclose(ref(image()), model({"image": image()})["logits"], atol=1e-5)
