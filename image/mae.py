"""MAE (He et al., 2022): the encoder sees only visible patches; a light decoder reconstructs pixels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmmae.decoder import TEST_DECODER, MAEDecoder
from mmmae.heads import EncoderCfg, EncoderModel, build_vision_encoder
from mmmae.layers.pos_embed import sincos_pos_embed_2d
from mmmae.masking import check_mask, mask_to_indices, random_mask
from mmmae.registry import MaskFn, register_model
from mmmae.targets import HOG_VARIANTS, HOGTarget, image_pixel_target, masked_mse
from mmmae.visualize import pixel_target_views


@dataclass
class MAECfg(EncoderCfg):
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    target: str = "pixel"  # "pixel" or "hog" (MaskFeat's target)
    # With target=hog: "maskfeat" (SlowFast HOGLayerC, no window) or "mmpretrain" (HOGGenerator, 16-px Gaussian).
    hog_variant: str = "maskfeat"


class MAE(EncoderModel):
    """Masked autoencoder on images.

    ``forward(batch)``: ``batch["image"]`` (B, C, H, W), optional ``batch["mask"]`` (B, L) bool with
    True = hidden. Returns ``loss``, ``mse_loss``, ``pred`` (B, L, p*p*C) and ``mask``.
    """

    def __init__(self, cfg: MAECfg) -> None:
        super().__init__()
        if cfg.target not in ("pixel", "hog"):
            raise ValueError(f"MAE target must be 'pixel' or 'hog', got {cfg.target!r}")
        if cfg.hog_variant not in HOG_VARIANTS:
            raise ValueError(f"MAE hog_variant must be one of {HOG_VARIANTS}, got {cfg.hog_variant!r}")
        self.cfg = cfg
        self.encoder = build_vision_encoder(cfg)
        self.grid_size = self.encoder.grid_size
        self.hog = HOGTarget(cfg.patch_size, variant=cfg.hog_variant) if cfg.target == "hog" else None
        out_dim = self.hog.out_dim(cfg.in_chans) if self.hog else cfg.patch_size**2 * cfg.in_chans
        self.decoder = MAEDecoder(
            cfg.embed_dim, out_dim, lambda: sincos_pos_embed_2d(cfg.decoder_embed_dim, self.grid_size),
            decoder_embed_dim=cfg.decoder_embed_dim, decoder_depth=cfg.decoder_depth,
            decoder_num_heads=cfg.decoder_num_heads, mlp_ratio=cfg.mlp_ratio,
            num_prefix_tokens=self.encoder.num_prefix_tokens, attn_impl=cfg.attn_impl)  # type: ignore[arg-type]

    def forward_encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), ids_keep (B, K) -> (B, 1+K, D)."""
        return self.encoder.forward_features(imgs, ids_keep=ids_keep)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """(B, 1+K, D) -> (B, L, out_dim)."""
        return self.decoder(latent, ids_restore)

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        if self.hog is not None:
            return self.hog(imgs)
        return image_pixel_target(imgs, self.cfg.patch_size, self.cfg.norm_pix_loss)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        imgs = batch["image"]
        mask = batch.get("mask")
        if mask is None:
            mask = random_mask(imgs.shape[0], self.encoder.num_patches, self.cfg.mask_ratio).to(imgs.device)
        check_mask(mask, self.encoder.num_patches)
        idx = mask_to_indices(mask)
        latent = self.forward_encoder(imgs, idx.ids_keep)
        pred = self.forward_decoder(latent, idx.ids_restore)
        loss = masked_mse(pred, self.target(imgs), mask)
        return {"loss": loss, "mse_loss": loss.detach(), "pred": pred.detach(), "mask": mask}


def _mae_mask_fn(cfg: MAECfg) -> MaskFn:
    grid = cfg.img_size // cfg.patch_size
    return lambda b, g, modality="image": {"mask": random_mask(b, grid * grid, cfg.mask_ratio, generator=g)}


# MAE keeps one decoder (512 wide, 8 blocks, 16 heads) for ViT-B/L/H (facebookresearch/mae models_mae.py).
@register_model("mae", MAECfg, make_mask_fn=_mae_mask_fn, takes=("image",), size_recipe={"vit_tiny_test": TEST_DECODER},
                visualize=pixel_target_views)
def _build_mae(cfg: MAECfg) -> MAE:
    return MAE(cfg)
