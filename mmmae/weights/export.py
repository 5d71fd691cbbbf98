"""mmmae models out: a Hugging Face directory, a timm state dict, or the official repositories' layouts.

- ``to_hf``: ``config.json`` + ``model.safetensors`` that transformers loads with ``from_pretrained``
  (no missing or unexpected keys): image ``ViTMAEForPreTraining`` (an MAE), ``ViTModel`` (any image
  encoder with [cls] and a final norm; load it with ``add_pooling_layer=False``: mmmae has no pooler),
  ``ViTForImageClassification`` (a [cls]-pooled classifier); video ``VideoMAEForPreTraining`` (a
  VideoMAE), ``VideoMAEModel``, ``VideoMAEForVideoClassification`` (a mean-pooled classifier).
  transformers 5 names: ViT / ViTMAE ``layers.N.attention.{q,k,v,o}_proj``; VideoMAE keeps
  ``encoder.layer.N.attention.attention.{query,key,value}`` and its q/v biases as the query / value
  biases (the key has none), so a k bias must be zero.
- ``to_timm``: ``model.safetensors`` in timm's VisionTransformer names (``timm_config.json`` holds the
  ``timm.create_model`` arguments), image encoders and classifiers.
- ``to_official``: ``checkpoint.pth`` as ``{"model": state}`` in facebookresearch/mae (pretraining
  models_mae.py; fine-tuned models_vit.py; linear probe main_linprobe.py) or MCG-NJU/VideoMAE
  (modeling_pretrain.py / modeling_finetune.py) names.

Layer scale (``init_values``), which the Hugging Face ViT classes and the official MAE do not have, is
folded exactly into the branch's output projection (``gamma * (W x + b) = (gamma W) x + gamma b``).
Known difference: transformers builds VideoMAE's ``fc_norm`` and decoder norm with LayerNorm's
default eps 1e-5 (the reference's and mmmae's are 1e-6), which config.json cannot change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


FORMATS = ("hf", "timm", "official")
HF_CLASSES = ("ViTMAEForPreTraining", "ViTModel", "ViTForImageClassification", "VideoMAEForPreTraining",
              "VideoMAEModel", "VideoMAEForVideoClassification")


class ExportError(ValueError):
    """A model that the requested format cannot hold, with the reason."""


@dataclass
class EncoderInfo:
    is_video: bool
    img_size: int
    patch_size: int
    num_frames: int
    tubelet_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    cls_token: bool
    final_norm: bool
    rel_pos_bias: bool
    layer_scale: bool
    pos_kind: str


def encoder_info(model: nn.Module) -> EncoderInfo:
    enc = getattr(model, "encoder", None)
    if enc is None or not hasattr(enc, "patch_embed"):
        raise ExportError(f"{type(model).__name__} has no vision encoder to export")
    pe = enc.patch_embed
    if pe.img_size[0] != pe.img_size[1] or pe.patch_size[0] != pe.patch_size[1]:
        raise ExportError(f"only square images and patches export, got {pe.img_size} / {pe.patch_size}")
    blk = enc.blocks[0]
    return EncoderInfo(
        is_video=bool(enc.is_video), img_size=pe.img_size[0], patch_size=pe.patch_size[0],
        num_frames=getattr(pe, "num_frames", 0), tubelet_size=getattr(pe, "tubelet_size", 1),
        in_chans=pe.in_chans, embed_dim=enc.embed_dim, depth=len(enc.blocks), num_heads=blk.attn.num_heads,
        mlp_hidden=blk.mlp.fc1.out_features, cls_token=enc.cls_token is not None,
        final_norm=not isinstance(enc.norm, nn.Identity),
        rel_pos_bias=enc.rel_pos_grid is not None, layer_scale=not isinstance(blk.ls1, nn.Identity),
        pos_kind=str(getattr(getattr(model, "cfg", None), "pos_embed", "sincos")) if enc.pos_embed is not None else "none")


def model_kind(model: nn.Module) -> str:
    """``mae`` / ``videomae`` (an MAE decoder on an image / video encoder), ``classifier`` or
    ``encoder`` (anything else: only its encoder exports)."""
    from mmmae.decoder import MAEDecoder
    from mmmae.heads import Classifier
    if isinstance(model, Classifier):
        return "classifier"
    if isinstance(getattr(model, "decoder", None), MAEDecoder):
        return "videomae" if model.encoder.is_video else "mae"
    return "encoder"


# ----------------------------------------------------------------------------------- block pieces


def _qkv_bias(st: dict[str, torch.Tensor], p: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    if f"{p}attn.qkv.bias" in st:
        q, k, v = st[f"{p}attn.qkv.bias"].chunk(3)
        return q, k, v
    if f"{p}attn.q_bias" in st:
        q = st[f"{p}attn.q_bias"]
        return q, torch.zeros_like(q), st[f"{p}attn.v_bias"]
    return None


def _block(st: dict[str, torch.Tensor], p: str, *, fold_ls: bool) -> dict[str, torch.Tensor | None]:
    """One mmmae block's tensors by role; with ``fold_ls`` the layer scales are multiplied into
    attn.proj and mlp.fc2 (exact)."""
    w = st[f"{p}attn.qkv.weight"]
    d = w.shape[1]
    bias = _qkv_bias(st, p)
    out: dict[str, torch.Tensor | None] = {
        "norm1.weight": st[f"{p}norm1.weight"], "norm1.bias": st[f"{p}norm1.bias"],
        "q.weight": w[:d], "k.weight": w[d:2 * d], "v.weight": w[2 * d:],
        "q.bias": bias[0] if bias else None, "k.bias": bias[1] if bias else None, "v.bias": bias[2] if bias else None,
        "proj.weight": st[f"{p}attn.proj.weight"], "proj.bias": st[f"{p}attn.proj.bias"],
        "norm2.weight": st[f"{p}norm2.weight"], "norm2.bias": st[f"{p}norm2.bias"],
        "fc1.weight": st[f"{p}mlp.fc1.weight"], "fc1.bias": st[f"{p}mlp.fc1.bias"],
        "fc2.weight": st[f"{p}mlp.fc2.weight"], "fc2.bias": st[f"{p}mlp.fc2.bias"],
        "gamma1": st.get(f"{p}ls1.gamma"), "gamma2": st.get(f"{p}ls2.gamma")}
    if fold_ls:
        for g, lin in (("gamma1", "proj"), ("gamma2", "fc2")):
            gamma = out.pop(g)
            if gamma is not None:
                out[f"{lin}.weight"] = gamma[:, None] * out[f"{lin}.weight"]
                out[f"{lin}.bias"] = gamma * out[f"{lin}.bias"]
    return out


def _k_bias_zero(b: dict[str, torch.Tensor | None], where: str) -> None:
    if b["k.bias"] is not None and bool(b["k.bias"].abs().max() > 0):
        raise ExportError(f"{where}: the attention has a non-zero k bias; this layout keeps q and v biases only "
                          f"(VideoMAE's q_bias / v_bias)")


def _timm_block(b: dict[str, torch.Tensor | None], p: str, *, qv: bool = False, gamma: str = "ls") -> dict[str, torch.Tensor]:
    """timm / official names; ``qv``: q_bias / v_bias (VideoMAE, BEiT) instead of a fused qkv bias;
    ``gamma``: ``ls`` (timm ls1.gamma) or ``gamma`` (VideoMAE gamma_1)."""
    out = {f"{p}norm1.weight": b["norm1.weight"], f"{p}norm1.bias": b["norm1.bias"],
           f"{p}attn.qkv.weight": torch.cat([b["q.weight"], b["k.weight"], b["v.weight"]]),
           f"{p}attn.proj.weight": b["proj.weight"], f"{p}attn.proj.bias": b["proj.bias"],
           f"{p}norm2.weight": b["norm2.weight"], f"{p}norm2.bias": b["norm2.bias"],
           f"{p}mlp.fc1.weight": b["fc1.weight"], f"{p}mlp.fc1.bias": b["fc1.bias"],
           f"{p}mlp.fc2.weight": b["fc2.weight"], f"{p}mlp.fc2.bias": b["fc2.bias"]}
    if b["q.bias"] is not None:
        if qv:
            _k_bias_zero(b, p)
            out[f"{p}attn.q_bias"], out[f"{p}attn.v_bias"] = b["q.bias"], b["v.bias"]
        else:
            out[f"{p}attn.qkv.bias"] = torch.cat([b["q.bias"], b["k.bias"], b["v.bias"]])
    for i, g in ((1, b.get("gamma1")), (2, b.get("gamma2"))):
        if g is not None:
            out[f"{p}ls{i}.gamma" if gamma == "ls" else f"{p}gamma_{i}"] = g
    return out  # type: ignore[return-value]


def _hf_vit_block(b: dict[str, torch.Tensor | None], p: str) -> dict[str, torch.Tensor]:
    out = {f"{p}layernorm_before.weight": b["norm1.weight"], f"{p}layernorm_before.bias": b["norm1.bias"],
           f"{p}layernorm_after.weight": b["norm2.weight"], f"{p}layernorm_after.bias": b["norm2.bias"],
           f"{p}attention.o_proj.weight": b["proj.weight"], f"{p}attention.o_proj.bias": b["proj.bias"],
           f"{p}mlp.fc1.weight": b["fc1.weight"], f"{p}mlp.fc1.bias": b["fc1.bias"],
           f"{p}mlp.fc2.weight": b["fc2.weight"], f"{p}mlp.fc2.bias": b["fc2.bias"]}
    for r in "qkv":
        out[f"{p}attention.{r}_proj.weight"] = b[f"{r}.weight"]
        if b["q.bias"] is not None:
            out[f"{p}attention.{r}_proj.bias"] = b[f"{r}.bias"]
    return out  # type: ignore[return-value]


def _hf_videomae_block(b: dict[str, torch.Tensor | None], p: str) -> dict[str, torch.Tensor]:
    out = {f"{p}layernorm_before.weight": b["norm1.weight"], f"{p}layernorm_before.bias": b["norm1.bias"],
           f"{p}layernorm_after.weight": b["norm2.weight"], f"{p}layernorm_after.bias": b["norm2.bias"],
           f"{p}attention.output.dense.weight": b["proj.weight"], f"{p}attention.output.dense.bias": b["proj.bias"],
           f"{p}intermediate.dense.weight": b["fc1.weight"], f"{p}intermediate.dense.bias": b["fc1.bias"],
           f"{p}output.dense.weight": b["fc2.weight"], f"{p}output.dense.bias": b["fc2.bias"]}
    for r, name in (("q", "query"), ("k", "key"), ("v", "value")):
        out[f"{p}attention.attention.{name}.weight"] = b[f"{r}.weight"]
    if b["q.bias"] is not None:
        _k_bias_zero(b, p)
        out[f"{p}attention.attention.query.bias"] = b["q.bias"]
        out[f"{p}attention.attention.value.bias"] = b["v.bias"]
    return out  # type: ignore[return-value]


# -------------------------------------------------------------------------------------- tables


def _encoder_table(model: nn.Module, info: EncoderInfo) -> torch.Tensor:
    """The encoder's table as timm / HF / MAE store it: (1, [1+]L, D), a zero [cls] row first (mmmae adds
    no position to [cls], i.e. MAE's zero row)."""
    table = model.encoder.pos_embed.detach().reshape(1, -1, info.embed_dim).float()
    if info.cls_token:
        table = torch.cat([table.new_zeros(1, 1, info.embed_dim), table], dim=1)
    return table


def _require(cond: bool, why: str) -> None:
    if not cond:
        raise ExportError(why)


def _check_encoder(info: EncoderInfo, fmt: str) -> None:
    _require(not info.rel_pos_bias, f"{fmt}: a relative position bias (SimMIM / BEiT trunk) has no counterpart in "
                                    f"the ViT classes this exports to")
    _require(info.pos_kind != "none", f"{fmt}: the encoder has no absolute position table")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------- timm


_TIMM_NAMES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base", (1024, 24, 16): "large",
               (1280, 32, 16): "huge"}


def timm_state(model: nn.Module, part: str = "all") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict in timm VisionTransformer names, ``timm.create_model`` name + kwargs)."""
    info = encoder_info(model)
    _require(not info.is_video, "timm: timm's VisionTransformer is an image model; export a video model with --to hf "
                                "(VideoMAE classes) or official")
    _check_encoder(info, "timm")
    st, kind = _state(model), model_kind(model)
    with_head = part == "all" and kind == "classifier"
    out: dict[str, torch.Tensor] = {"pos_embed": _encoder_table(model, info),
                                    "patch_embed.proj.weight": st["encoder.patch_embed.proj.weight"],
                                    "patch_embed.proj.bias": st["encoder.patch_embed.proj.bias"]}
    if info.cls_token:
        out["cls_token"] = st["encoder.cls_token"]
    for i in range(info.depth):
        out.update(_timm_block(_block(st, f"encoder.blocks.{i}.", fold_ls=False), f"blocks.{i}."))
    if info.final_norm:
        out["norm.weight"], out["norm.bias"] = st["encoder.norm.weight"], st["encoder.norm.bias"]
    global_pool = "token" if info.cls_token else "avg"
    num_classes, fc_norm = 0, False
    if kind == "classifier":
        global_pool = model.cfg.global_pool
        if with_head:
            _require(isinstance(model.head, nn.Linear), "timm: timm's ViT head is one Linear; MAE's linear probe "
                     "adds a BatchNorm (export --part encoder, or --to official for main_linprobe.py's layout)")
            out["head.weight"], out["head.bias"] = st["head.weight"], st["head.bias"]
            num_classes = st["head.weight"].shape[0]
        if "fc_norm.weight" in st:
            fc_norm = True
            out["fc_norm.weight"], out["fc_norm.bias"] = st["fc_norm.weight"], st["fc_norm.bias"]
    _require(not (fc_norm and info.final_norm), "timm: a ViT with both a final norm and fc_norm")
    _require(fc_norm or info.final_norm or global_pool == "avg",
             "timm: a [cls]-pooled encoder without a final norm")
    size = _TIMM_NAMES.get((info.embed_dim, info.depth, info.num_heads), "base")
    name = f"vit_{size}_patch{info.patch_size}_{info.img_size}"
    try:
        import timm
        if not timm.is_model(name):
            name = "vit_base_patch16_224"  # any ViT entry point: the kwargs below set every shape
    except ImportError:
        pass
    qkv_bias = "blocks.0.attn.qkv.bias" in out
    kwargs = {"img_size": info.img_size, "patch_size": info.patch_size, "in_chans": info.in_chans,
              "embed_dim": info.embed_dim, "depth": info.depth, "num_heads": info.num_heads,
              "mlp_ratio": info.mlp_hidden / info.embed_dim, "qkv_bias": qkv_bias, "class_token": info.cls_token,
              "global_pool": global_pool, "fc_norm": fc_norm, "num_classes": num_classes,
              "init_values": float(st["encoder.blocks.0.ls1.gamma"][0]) if info.layer_scale else None}
    if not fc_norm and not info.final_norm:
        kwargs["final_norm"] = False
    return out, {"architecture": name, "kwargs": kwargs}


# ------------------------------------------------------------------------------------- Hugging Face


def default_hf_class(model: nn.Module) -> str:
    kind, video = model_kind(model), encoder_info(model).is_video
    if kind == "mae":
        return "ViTMAEForPreTraining"
    if kind == "videomae":
        return "VideoMAEForPreTraining"
    if kind == "classifier":
        return "VideoMAEForVideoClassification" if video else "ViTForImageClassification"
    return "VideoMAEModel" if video else "ViTModel"


def hf_state(model: nn.Module, hf_class: str | None = None) -> tuple[dict[str, torch.Tensor], Any]:
    """(state dict in ``hf_class``'s transformers 5 names, its transformers config)."""
    import transformers

    hf_class = hf_class or default_hf_class(model)
    if hf_class not in HF_CLASSES:
        raise ExportError(f"unknown Hugging Face class {hf_class!r}; supported: {', '.join(HF_CLASSES)}")
    info, kind, st = encoder_info(model), model_kind(model), _state(model)
    _check_encoder(info, hf_class)
    video = hf_class.startswith("VideoMAE")
    _require(video == info.is_video, f"{hf_class} is a{' video' if video else 'n image'} class; this model's encoder "
                                     f"is a{' video' if info.is_video else 'n image'} one")
    need = {"ViTMAEForPreTraining": "mae", "VideoMAEForPreTraining": "videomae",
            "ViTForImageClassification": "classifier", "VideoMAEForVideoClassification": "classifier"}.get(hf_class)
    _require(need is None or need == kind, f"{hf_class} needs a {need} model, got {type(model).__name__}")
    common = dict(hidden_size=info.embed_dim, num_hidden_layers=info.depth, num_attention_heads=info.num_heads,
                  intermediate_size=info.mlp_hidden, hidden_act="gelu", layer_norm_eps=1e-6, image_size=info.img_size,
                  patch_size=info.patch_size, num_channels=info.in_chans, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    blocks = [_block(st, f"encoder.blocks.{i}.", fold_ls=True) for i in range(info.depth)]
    has_bias = blocks[0]["q.bias"] is not None
    if video:
        return _hf_video(model, info, kind, st, blocks, hf_class, common, has_bias, transformers)
    return _hf_image(model, info, kind, st, blocks, hf_class, common, has_bias, transformers)


def _hf_image(model: nn.Module, info: EncoderInfo, kind: str, st: dict[str, torch.Tensor], blocks: list,
              hf_class: str, common: dict[str, Any], has_bias: bool, transformers: Any) -> tuple[dict, Any]:
    _require(info.cls_token, f"{hf_class}: Hugging Face ViTs always have a [cls] token")
    _require(info.final_norm, f"{hf_class}: Hugging Face ViTs always apply a final layernorm; this encoder has none "
                              f"(a mean-pooled classifier: export it to timm, which has global_pool='avg' + fc_norm)")
    p = "" if hf_class == "ViTModel" else "vit."
    out = {f"{p}embeddings.cls_token": st["encoder.cls_token"],
           f"{p}embeddings.position_embeddings": _encoder_table(model, info),
           f"{p}embeddings.patch_embeddings.projection.weight": st["encoder.patch_embed.proj.weight"],
           f"{p}embeddings.patch_embeddings.projection.bias": st["encoder.patch_embed.proj.bias"],
           f"{p}layernorm.weight": st["encoder.norm.weight"], f"{p}layernorm.bias": st["encoder.norm.bias"]}
    for i, b in enumerate(blocks):
        out.update(_hf_vit_block(b, f"{p}layers.{i}."))
    if hf_class == "ViTForImageClassification":
        _require(model.cfg.global_pool == "token" and isinstance(model.head, nn.Linear),
                 "ViTForImageClassification pools the [cls] token after the final norm into one Linear; this "
                 "classifier is not global_pool='token' with a Linear head (export it to timm or official)")
        out["classifier.weight"], out["classifier.bias"] = st["head.weight"], st["head.bias"]
        cfg = transformers.ViTConfig(**common, qkv_bias=has_bias, num_labels=st["head.weight"].shape[0])
    elif hf_class == "ViTModel":
        cfg = transformers.ViTConfig(**common, qkv_bias=has_bias)
    else:
        dec = model.decoder
        _require(info.pos_kind == "sincos", "ViTMAEForPreTraining builds MAE's 2-D sin-cos tables")
        d_blocks = [_block(st, f"decoder.decoder_blocks.{i}.", fold_ls=True) for i in range(len(dec.decoder_blocks))]
        _require(all((b["q.bias"] is not None) == has_bias for b in d_blocks),
                 "ViTMAE's config has one qkv_bias for encoder and decoder")
        dd = dec.decoder_embed.out_features
        out["decoder.decoder_pos_embed"] = torch.cat([torch.zeros(1, 1, dd), dec.decoder_pos_embed.detach().float()], 1)
        for name in ("mask_token", "decoder_embed.weight", "decoder_embed.bias", "decoder_norm.weight",
                     "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"):
            out[f"decoder.{name}"] = st[f"decoder.{name}"]
        for i, b in enumerate(d_blocks):
            out.update(_hf_vit_block(b, f"decoder.decoder_layers.{i}."))
        cfg = transformers.ViTMAEConfig(
            **common, qkv_bias=has_bias, decoder_hidden_size=dd, decoder_num_hidden_layers=len(d_blocks),
            decoder_num_attention_heads=dec.decoder_blocks[0].attn.num_heads,
            decoder_intermediate_size=dec.decoder_blocks[0].mlp.fc1.out_features,
            mask_ratio=float(model.cfg.mask_ratio), norm_pix_loss=bool(model.cfg.norm_pix_loss))
    return out, cfg


def _hf_video(model: nn.Module, info: EncoderInfo, kind: str, st: dict[str, torch.Tensor], blocks: list,
              hf_class: str, common: dict[str, Any], has_bias: bool, transformers: Any) -> tuple[dict, Any]:
    _require(not info.cls_token, f"{hf_class}: VideoMAE has no [cls] token")
    _require(info.pos_kind == "sincos_1d", f"{hf_class} builds VideoMAE's 1-D sin-cos table; this encoder's is "
                                           f"{info.pos_kind!r}")
    p = "" if hf_class == "VideoMAEModel" else "videomae."
    out = {f"{p}embeddings.patch_embeddings.projection.weight": st["encoder.patch_embed.proj.weight"],
           f"{p}embeddings.patch_embeddings.projection.bias": st["encoder.patch_embed.proj.bias"]}
    if info.final_norm:
        out[f"{p}layernorm.weight"], out[f"{p}layernorm.bias"] = st["encoder.norm.weight"], st["encoder.norm.bias"]
    for i, b in enumerate(blocks):
        out.update(_hf_videomae_block(b, f"{p}encoder.layer.{i}."))
    video = dict(num_frames=info.num_frames, tubelet_size=info.tubelet_size, qv_bias=has_bias,
                 use_mean_pooling=not info.final_norm)
    if hf_class == "VideoMAEForVideoClassification":
        _require(model.cfg.global_pool == "avg" and "fc_norm.weight" in st and isinstance(model.head, nn.Linear),
                 "VideoMAEForVideoClassification mean-pools into fc_norm and one Linear head")
        out.update({"fc_norm.weight": st["fc_norm.weight"], "fc_norm.bias": st["fc_norm.bias"],
                    "classifier.weight": st["head.weight"], "classifier.bias": st["head.bias"]})
        return out, transformers.VideoMAEConfig(**common, **video, num_labels=st["head.weight"].shape[0])
    if hf_class == "VideoMAEModel":
        return out, transformers.VideoMAEConfig(**common, **video)
    dec = model.decoder
    _require("decoder.decoder_embed.bias" not in st, "VideoMAE's encoder_to_decoder has no bias")
    d_blocks = [_block(st, f"decoder.decoder_blocks.{i}.", fold_ls=True) for i in range(len(dec.decoder_blocks))]
    out.update({"encoder_to_decoder.weight": st["decoder.decoder_embed.weight"], "mask_token": st["decoder.mask_token"],
                "decoder.norm.weight": st["decoder.decoder_norm.weight"], "decoder.norm.bias": st["decoder.decoder_norm.bias"],
                "decoder.head.weight": st["decoder.decoder_pred.weight"], "decoder.head.bias": st["decoder.decoder_pred.bias"]})
    for i, b in enumerate(d_blocks):
        out.update(_hf_videomae_block(b, f"decoder.decoder_layers.{i}."))
    return out, transformers.VideoMAEConfig(
        **common, **video, decoder_hidden_size=dec.decoder_embed.out_features,
        decoder_num_hidden_layers=len(d_blocks), decoder_num_attention_heads=dec.decoder_blocks[0].attn.num_heads,
        decoder_intermediate_size=dec.decoder_blocks[0].mlp.fc1.out_features,
        norm_pix_loss=bool(model.cfg.norm_pix_loss))


# ------------------------------------------------------------------------------------- official


def official_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict in the official repository's names, which layout it is)."""
    info, kind, st = encoder_info(model), model_kind(model), _state(model)
    if info.is_video:
        _require(not info.cls_token and info.pos_kind == "sincos_1d" and not info.rel_pos_bias,
                 "official VideoMAE: no [cls], VideoMAE's 1-D sin-cos table, no relative position bias")
        pre = "encoder." if kind == "videomae" else ""
        out = {f"{pre}patch_embed.proj.weight": st["encoder.patch_embed.proj.weight"],
               f"{pre}patch_embed.proj.bias": st["encoder.patch_embed.proj.bias"]}
        for i in range(info.depth):
            out.update(_timm_block(_block(st, f"encoder.blocks.{i}.", fold_ls=False), f"{pre}blocks.{i}.",
                                   qv=True, gamma="gamma"))
        if kind == "videomae":
            _require(info.final_norm and "decoder.decoder_embed.bias" not in st,
                     "official VideoMAE pretraining: a final norm, encoder_to_decoder without bias")
            out.update({"encoder.norm.weight": st["encoder.norm.weight"], "encoder.norm.bias": st["encoder.norm.bias"],
                        "encoder_to_decoder.weight": st["decoder.decoder_embed.weight"],
                        "mask_token": st["decoder.mask_token"],
                        "decoder.norm.weight": st["decoder.decoder_norm.weight"],
                        "decoder.norm.bias": st["decoder.decoder_norm.bias"],
                        "decoder.head.weight": st["decoder.decoder_pred.weight"],
                        "decoder.head.bias": st["decoder.decoder_pred.bias"]})
            for i in range(len(model.decoder.decoder_blocks)):
                out.update(_timm_block(_block(st, f"decoder.decoder_blocks.{i}.", fold_ls=False),
                                       f"decoder.blocks.{i}.", qv=True, gamma="gamma"))
            return out, "MCG-NJU/VideoMAE modeling_pretrain.py"
        _require(kind == "classifier" and model.cfg.global_pool == "avg" and isinstance(model.head, nn.Linear),
                 "official VideoMAE fine-tuning: a mean-pooled classifier (fc_norm, Linear head), or a videomae model")
        out.update({"fc_norm.weight": st["fc_norm.weight"], "fc_norm.bias": st["fc_norm.bias"],
                    "head.weight": st["head.weight"], "head.bias": st["head.bias"]})
        return out, "MCG-NJU/VideoMAE modeling_finetune.py"
    _check_encoder(info, "official MAE")
    _require(info.cls_token, "official MAE: the ViT has a [cls] token")
    out = {"cls_token": st["encoder.cls_token"], "pos_embed": _encoder_table(model, info),
           "patch_embed.proj.weight": st["encoder.patch_embed.proj.weight"],
           "patch_embed.proj.bias": st["encoder.patch_embed.proj.bias"]}
    for i in range(info.depth):
        out.update(_timm_block(_block(st, f"encoder.blocks.{i}.", fold_ls=True), f"blocks.{i}."))
    if info.final_norm:
        out["norm.weight"], out["norm.bias"] = st["encoder.norm.weight"], st["encoder.norm.bias"]
    if kind == "mae":
        dec = model.decoder
        dd = dec.decoder_embed.out_features
        out["mask_token"] = st["decoder.mask_token"]
        out["decoder_pos_embed"] = torch.cat([torch.zeros(1, 1, dd), dec.decoder_pos_embed.detach().float()], 1)
        for name in ("decoder_embed", "decoder_norm", "decoder_pred"):
            out[f"{name}.weight"], out[f"{name}.bias"] = st[f"decoder.{name}.weight"], st[f"decoder.{name}.bias"]
        for i in range(len(dec.decoder_blocks)):
            out.update(_timm_block(_block(st, f"decoder.decoder_blocks.{i}.", fold_ls=True), f"decoder_blocks.{i}."))
        return out, "facebookresearch/mae models_mae.py"
    _require(kind == "classifier", "official MAE: an mae model or an image classifier")
    if "fc_norm.weight" in st:
        out["fc_norm.weight"], out["fc_norm.bias"] = st["fc_norm.weight"], st["fc_norm.bias"]
    if isinstance(model.head, nn.Linear):
        out["head.weight"], out["head.bias"] = st["head.weight"], st["head.bias"]
        return out, "facebookresearch/mae models_vit.py"
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        out[f"head.0.{name}"] = model.head.bn.state_dict()[name].detach().clone()
    out["head.1.weight"], out["head.1.bias"] = st["head.fc.weight"], st["head.fc.bias"]
    return out, "facebookresearch/mae main_linprobe.py"


# -------------------------------------------------------------------------------------- writing


def export(model: nn.Module, fmt: str, out_dir: str | Path, *, hf_class: str | None = None,
           part: str = "all") -> dict[str, Any]:
    """Write ``model`` to ``out_dir`` in ``fmt`` (``hf``, ``timm``, ``official``); returns what was written."""
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if part not in ("all", "encoder"):
        raise ExportError(f"part must be 'all' or 'encoder', got {part!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        if part == "encoder" and hf_class is None:
            hf_class = "VideoMAEModel" if encoder_info(model).is_video else "ViTModel"
        state, cfg = hf_state(model, hf_class)
        name = hf_class or default_hf_class(model)
        cfg.architectures = [name]
        cfg.save_pretrained(str(out))
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
        return {"format": "hf", "class": name, "files": ["config.json", "model.safetensors"], "keys": len(state)}
    if fmt == "timm":
        state, spec = timm_state(model, part)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
        (out / "timm_config.json").write_text(json.dumps(spec, indent=1))
        return {"format": "timm", **spec, "files": ["model.safetensors", "timm_config.json"], "keys": len(state)}
    state, layout = official_state(model)
    torch.save({"model": state}, out / "checkpoint.pth")
    return {"format": "official", "layout": layout, "files": ["checkpoint.pth"], "keys": len(state)}
