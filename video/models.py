"""Video masked autoencoders on the shared ViT trunk: VideoMAE (with VideoMAEv2 decoder masking),
OmniMAE (one model for images and videos) and a BEVT-style two-stage model (``bevt_spatial`` then
``bevt``).

Position tables. All three default to VideoMAE's fixed 1-D sin-cos table over the flattened t*h*w
tokens (``pos_embed="sincos_1d"``), which is also what OmniMAE's reference code uses. Because tokens
are t-major, the first h*w rows of that table are the t=0 slice: an image (a static clip of one
tubelet) takes exactly those rows (OmniMAE's ``interpolate_pos_encoding`` "zeroth frame" rule), and an
image model built with ``sincos_1d`` has that same table, which is what lets BEVT's spatial stage hand
its weights to the video stage without any position mismatch. The 3-D separable ``"sincos"`` table is
t-major too, so the same slicing is valid with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mmmae.decoder import TEST_DECODER, MAEDecoder
from mmmae.encoder import VisionEncoder
from mmmae.heads import EncoderCfg, EncoderModel, build_vision_encoder
from mmmae.layers.patch_embed import patch_linear
from mmmae.layers.pos_embed import pos_table
from mmmae.masking import (beit_block_mask, block_mask, check_mask, cyclic_tube_mask, gather_tokens, mask_to_indices,
                           num_masked_floor, random_mask, running_cell_mask, tube_mask)
from mmmae.registry import MaskFn, register_model
from mmmae.targets import (HOG_VARIANTS, IMAGENET_MEAN, IMAGENET_STD, HOGTarget, image_pixel_target, masked_mse,
                           video_pixel_target)
from mmmae.visualize import image_views, pixel_target_views, video_views

__all__ = [
    "VideoMAECfg", "VideoMAE", "OmniMAECfg", "OmniMAE", "BEVTSpatialCfg", "BEVTSpatial", "BEVTCfg", "BEVT",
    "decoder_keep_mask",
]


# ----------------------------------------------------------------------------------------------------
# shared helpers


def check_image(x: torch.Tensor, in_chans: int, img_size: tuple[int, int]) -> None:
    expected = (in_chans, *img_size)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"expected images of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")


def image_as_tubelet_tokens(encoder: VisionEncoder, images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, h*w, D): the image repeated over one tubelet's frames (OmniMAE's
    ``PadIm2Video(ntimes=2, pad_type="repeat")``) through the 3-D tokenizer. With an inflated kernel
    (BEVT) this equals the 2-D patch embedding of the image."""
    pe = encoder.patch_embed
    check_image(images, pe.in_chans, pe.img_size)
    clip = images.unsqueeze(2).expand(-1, -1, pe.tubelet_size, -1, -1)
    return patch_linear(clip, pe.proj, "b c (t u) (h p) (w q) -> b (t h w) (c u p q)", u=pe.tubelet_size,
                        p=pe.patch_size[0], q=pe.patch_size[1])


def _grid3(cfg: EncoderCfg) -> tuple[int, int, int]:
    g = cfg.img_size // cfg.patch_size
    return cfg.num_frames // cfg.tubelet_size, g, g


# ----------------------------------------------------------------------------------------------------
# VideoMAE


@dataclass
class VideoMAECfg(EncoderCfg):
    """VideoMAE ViT-B/16, 16x224 (Tong et al. 2022; MCG-NJU/VideoMAE ``pretrain_videomae_base_patch16_224``
    with ``--decoder_depth 4``): q/v biases, no [cls], VideoMAE's 1-D sin-cos table, a 384-wide 4-block
    6-head decoder (ViT-S 192/3 heads, ViT-L 512/8, ViT-H 640/8; depth 4 for all), 90% tube masking,
    per-channel normalised tubelet target."""

    img_size: int = 224
    patch_size: int = 16
    num_frames: int = 16
    tubelet_size: int = 2
    pos_embed: str = "sincos_1d"
    qkv_bias: str = "qv"
    cls_token: bool = False
    decoder_embed_dim: int = 384
    decoder_depth: int = 4
    decoder_num_heads: int = 6
    mask_ratio: float = 0.9
    # VideoMAEv2 decoder masking: 0 = off (decode every hidden token); 0.5 = running-cell masking that
    # leaves half of the hidden tokens to reconstruct.
    decoder_mask_ratio: float = 0.0
    norm_pix_loss: bool = True


def decoder_keep_mask(mask: torch.Tensor, grid_size: tuple[int, int, int], decoder_mask_ratio: float, *,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """VideoMAEv2's decoder mask for an encoder mask: (B, L) bool, True = not reconstructed.

    Starts from the running-cell mask (``mmmae.masking.running_cell_mask``, VideoMAEv2
    dataset/masking_generator.py ``RunningCellMaskingGenerator``: ``int(4 * ratio)`` of each 2x2 cell
    not decoded) and then moves as few positions as needed, at random, so every sample leaves exactly
    ``N = round(M * kept share)`` hidden tokens to reconstruct (M hidden tokens, kept share =
    1 - int(4 * ratio) / 4): a batch needs a common count. That N is the reference's mean loss count,
    and at its recipe it is the reference's exact count with nothing moved: with a tube mask (the same
    hidden set on every slice) and the 2-of-4 cell, slices t and t+2 decode complementary halves, so over
    T = 8 slices the decoded hidden tokens are 4 * 176 = 704 = 1408 / 2 in every sample (16x224, 0.9,
    decoder ratio 0.5). Positions visible to the encoder are left as the running cell has them; the
    model only decodes hidden ones.
    """
    b, n = mask.shape
    m = check_mask(mask, n)
    rc = running_cell_mask(b, grid_size, decoder_mask_ratio, generator=generator)
    kept_share = 1.0 - int(4 * decoder_mask_ratio) / 4
    target = int(round(m * kept_share))
    noise = torch.rand(b, n, generator=generator)
    out = rc.clone()
    for i in range(b):
        cand = (mask[i] & ~rc[i]).nonzero().squeeze(1)
        if len(cand) > target:
            out[i, cand[noise[i, cand].argsort()[target:]]] = True
        elif len(cand) < target:
            extra = (mask[i] & rc[i]).nonzero().squeeze(1)
            out[i, extra[noise[i, extra].argsort()[: target - len(cand)]]] = False
    return out


class VideoMAE(EncoderModel):
    """VideoMAE: tube-masked tubelets, the encoder sees only visible tokens, a light decoder predicts
    the hidden tubelets' per-channel normalised pixels.

    ``forward(batch)``: ``batch["video"]`` (B, 3, T, H, W) ImageNet-normalised, optional
    ``batch["mask"]`` (B, L) bool tube mask (True = hidden), optional ``batch["decode_mask"]`` (B, L)
    bool (True = not reconstructed; VideoMAEv2). Returns ``loss``, ``mse_loss``, ``pred`` and ``mask``.
    ``pred`` is (B, L, pt*p*p*3) (every position; the loss uses the hidden ones), or with decoder
    masking (B, N, pt*p*p*3) for the N decoded hidden tokens in token order, marked by ``decoded``
    (B, L).

    Decoder masking (VideoMAEv2, Wang et al. 2023, sec. 3.2): the decoder runs on the visible tokens
    plus mask tokens at the hidden positions the decoder mask keeps, and the loss counts exactly those
    hidden positions, as the reference's does (OpenGVLab/VideoMAEv2 engine_for_pretraining.py:
    ``cal_loss_mask = bool_masked_pos[~decode_masked_pos]``). Difference: the reference also puts mask
    tokens, with no loss, on the running cell's positions that the encoder saw (models/modeling_pretrain.py
    ``pos_emd_mask = expand_pos_embed[~decode_mask]``), so its decoder reads those positions twice; we
    decode hidden positions only.
    """

    def __init__(self, cfg: VideoMAECfg) -> None:
        super().__init__()
        if cfg.num_frames <= 0:
            raise ValueError(f"videomae needs num_frames > 0, got {cfg.num_frames}")
        if not 0.0 <= cfg.decoder_mask_ratio < 1.0:
            raise ValueError(f"decoder_mask_ratio must be in [0, 1), got {cfg.decoder_mask_ratio}")
        self.cfg = cfg
        self.encoder = build_vision_encoder(cfg)
        self.grid_size = self.encoder.grid_size
        out_dim = cfg.tubelet_size * cfg.patch_size**2 * cfg.in_chans
        grid = self.grid_size
        self.decoder = MAEDecoder(
            cfg.embed_dim, out_dim, lambda: pos_table(cfg.pos_embed, cfg.decoder_embed_dim, grid),
            decoder_embed_dim=cfg.decoder_embed_dim,
            decoder_depth=cfg.decoder_depth, decoder_num_heads=cfg.decoder_num_heads, mlp_ratio=cfg.mlp_ratio,
            num_prefix_tokens=self.encoder.num_prefix_tokens, qkv_bias=cfg.qkv_bias,
            attn_impl=cfg.attn_impl,  # type: ignore[arg-type]
            # VideoMAE's encoder_to_decoder has no bias (modeling_pretrain.py); released weights have none.
            embed_bias=False)

    def target(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) -> (B, L, pt*p*p*3), VideoMAE's target (unnormalise, per-channel norm)."""
        return video_pixel_target(video, self.cfg.patch_size, self.cfg.tubelet_size, self.cfg.norm_pix_loss)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        video = batch["video"]
        b, num = video.shape[0], self.encoder.num_patches
        mask = batch.get("mask")
        if mask is None:
            mask = tube_mask(b, self.grid_size, self.cfg.mask_ratio).to(video.device)
        check_mask(mask, num)
        decode_mask = batch.get("decode_mask")
        if decode_mask is None and self.cfg.decoder_mask_ratio > 0:
            decode_mask = decoder_keep_mask(mask.cpu(), self.grid_size, self.cfg.decoder_mask_ratio).to(video.device)
        idx = mask_to_indices(mask)
        latent = self.encoder.forward_features(video, ids_keep=idx.ids_keep)
        target = self.target(video)
        if decode_mask is None:
            pred = self.decoder(latent, idx.ids_restore)  # (B, L, P)
            loss = masked_mse(pred, target, mask)
            return {"loss": loss, "mse_loss": loss.detach(), "pred": pred.detach(), "mask": mask}

        if decode_mask.dtype != torch.bool or decode_mask.shape != mask.shape:
            raise ValueError(f"decode_mask must be a bool tensor shaped like mask {tuple(mask.shape)}, got "
                             f"{decode_mask.dtype} {tuple(decode_mask.shape)}")
        decoded = mask & ~decode_mask  # hidden tokens the decoder reconstructs
        counts = decoded.sum(dim=1)
        if bool((counts != counts[0]).any()) or int(counts[0]) == 0:
            raise ValueError("decode_mask must leave the same, non-zero number of hidden tokens to reconstruct in "
                             f"every sample; got {counts.tolist()} (make it with decoder_keep_mask)")
        # Decoder input: every visible token (context) + mask tokens at the decoded hidden positions.
        ids_decode = mask_to_indices(~(decoded | ~mask)).ids_keep  # (B, K+N), token order
        out = self.decoder(latent, idx.ids_restore, ids_decode=ids_decode)  # (B, K+N, P)
        ids_dec = mask_to_indices(~decoded).ids_keep  # (B, N) decoded hidden positions, token order
        sel = torch.gather(decoded, 1, ids_decode)  # which decoder outputs are decoded hidden tokens
        pred = out[sel].view(b, -1, out.shape[-1])  # (B, N, P), token order like ids_dec
        loss = F.mse_loss(pred.float(), gather_tokens(target, ids_dec).float())
        return {"loss": loss, "mse_loss": loss.detach(), "pred": pred.detach(), "mask": mask, "decoded": decoded}

    def reconstruction_views(self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor], *,
                             mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
                             ) -> dict[str, torch.Tensor] | None:
        """The four views (``mmmae.visualize.VIEWS``) of ``forward``'s output, each (B, 3, T, H, W)."""
        pred, shown = out["pred"], out.get("decoded", out["mask"])
        if pred.shape[1] != shown.shape[1]:  # decoder masking: scatter the decoded tokens back
            full = pred.new_zeros(pred.shape[0], shown.shape[1], pred.shape[-1])
            full[shown] = pred.reshape(-1, pred.shape[-1])
            pred = full
        return video_views(batch["video"], pred, shown, self.cfg.patch_size, self.cfg.tubelet_size,
                           self.cfg.norm_pix_loss, mean=mean, std=std)



def _videomae_mask_fn(cfg: VideoMAECfg) -> MaskFn:
    grid = _grid3(cfg)

    def make(batch_size: int, generator: torch.Generator | None, modality: str = "video") -> dict[str, torch.Tensor]:
        # VideoMAE / VideoMAEv2 TubeMaskingGenerator: int(ratio * h*w) hidden per slice (1408 at 16x224, 0.9).
        mask = tube_mask(batch_size, grid, cfg.mask_ratio, count_rule=num_masked_floor, generator=generator)
        out = {"mask": mask}
        if cfg.decoder_mask_ratio > 0:
            out["decode_mask"] = decoder_keep_mask(mask, grid, cfg.decoder_mask_ratio, generator=generator)
        return out
    return make


# VideoMAE's decoder narrows with the encoder; 4 blocks for all (MCG-NJU/VideoMAE modeling_pretrain.py
# pretrain_videomae_{small,base,large,huge}_patch16_224 with the scripts' --decoder_depth 4). Its ViT-H
# uses 16-px patches, where the shared ViT-H preset has MAE's 14.
VIDEOMAE_SIZES: dict[str, dict[str, int]] = {
    "vit_tiny_test": TEST_DECODER,
    "vit_small": {"decoder_embed_dim": 192, "decoder_depth": 4, "decoder_num_heads": 3},
    "vit_base": {"decoder_embed_dim": 384, "decoder_depth": 4, "decoder_num_heads": 6},
    "vit_large": {"decoder_embed_dim": 512, "decoder_depth": 4, "decoder_num_heads": 8},
    "vit_huge": {"patch_size": 16, "decoder_embed_dim": 640, "decoder_depth": 4, "decoder_num_heads": 8},
    # VideoMAEv2 pretrain_videomae_giant_patch14_224: patch 14, decoder 512 wide, 8 heads (4 blocks).
    "vit_giant": {"decoder_embed_dim": 512, "decoder_depth": 4, "decoder_num_heads": 8},
}


@register_model("videomae", VideoMAECfg, make_mask_fn=_videomae_mask_fn, takes=("video",), size_recipe=VIDEOMAE_SIZES,
                visualize=VideoMAE.reconstruction_views)
def _build_videomae(cfg: VideoMAECfg) -> VideoMAE:
    return VideoMAE(cfg)


# ----------------------------------------------------------------------------------------------------
# OmniMAE


@dataclass
class OmniMAECfg(EncoderCfg):
    """OmniMAE ViT-B/16 (Girdhar et al. 2023; facebookresearch/omnivore ``omnimae``): 2x16x16 tubelets,
    qkv biases, no [cls], fixed 1-D sin-cos table (images take its t=0 slice), decoder 384 wide, 4 blocks,
    16 heads. Mask ratios default to the public config (images 0.75, videos 0.9); the paper uses 0.9 /
    0.95 (``configs/omnimae_paper.yaml``)."""

    img_size: int = 224
    patch_size: int = 16
    num_frames: int = 16
    tubelet_size: int = 2
    pos_embed: str = "sincos_1d"
    cls_token: bool = False
    decoder_embed_dim: int = 384
    decoder_depth: int = 4
    decoder_num_heads: int = 16
    image_mask_ratio: float = 0.75
    video_mask_ratio: float = 0.9
    # Per tubelet and channel, after unnormalising, dividing by (var + 1e-6) ** 0.5 (omnivision
    # losses/mae_loss.py MAELoss with norm_pix_per_channel, omnimae_vitbase_ssv2_in1k.yaml).
    norm_pix_loss: bool = True


class OmniMAE(EncoderModel):
    """One encoder and one decoder for images and videos.

    A video (B, 3, T, H, W) is tokenized by tubelets; an image (B, 3, H, W) is repeated over one
    tubelet's frames, so it becomes h*w tokens that take the t=0 rows of the position tables. Random
    (not tube) masking per modality; the target is the (repeated) tubelet's per-channel normalised
    pixels for both, so one prediction head serves both.

    ``forward(batch)``: ``batch["video"]`` or ``batch["image"]`` (one modality per batch, as the mixed
    sampler makes them), optional ``batch["mask"]`` (B, L) with L = T/pt*h*w or h*w. Returns ``loss``,
    ``mse_loss``, ``pred`` (B, L, pt*p*p*3) and ``mask``.

    Difference from the reference code: omnivision inserts encoder-width mask tokens and adds an
    encoder-width table before projecting to the decoder; we use MAE's order (project, mask tokens,
    decoder-width table), the one decoder every mmmae method shares.
    """

    def __init__(self, cfg: OmniMAECfg) -> None:
        super().__init__()
        if cfg.num_frames <= 0:
            raise ValueError(f"omnimae needs num_frames > 0, got {cfg.num_frames}")
        self.cfg = cfg
        self.encoder = build_vision_encoder(cfg)
        self.grid_size = self.encoder.grid_size
        self.num_image_tokens = self.grid_size[1] * self.grid_size[2]
        out_dim = cfg.tubelet_size * cfg.patch_size**2 * cfg.in_chans
        grid = self.grid_size
        self.decoder = MAEDecoder(
            cfg.embed_dim, out_dim, lambda: pos_table(cfg.pos_embed, cfg.decoder_embed_dim, grid),
            decoder_embed_dim=cfg.decoder_embed_dim,
            decoder_depth=cfg.decoder_depth, decoder_num_heads=cfg.decoder_num_heads, mlp_ratio=cfg.mlp_ratio,
            num_prefix_tokens=self.encoder.num_prefix_tokens, qkv_bias=cfg.qkv_bias,
            attn_impl=cfg.attn_impl)  # type: ignore[arg-type]

    def mask_ratio(self, modality: str) -> float:
        return self.cfg.image_mask_ratio if modality == "image" else self.cfg.video_mask_ratio

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        modality = "video" if "video" in batch else "image"
        x = batch[modality]
        enc = self.encoder
        if modality == "video":
            tokens, pos, clip = enc.tokenize(x), enc.pos_embed, x
        else:
            tokens = image_as_tubelet_tokens(enc, x)
            pos = enc.pos_embed[:, : self.num_image_tokens]  # the t=0 slice
            clip = x.unsqueeze(2).expand(-1, -1, self.cfg.tubelet_size, -1, -1)
        b, num = tokens.shape[:2]
        mask = batch.get("mask")
        if mask is None:
            mask = random_mask(b, num, self.mask_ratio(modality), count_rule=num_masked_floor).to(x.device)
        check_mask(mask, num)
        idx = mask_to_indices(mask)
        latent = enc.forward_tokens(tokens, pos=pos, ids_keep=idx.ids_keep)
        if modality == "video":
            pred = self.decoder(latent, idx.ids_restore)
        else:
            # The decoder's table covers the video's L positions: lay the image out as the t=0 slice of a
            # clip whose other slices are all hidden, and decode only that slice.
            full = torch.cat([mask, mask.new_ones(b, enc.num_patches - num)], dim=1)
            ids_decode = torch.arange(num, device=x.device).expand(b, -1)
            pred = self.decoder(latent, mask_to_indices(full).ids_restore, ids_decode=ids_decode)
        target = video_pixel_target(clip, self.cfg.patch_size, self.cfg.tubelet_size, self.cfg.norm_pix_loss,
                                    eps_inside_sqrt=True)
        loss = masked_mse(pred, target, mask)
        return {"loss": loss, "mse_loss": loss.detach(), "pred": pred.detach(), "mask": mask}

    def reconstruction_views(self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor], *,
                             mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
                             ) -> dict[str, torch.Tensor] | None:
        """The four views of ``forward``'s output: (B, 3, T, H, W) for a video batch; for an image batch
        (B, 3, H, W), drawn from the static clip the image entered as (its first frame)."""
        if "video" in batch:
            clip = batch["video"]
        else:
            clip = batch["image"].unsqueeze(2).expand(-1, -1, self.cfg.tubelet_size, -1, -1)
        views = video_views(clip, out["pred"], out["mask"], self.cfg.patch_size, self.cfg.tubelet_size,
                            self.cfg.norm_pix_loss, eps_inside_sqrt=True, mean=mean, std=std)  # omnivision MAELoss's epsilon
        return views if "video" in batch else {k: v[:, :, 0] for k, v in views.items()}



def _omnimae_mask_fn(cfg: OmniMAECfg) -> MaskFn:
    t, h, w = _grid3(cfg)

    def make(batch_size: int, generator: torch.Generator | None, modality: str = "video") -> dict[str, torch.Tensor]:
        # omnivision mask_image_modeling.py RandMasking (images: TubeMasking over one slice): int(ratio * L)
        # hidden, e.g. 1411 of 1568 at 0.9 and 147 of 196 at 0.75.
        if modality == "image":
            return {"mask": random_mask(batch_size, h * w, cfg.image_mask_ratio, count_rule=num_masked_floor,
                                        generator=generator)}
        return {"mask": random_mask(batch_size, t * h * w, cfg.video_mask_ratio, count_rule=num_masked_floor,
                                    generator=generator)}
    return make


# omnivore publishes one OmniMAE pretraining config (ViT-B, omnimae_vitbase_ssv2_in1k.yaml): its decoder
# (384 wide, 4 blocks, 16 heads) is kept for every encoder size.
@register_model("omnimae", OmniMAECfg, make_mask_fn=_omnimae_mask_fn, takes=("omni", "video", "image"),
                size_recipe={"vit_tiny_test": TEST_DECODER}, visualize=OmniMAE.reconstruction_views)
def _build_omnimae(cfg: OmniMAECfg) -> OmniMAE:
    return OmniMAE(cfg)


# ----------------------------------------------------------------------------------------------------
# BEVT-style: spatial (image) stage, then joint image + video stage


def _check_target(target: str) -> None:
    if target not in ("pixel", "hog"):
        raise ValueError(f"BEVT target must be 'pixel' or 'hog', got {target!r}")


class _FrameTarget(nn.Module):
    """Per-image targets (BEVT reconstructs each frame like an image): pixels normalised per patch
    (MAE) or HOG (MaskFeat). (B, C, H, W) -> (B, L, P); videos go frame by frame and then group by
    tubelet: (B, C, T, H, W) -> (B, T/pt*h*w, pt*P), each tubelet's frames in time order, so a static
    clip's target is the image's target repeated pt times."""

    def __init__(self, target: str, patch_size: int, in_chans: int, norm_pix: bool,
                 hog_variant: str = "maskfeat") -> None:
        super().__init__()
        _check_target(target)
        if hog_variant not in HOG_VARIANTS:
            raise ValueError(f"BEVT hog_variant must be one of {HOG_VARIANTS}, got {hog_variant!r}")
        self.patch_size, self.norm_pix = patch_size, norm_pix
        self.hog = HOGTarget(patch_size, variant=hog_variant) if target == "hog" else None
        self.dim = self.hog.out_dim(in_chans) if self.hog is not None else patch_size**2 * in_chans

    def forward(self, x: torch.Tensor, tubelet_size: int = 0) -> torch.Tensor:
        if x.ndim == 4:
            return self.hog(x) if self.hog is not None else image_pixel_target(x, self.patch_size, self.norm_pix)
        b, t = x.shape[0], x.shape[2]
        per_frame = self(rearrange(x, "b c t h w -> (b t) c h w"))  # (B*T, L2, P)
        return rearrange(per_frame, "(b t u) l p -> b (t l) (u p)", b=b, t=t // tubelet_size, u=tubelet_size)


@dataclass
class BEVTSpatialCfg(EncoderCfg):
    """BEVT stage 1 (Wang et al. 2022): BEiT-style masked image modelling with mask tokens inside the
    encoder and a linear head. BEVT predicts DALL-E tokens; we predict pixels or HOG (``target``).
    Masking is BEiT's block-wise generator aiming at ``int(mask_ratio * L)`` tokens, as BEVT's image
    pipeline (xyzforever/BEVT configs/recognition/swin/swin_base_patch244_window877_bevt_in1k_k400.py
    ``Masked2DPositionGenerate``: 98 of 196, min_num_patches=16, aspect 0.3..1/0.3); the hidden count
    varies by sample (mean ~97.5). ``mask_type="block"`` takes SimMIM's fixed ``mask_patch_size`` blocks
    with an exact count instead. No [cls] and VideoMAE's 1-D table, so the weights inflate into ``bevt``
    with identical image positions."""

    pos_embed: str = "sincos_1d"
    cls_token: bool = False
    mask_ratio: float = 0.5  # BEiT's target num_masking_patches = int(ratio * L): 98 of 196
    mask_type: str = "beit"  # "beit" (BEVT's) or "block" (SimMIM's fixed blocks)
    mask_patch_size: int = 32  # pixels, mask_type=block only
    min_num_patches: int = 16  # BEiT block area lower bound (BEVT's config; BEiT's class default is 4)
    max_num_patches: int = 0  # BEiT block area cap; 0 = BEiT's None (the target count)
    min_aspect: float = 0.3  # BEiT block aspect ratio in [min_aspect, 1 / min_aspect]
    target: str = "pixel"
    hog_variant: str = "maskfeat"  # with target=hog: "maskfeat" (SlowFast) or "mmpretrain"
    norm_pix_loss: bool = True


class BEVTSpatial(EncoderModel):
    """``forward(batch)``: ``batch["image"]`` (B, C, H, W), optional ``batch["mask"]`` (B, L) block mask.
    Returns ``loss``, ``mse_loss``, ``pred`` (B, L, P) and ``mask``."""

    def __init__(self, cfg: BEVTSpatialCfg) -> None:
        super().__init__()
        if cfg.num_frames:
            raise ValueError("bevt_spatial is the image stage: num_frames must be 0 (the video stage is 'bevt')")
        _bevt_spatial_mask_fn(cfg)  # checks the masking fields
        self.cfg = cfg
        self.encoder = build_vision_encoder(cfg, mask_token=True)
        self.grid_size = self.encoder.grid_size
        self.frame_target = _FrameTarget(cfg.target, cfg.patch_size, cfg.in_chans, cfg.norm_pix_loss,
                                         cfg.hog_variant)
        self.head = nn.Linear(cfg.embed_dim, self.frame_target.dim)

    def init_weights(self) -> None:
        self.encoder.init_weights()
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        imgs = batch["image"]
        mask = batch.get("mask")
        if mask is None:
            mask = _bevt_spatial_mask_fn(self.cfg)(imgs.shape[0], None)["mask"].to(imgs.device)
        check_mask(mask, self.encoder.num_patches, equal_counts=False)  # BEiT's counts vary by sample
        z = self.encoder.forward_features(imgs, mask=mask)[:, self.encoder.num_prefix_tokens:]
        pred = self.head(z)
        loss = masked_mse(pred, self.frame_target(imgs), mask)
        return {"loss": loss, "mse_loss": loss.detach(), "pred": pred.detach(), "mask": mask}


def _block_grid(cfg: EncoderCfg, mask_patch_size: int) -> tuple[tuple[int, int], int]:
    g = cfg.img_size // cfg.patch_size
    return (g, g), mask_patch_size // cfg.patch_size


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {allowed}, got {value!r}")


# (batch_size, generator) -> (B, L) bool mask.
MaskMaker = Callable[[int, torch.Generator | None], torch.Tensor]


def _bevt_frame_masker(cfg: BEVTSpatialCfg | BEVTCfg, key: str, mask_type: str, mask_ratio: float) -> MaskMaker:
    """(batch_size, generator) -> (B, h*w) bool image-grid masks: BEiT's block-wise generator with BEVT's
    settings (``beit``), or SimMIM's fixed blocks (``block``). Checks the fields (``key`` names the
    type's config key) once, up front."""
    grid, s = _block_grid(cfg, cfg.mask_patch_size)
    _check_choice(key, mask_type, ("beit", "block"))
    if mask_type == "block":
        if cfg.mask_patch_size % cfg.patch_size:
            raise ValueError(f"mask_patch_size {cfg.mask_patch_size} must be a multiple of patch_size {cfg.patch_size}")
        block_mask(0, grid, mask_ratio, mask_patch_size=s)  # reject bad settings now, not at the first batch
        return lambda b, g: block_mask(b, grid, mask_ratio, mask_patch_size=s, generator=g)
    target = num_masked_floor(grid[0] * grid[1], mask_ratio)  # BEVT: 98 = int(0.5 * 196)
    beit = {"min_num_patches": cfg.min_num_patches, "max_num_patches": cfg.max_num_patches or None,
            "min_aspect": cfg.min_aspect}
    beit_block_mask(0, grid, target, **beit)  # reject bad settings now, not at the first batch
    return lambda b, g: beit_block_mask(b, grid, target, generator=g, **beit)


def _bevt_spatial_mask_fn(cfg: BEVTSpatialCfg) -> MaskFn:
    make = _bevt_frame_masker(cfg, "mask_type", cfg.mask_type, cfg.mask_ratio)
    return lambda b, g, modality="image": {"mask": make(b, g)}


# BEVT's block masks are in 16-px patches (BEiT): ViT-H takes 16-px patches here.
@register_model("bevt_spatial", BEVTSpatialCfg, make_mask_fn=_bevt_spatial_mask_fn, takes=("image",),
                visualize=pixel_target_views,
                size_recipe={"vit_huge": {"patch_size": 16}, "vit_giant": {"patch_size": 16}})
def _build_bevt_spatial(cfg: BEVTSpatialCfg) -> BEVTSpatial:
    return BEVTSpatial(cfg)


@dataclass
class BEVTCfg(EncoderCfg):
    """BEVT stage 2: the stage-1 encoder inflated to tubelets, trained on both streams every step, with
    mask tokens inside the encoder and loss weights 1.0 / 1.0.

    Masks as BEVT's pipelines (xyzforever/BEVT swin_base_patch244_window877_bevt_in1k_k400.py,
    mmaction/datasets/pipelines/mask_generator.py). Image stream (``Masked2DPositionGenerate``): BEiT's
    block-wise mask aiming at 98 of 196 tokens. Video stream (``MaskedPositionGenerate``): one such
    98-token BEiT mask over a random cyclic run of 4..8 of the 8 time slices (``masked_tube_range``
    (0.5, 1.0) of clip_len 16 / temporal_scale 2), so about 37% of the video tokens are hidden, not 50%.
    Named options: ``image_mask_type="block"`` (SimMIM's fixed blocks, exact count) and
    ``video_mask_type="tube"`` (a random ``video_mask_ratio`` tube over every slice, VideoMAE-style)."""

    num_frames: int = 16
    tubelet_size: int = 2
    pos_embed: str = "sincos_1d"
    cls_token: bool = False
    image_mask_ratio: float = 0.5  # BEiT's target int(ratio * h*w): 98 of 196
    image_mask_type: str = "beit"  # "beit" (BEVT's) or "block" (SimMIM's fixed blocks)
    mask_patch_size: int = 32  # pixels, image_mask_type=block only
    # video_mask_type="bevt": the per-slice BEiT target share (98 of 196); "tube": the tube's ratio.
    video_mask_ratio: float = 0.5
    video_mask_type: str = "bevt"  # "bevt" (BEiT mask over a cyclic run of slices) or "tube"
    tube_min_share: float = 0.5  # BEVT masked_tube_range: run length from int(min * T) ...
    tube_max_share: float = 1.0  # ... to int(max * T) time slices
    min_num_patches: int = 16  # BEiT block area lower bound (BEVT's config; BEiT's class default is 4)
    max_num_patches: int = 0  # BEiT block area cap; 0 = BEiT's None (the target count)
    min_aspect: float = 0.3  # BEiT block aspect ratio in [min_aspect, 1 / min_aspect]
    target: str = "pixel"
    hog_variant: str = "maskfeat"  # with target=hog: "maskfeat" (SlowFast) or "mmpretrain"
    norm_pix_loss: bool = True
    image_loss_weight: float = 1.0
    video_loss_weight: float = 1.0


class BEVT(EncoderModel):
    """BEVT-style joint image + video masked modelling on one encoder.

    ``forward(batch)``: ``batch["video"]`` (B, 3, T, H, W) with ``batch["mask"]`` (B, L) video mask and/or
    ``batch["image"]`` (B', 3, H, W) with ``batch["image_mask"]`` (B', h*w) block mask (hidden counts may
    differ between samples: mask tokens replace hidden tokens in place); BEVT runs both
    every iteration. Images go through the video tokenizer as static one-tubelet clips and take the
    t=0 rows of the position table. Returns ``loss`` (weighted sum), ``video_loss`` / ``image_loss``,
    ``pred`` / ``mask`` (video) and ``image_pred`` / ``image_mask``.

    ``init_from`` a ``bevt_spatial`` state (``mmmae.weights.load``; ``load_pretrained`` for a state in
    memory): the 2-D patch kernel is inflated (repeated over the tubelet and divided by its length, as
    ``TubeletEmbed3d.inflate_from_2d``), the image head is loaded and the video head starts as the image
    head applied to each frame of the tubelet (``weight_adapter``).
    """

    def __init__(self, cfg: BEVTCfg) -> None:
        super().__init__()
        if cfg.num_frames <= 0:
            raise ValueError(f"bevt needs num_frames > 0, got {cfg.num_frames}")
        _bevt_mask_fn(cfg)  # checks the masking fields
        self.cfg = cfg
        self.encoder = build_vision_encoder(cfg, mask_token=True)
        self.grid_size = self.encoder.grid_size
        self.num_image_tokens = self.grid_size[1] * self.grid_size[2]
        self.frame_target = _FrameTarget(cfg.target, cfg.patch_size, cfg.in_chans, cfg.norm_pix_loss,
                                         cfg.hog_variant)
        self.image_head = nn.Linear(cfg.embed_dim, self.frame_target.dim)
        self.video_head = nn.Linear(cfg.embed_dim, cfg.tubelet_size * self.frame_target.dim)

    def init_weights(self) -> None:
        self.encoder.init_weights()
        for head in (self.image_head, self.video_head):
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)

    def forward_video(self, video: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_mask(mask, self.encoder.num_patches, equal_counts=False)
        z = self.encoder.forward_features(video, mask=mask)[:, self.encoder.num_prefix_tokens:]
        pred = self.video_head(z)
        return pred, masked_mse(pred, self.frame_target(video, self.cfg.tubelet_size), mask)

    def forward_image(self, imgs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = image_as_tubelet_tokens(self.encoder, imgs)
        check_mask(mask, self.num_image_tokens, equal_counts=False)
        pos = self.encoder.pos_embed[:, : self.num_image_tokens]
        z = self.encoder.forward_tokens(tokens, pos=pos, mask=mask)[:, self.encoder.num_prefix_tokens:]
        pred = self.image_head(z)
        return pred, masked_mse(pred, self.frame_target(imgs), mask)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "video" not in batch and "image" not in batch:
            raise KeyError("video")
        out: dict[str, torch.Tensor] = {}
        loss = None
        if "video" in batch:
            video = batch["video"]
            mask = batch.get("mask")
            if mask is None:
                mask = _bevt_mask_fn(self.cfg)(video.shape[0], None)["mask"].to(video.device)
            pred, vloss = self.forward_video(video, mask)
            loss = self.cfg.video_loss_weight * vloss
            out.update(video_loss=vloss.detach(), pred=pred.detach(), mask=mask)
        if "image" in batch:
            imgs = batch["image"]
            imask = batch.get("image_mask")
            if imask is None:
                imask = _bevt_mask_fn(self.cfg)(imgs.shape[0], None)["image_mask"].to(imgs.device)
            ipred, iloss = self.forward_image(imgs, imask)
            weighted = self.cfg.image_loss_weight * iloss
            loss = weighted if loss is None else loss + weighted
            out.update(image_loss=iloss.detach(), image_pred=ipred.detach(), image_mask=imask)
        assert loss is not None
        return {"loss": loss, **out}

    def reconstruction_views(self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor], *,
                             mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
                             ) -> dict[str, torch.Tensor] | None:
        """The four views of ``forward``'s output, video (B, 3, T, H, W) when the batch has one, else
        image (B, 3, H, W). BEVT's targets are per frame (``_FrameTarget``), so each frame is drawn as
        an image with the mask of its tubelet."""
        p, norm_pix = self.cfg.patch_size, self.cfg.norm_pix_loss
        if self.cfg.target != "pixel":
            return None
        if "video" not in batch:
            return image_views(batch["image"], out["image_pred"], out["image_mask"], p, norm_pix, mean=mean, std=std)
        video, u = batch["video"], self.cfg.tubelet_size
        t = video.shape[2] // u
        frames = rearrange(video, "b c t h w -> (b t) c h w")
        pred = rearrange(out["pred"], "b (t l) (u p) -> (b t u) l p", t=t, u=u)
        mask = rearrange(out["mask"], "b (t l) -> b t l", t=t).repeat_interleave(u, dim=1).flatten(0, 1)
        views = image_views(frames, pred, mask, p, norm_pix, mean=mean, std=std)
        return {k: rearrange(v, "(b t) c h w -> b c t h w", b=video.shape[0]) for k, v in views.items()}


    def weight_adapter(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A ``bevt_spatial`` state (mmmae names) for this model, applied by :func:`mmmae.weights.load`
        (which also inflates the 2-D patch kernel): the image head ``head.*`` becomes ``image_head.*``
        and, when the state has no video head, the video head starts as the image head applied to each
        frame of the tubelet."""
        new = {("image_head." + k[len("head."):] if k.startswith("head.") else k): v for k, v in state.items()}
        if "video_head.weight" not in new and "image_head.weight" in new:
            new["video_head.weight"] = new["image_head.weight"].repeat(self.cfg.tubelet_size, 1)
            new["video_head.bias"] = new["image_head.bias"].repeat(self.cfg.tubelet_size)
        return new

    def load_pretrained(self, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Load a ``bevt_spatial`` (or ``bevt``) state non-strictly; returns (missing, unexpected) keys."""
        from mmmae.weights import load

        rep = load(self, state, strict=False)
        return rep.missing, list(rep.unexpected) + list(rep.wrong_shape)


def _bevt_video_masker(cfg: BEVTCfg) -> MaskMaker:
    """(batch_size, generator) -> (B, T*h*w) bool video masks (``BEVTCfg.video_mask_type``)."""
    grid = _grid3(cfg)
    _check_choice("video_mask_type", cfg.video_mask_type, ("bevt", "tube"))
    if cfg.video_mask_type == "tube":
        num_masked_floor(grid[1] * grid[2], cfg.video_mask_ratio)  # checks the ratio
        return lambda b, g: tube_mask(b, grid, cfg.video_mask_ratio, count_rule=num_masked_floor, generator=g)
    frames = _bevt_frame_masker(cfg, "video_mask_type", "beit", cfg.video_mask_ratio)
    tube_range = (cfg.tube_min_share, cfg.tube_max_share)
    cyclic_tube_mask(torch.zeros(0, grid[1] * grid[2], dtype=torch.bool), grid[0], tube_range)  # checks the range
    return lambda b, g: cyclic_tube_mask(frames(b, g), grid[0], tube_range, generator=g)


def _bevt_example(cfg: BEVTCfg, batch_size: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Both streams, as the joint data source gives them: a clip and an image per sample."""
    s, c = cfg.img_size, cfg.in_chans
    return {"video": torch.randn(batch_size, c, cfg.num_frames, s, s, generator=g),
            "image": torch.randn(batch_size, c, s, s, generator=g)}


def _bevt_mask_fn(cfg: BEVTCfg) -> MaskFn:
    video = _bevt_video_masker(cfg)
    image = _bevt_frame_masker(cfg, "image_mask_type", cfg.image_mask_type, cfg.image_mask_ratio)

    def make(batch_size: int, generator: torch.Generator | None, modality: str = "video") -> dict[str, torch.Tensor]:
        # A joint batch holds one image per video view, so both masks have the batch's size.
        return {"mask": video(batch_size, generator), "image_mask": image(batch_size, generator)}
    return make


@register_model("bevt", BEVTCfg, make_mask_fn=_bevt_mask_fn, takes=("video_image",),
                size_recipe={"vit_huge": {"patch_size": 16}, "vit_giant": {"patch_size": 16}},
                example_batch=_bevt_example, visualize=BEVT.reconstruction_views)
def _build_bevt(cfg: BEVTCfg) -> BEVT:
    return BEVT(cfg)
