"""SimMIM (Xie et al., 2022): mask tokens replace hidden patches inside the encoder; a one-layer
head predicts raw pixels; L1 loss on the hidden patches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmmae.decoder import PixelShuffleHead
from mmmae.heads import EncoderCfg, EncoderModel, build_vision_encoder
from mmmae.layers.patchify import patchify
from mmmae.masking import block_mask, check_mask
from mmmae.registry import MaskFn, register_model
from mmmae.targets import masked_l1, normalize_per_patch


@dataclass
class SimMIMCfg(EncoderCfg):
    mask_ratio: float = 0.6
    mask_patch_size: int = 32  # pixels; SimMIM hides 32x32 blocks
    norm_pix_loss: bool = False  # SimMIM regresses the (ImageNet-normalised) pixels directly


class SimMIM(EncoderModel):
    """``forward(batch)``: ``batch["image"]`` (B, C, H, W), optional ``batch["mask"]`` (B, L).
    Returns ``loss``, ``l1_loss``, ``pred`` (B, L, p*p*C) and ``mask``."""

    def __init__(self, cfg: SimMIMCfg) -> None:
        super().__init__()
        if cfg.mask_patch_size % cfg.patch_size:
            raise ValueError(f"mask_patch_size {cfg.mask_patch_size} must be a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.encoder = build_vision_encoder(cfg, mask_token=True)
        self.grid_size = self.encoder.grid_size
        self.decoder = PixelShuffleHead(cfg.embed_dim, cfg.patch_size, cfg.in_chans)

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
@register_model("simmim", SimMIMCfg, make_mask_fn=_simmim_mask_fn, size_recipe={"vit_huge": {"patch_size": 16}})
def _build_simmim(cfg: SimMIMCfg) -> SimMIM:
    return SimMIM(cfg)
