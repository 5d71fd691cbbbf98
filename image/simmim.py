"""SimMIM (Xie et al., 2022): mask tokens replace hidden patches inside the encoder; a one-layer
head predicts raw pixels; L1 loss on the hidden patches.

The defaults are the official ViT-B recipe (microsoft/SimMIM configs/vit_base__800ep/
simmim_pretrain__vit_base__img224__800ep.yaml over config.py's defaults, built by models/simmim.py
``build_simmim``): no absolute position table (``USE_APE: False``), one relative position bias table
shared by all blocks (``USE_SHARED_RPB: True``), layer scale 0.1 (``VIT.INIT_VALUES``), BEiT's q/v
biases (``VIT.QKV_BIAS: True`` makes ``q_bias``/``v_bias``; the qkv linear itself has none), drop path
0.1, 32-px mask blocks at ratio 0.6, and the official weight init. MAE's trunk (sin-cos table, q/k/v
biases, no layer scale, xavier init) is ``pos_embed=sincos rel_pos_bias=none qkv_bias=qkv
init_values=0 weight_init=mae``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mmmae.decoder import PixelShuffleHead
from mmmae.encoder import init_vit_weights
from mmmae.heads import EncoderCfg, EncoderModel, build_vision_encoder
from mmmae.layers.patchify import patchify
from mmmae.masking import block_mask, check_mask
from mmmae.registry import MaskFn, register_model
from mmmae.targets import masked_l1, normalize_per_patch
from mmmae.visualize import patch_views

WEIGHT_INITS = ("simmim", "mae")


@dataclass
class SimMIMCfg(EncoderCfg):
    # The official ViT trunk (models/vision_transformer.py via build_simmim; config.py MODEL.VIT).
    pos_embed: str = "none"  # USE_APE: False
    rel_pos_bias: str = "shared"  # USE_SHARED_RPB: True, USE_RPB: False
    qkv_bias: str = "qv"  # QKV_BIAS: True -> q_bias and v_bias, no k bias
    init_values: float = 0.1  # INIT_VALUES: layer scale gamma_1 / gamma_2
    drop_path_rate: float = 0.1  # MODEL.DROP_PATH_RATE
    mask_ratio: float = 0.6
    mask_patch_size: int = 32  # pixels; SimMIM hides 32x32 blocks
    norm_pix_loss: bool = False  # SimMIM regresses the (ImageNet-normalised) pixels directly
    # "simmim": the official init (see SimMIM.init_simmim_weights); "mae": mmmae's shared MAE init.
    weight_init: str = "simmim"


class SimMIM(EncoderModel):
    """``forward(batch)``: ``batch["image"]`` (B, C, H, W), optional ``batch["mask"]`` (B, L).
    Returns ``loss``, ``l1_loss``, ``pred`` (B, L, p*p*C) and ``mask``."""

    def __init__(self, cfg: SimMIMCfg) -> None:
        super().__init__()
        if cfg.mask_patch_size % cfg.patch_size:
            raise ValueError(f"mask_patch_size {cfg.mask_patch_size} must be a multiple of patch_size {cfg.patch_size}")
        if cfg.weight_init not in WEIGHT_INITS:
            raise ValueError(f"SimMIM weight_init must be one of {WEIGHT_INITS}, got {cfg.weight_init!r}")
        self.cfg = cfg
        self.encoder = build_vision_encoder(cfg, mask_token=True)
        self.grid_size = self.encoder.grid_size
        self.decoder = PixelShuffleHead(cfg.embed_dim, cfg.patch_size, cfg.in_chans)

    def init_weights(self) -> None:
        if self.cfg.weight_init == "mae":
            super().init_weights()
        else:
            self.init_simmim_weights()

    @torch.no_grad()
    def init_simmim_weights(self) -> None:
        """The official init (microsoft/SimMIM models/vision_transformer.py ``VisionTransformer.__init__``
        with ``VisionTransformerForSimMIM._trunc_normal_``, which truncates at one std, a=-0.02, b=0.02):
        linear and patch-embedding weights, [cls] and the mask token ~ N(0, 0.02) cut at +-0.02, zero
        biases, unit LayerNorms; then ``fix_init_weight`` divides block i's ``attn.proj`` and ``mlp.fc2``
        weights by sqrt(2 * i) (i from 1). q/v biases and relative position tables stay zero, layer
        scales at ``init_values`` (as constructed there). The head is a plain ``nn.Conv2d``
        (models/simmim.py ``SimMIM.decoder``) that nothing re-initialises: PyTorch's default init."""
        enc = self.encoder
        init_vit_weights(enc)  # zero biases / q-v biases / tables, unit norms, layer scales
        for m in enc.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.02, b=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for p in (enc.cls_token, enc.mask_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02, a=-0.02, b=0.02)
        for i, blk in enumerate(enc.blocks, start=1):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * i))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * i))
        self.decoder.proj.reset_parameters()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        imgs = batch["image"]
        mask = batch.get("mask")
        if mask is None:
            mask = _simmim_mask_fn(self.cfg)(imgs.shape[0], None)["mask"].to(imgs.device)
        check_mask(mask, self.encoder.num_patches)
        z = self.encoder.forward_features(imgs, mask=mask)[:, self.encoder.num_prefix_tokens:]
        rec = self.decoder(z, self.grid_size)  # (B, C, H, W)
        pred = patchify(rec, self.cfg.patch_size)
        target = patchify(imgs.float(), self.cfg.patch_size)
        if self.cfg.norm_pix_loss:
            target = normalize_per_patch(target)
        loss = masked_l1(pred, target, mask)
        return {"loss": loss, "l1_loss": loss.detach(), "pred": pred.detach(), "mask": mask}


def _simmim_mask_fn(cfg: SimMIMCfg) -> MaskFn:
    grid = cfg.img_size // cfg.patch_size
    s = cfg.mask_patch_size // cfg.patch_size
    return lambda b, g, modality="image": {"mask": block_mask(b, (grid, grid), cfg.mask_ratio, mask_patch_size=s, generator=g)}


# 32-px mask blocks need a patch size that divides 32: ViT-H takes 16-px patches here.
@register_model("simmim", SimMIMCfg, make_mask_fn=_simmim_mask_fn, takes=("image",),
                size_recipe={"vit_huge": {"patch_size": 16}, "vit_giant": {"patch_size": 16}}, visualize=patch_views)
def _build_simmim(cfg: SimMIMCfg) -> SimMIM:
    return SimMIM(cfg)
