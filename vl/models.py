"""M3AE (Geng et al., 2022, "Multimodal Masked Autoencoders Learn Transferable Representations").

One masked autoencoder over image patches and caption tokens together: the encoder sees
``[cls] + visible patches + visible text tokens`` as one sequence through one shared trunk (each
modality with its own position table and learned type embedding); a light decoder puts an image
mask token or a text mask token at every hidden position and predicts pixels for every patch and
vocabulary logits for every text position. Loss (sec. 3):
``image_weight * MSE(hidden patches) + text_weight * CE(hidden, non-padding text tokens)``.

Facts taken from the reference (young-geng/m3ae_public ``m3ae/model.py`` and ``m3ae_main.py``):

- image and text mask ratios 0.75 / 0.75; ``text_loss_weight`` 0.1 and ``image_loss_weight`` 1.0
  in the code's defaults (its README's CC12M command uses 0.5 for text); ``unpaired_text_loss_weight``
  0.0 (m3ae_main.py: a text-only batch adds nothing unless it is raised; here ``text_only_weight``);
  an image without its caption (the reference's dropped text: all padding) weighs its image loss by
  ``image_loss_weight`` (here ``image_only_weight``, 1.0);
- the image is the [0, 1] picture minus CC12M's mean over its std (m3ae/data.py, the ``captions``
  source here), and the pixel target is those normalised patches as they are (``patch_mse_loss``
  on ``extract_patches(image)``: ``norm_pix_loss=False``);
- text masking draws over all S positions, padding included; padding is excluded as an attention
  key in both encoder and decoder and never counts in the loss;
- cross-entropy is averaged per sample over its hidden non-padding tokens, then over the batch;
- fixed sin-cos tables (MAE's 2-D layout for patches, ``[sin, cos]`` halves in 1-D for text) in
  both encoder and decoder; type embeddings, [cls] and the two mask tokens ~ N(0, 0.02); the text
  embedding table ~ N(0, 1); one shared decoder input projection; the decoder ends in a LayerNorm
  and one linear head per modality;
- the representation used downstream is the [cls] token of the final-normed encoder output
  (``global_pool=False`` in its linear probe and fine-tuning), so ``global_pool="token"`` here.

Where this code differs on purpose: masks are drawn per sample in the data pipeline (the
reference shares one permutation across a device batch). ``norm_pix_loss=True`` (a named option)
normalises each target patch by its own mean and variance, as MAE does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmmae.decoder import TEST_DECODER
from mmmae.encoder import VisionEncoder, init_vit_weights
from mmmae.heads import EncoderCfg, EncoderModel, pool_tokens
from mmmae.heads import vision_encoder_state as core_vision_encoder_state
from mmmae.layers import Block, key_padding_bias
from mmmae.layers.attention import AttnImpl, QkvBias
from mmmae.layers.fixed import register_fixed_buffer
from mmmae.layers.pos_embed import sincos_pos_embed_1d, sincos_pos_embed_2d
from mmmae.masking import check_mask, mask_to_indices, random_mask, restore_tokens
from mmmae.registry import MaskFn, register_model
from mmmae.targets import image_pixel_target, masked_mse
from mmmae.visualize import patch_views

__all__ = ["M3AE", "M3AECfg", "M3AEDecoder", "MultimodalEncoder", "masked_token_cross_entropy", "pool_features",
           "vision_encoder_state"]


@dataclass
class M3AECfg(EncoderCfg):
    img_size: int = 256  # M3AE trains at 256 px
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    image_mask_ratio: float = 0.75
    text_mask_ratio: float = 0.75
    image_weight: float = 1.0  # reference image_loss_weight
    text_weight: float = 0.1  # reference text_loss_weight (code default)
    # Unpaired batches: only ``image`` (weighed like image_loss_weight) or only ``text`` (the
    # reference's unpaired_text_loss_weight, 0.0 in m3ae_main.py).
    image_only_weight: float = 1.0
    text_only_weight: float = 0.0
    tokenizer: str = "openclip"  # the text model's vocabulary (mmmae.vl.tokenizers.build_tokenizer names)
    vocab_size: int = 49408  # open_clip BPE; 30522 for bert-base-uncased (the reference's tokenizer)
    max_len: int = 64  # text positions S (the fixed text table covers 0..max_len-1); captions are cut to it
    norm_pix_loss: bool = False  # the reference regresses the mean/std-normalised patches as they are
    global_pool: str = "token"  # pooled features for encode_image / encode_text: "token" ([cls]) or "avg"


# ----------------------------------------------------------------------------------------- encoder


class MultimodalEncoder(VisionEncoder):
    """The shared trunk with two tokenizers: 2-D patches and text tokens.

    Image tokens: patch embedding + image type embedding + fixed 2-D sin-cos table. Text tokens:
    token embedding + text type embedding + fixed 1-D sin-cos table over positions 0..S-1. They are
    concatenated (image first) into one sequence, hidden tokens are dropped with one combined
    ``ids_keep``, [cls] is prepended, and text padding enters attention as ``key_pad`` only.

    The inherited image-only interface (``forward_features``, ``forward_intermediates``, ``tokenize``)
    includes the image type embedding, so image-only use sees exactly the tokens pretraining saw.
    """

    def __init__(self, img_size: int | tuple[int, int] = 256, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, *,
                 vocab_size: int = 49408, max_len: int = 64, **trunk_kwargs: Any) -> None:
        factory = {k: trunk_kwargs[k] for k in ("device", "dtype") if k in trunk_kwargs}
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio,
                         pos_embed="sincos", **trunk_kwargs)
        self.vocab_size, self.max_len = vocab_size, max_len
        self.text_embed = nn.Embedding(vocab_size, embed_dim, **factory)
        register_fixed_buffer(self, "text_pos_embed", lambda: sincos_pos_embed_1d(embed_dim, max_len).unsqueeze(0))
        self.type_embed = nn.ParameterDict({
            m: nn.Parameter(torch.zeros(1, 1, embed_dim, **factory)) for m in ("image", "text")})

    def init_weights(self) -> None:
        super().init_weights()
        nn.init.normal_(self.text_embed.weight, std=1.0)  # flax nn.Embed(stddev=1.0) in the reference
        for p in self.type_embed.values():
            nn.init.normal_(p, std=0.02)

    def no_weight_decay(self) -> set[str]:
        # The reference's no-decay list: cls, type embeddings, mask tokens and the text embedding table.
        return super().no_weight_decay() | {f"type_embed.{m}" for m in self.type_embed} | {"text_embed.weight"}

    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels (B, C, H, W) -> image tokens (B, Li, D) with the image type embedding, no position."""
        tokens = super().tokenize(x)
        return tokens + self.type_embed["image"].to(tokens.dtype)

    def tokenize_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, S) -> text tokens (B, S, D) with the text type embedding, no position."""
        if ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"text must be (B, S) integer token ids, got {ids.dtype} of shape {tuple(ids.shape)}")
        if ids.shape[1] > self.max_len:
            raise ValueError(f"text has {ids.shape[1]} positions but the model's text table covers "
                             f"max_len={self.max_len}; raise model.max_len")
        if ids.numel() and (int(ids.max()) >= self.vocab_size or int(ids.min()) < 0):
            raise ValueError(f"token ids span [{int(ids.min())}, {int(ids.max())}], outside the model's vocabulary "
                             f"(vocab_size={self.vocab_size}); set model.vocab_size to the tokenizer's")
        tokens = self.text_embed(ids)
        return tokens + self.type_embed["text"].to(tokens.dtype)

    def forward_multimodal(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None,
                           text_pad: torch.Tensor | None = None, *, image_ids_keep: torch.Tensor | None = None,
                           text_ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Image (B, C, H, W) and/or text ids (B, S) with padding (B, S) bool -> (B, 1+Ki+Kt, D).

        ``image_ids_keep`` (B, Ki) / ``text_ids_keep`` (B, Kt) drop hidden tokens (all are kept when
        None). The output holds [cls], then the kept image tokens, then the kept text tokens, each
        group in increasing position order.
        """
        if image is None and text is None:
            raise ValueError("the multimodal encoder needs an image, a text or both")
        tokens, pos, keep, pad = [], [], [], []
        offset = 0
        if image is not None:
            img = self.tokenize(image)
            b, n = img.shape[:2]
            tokens.append(img)
            pos.append(self.pos_embed)
            keep.append(image_ids_keep if image_ids_keep is not None else
                        torch.arange(n, device=img.device).expand(b, n))
            pad.append(torch.zeros(b, n, dtype=torch.bool, device=img.device))
            offset = n
        if text is not None:
            txt = self.tokenize_text(text)
            b, s = txt.shape[:2]
            if tokens and b != tokens[0].shape[0]:
                raise ValueError(f"image batch has {tokens[0].shape[0]} samples but text has {b}")
            if text_pad is None:
                text_pad = torch.zeros(b, s, dtype=torch.bool, device=txt.device)
            elif text_pad.shape != text.shape or text_pad.dtype != torch.bool:
                raise ValueError(f"text_pad must be a bool tensor shaped like text {tuple(text.shape)}, got "
                                 f"{text_pad.dtype} of shape {tuple(text_pad.shape)}")
            tokens.append(txt)
            pos.append(self.text_pos_embed[:, :s])
            keep.append((text_ids_keep if text_ids_keep is not None else
                         torch.arange(s, device=txt.device).expand(b, s)) + offset)
            pad.append(text_pad)
        dropping = image_ids_keep is not None or text_ids_keep is not None
        return self.forward_tokens(torch.cat(tokens, dim=1), pos=torch.cat(pos, dim=1),
                                   ids_keep=torch.cat(keep, dim=1) if dropping else None,
                                   key_pad=torch.cat(pad, dim=1))

    def encode_image(self, images: torch.Tensor, pool: str = "token") -> torch.Tensor:
        """Images (B, C, H, W), nothing hidden -> pooled features (B, D)."""
        return pool_features(self.forward_features(images), self.num_prefix_tokens, pool)

    def encode_text(self, ids: torch.Tensor, pad: torch.Tensor | None = None, pool: str = "token") -> torch.Tensor:
        """Token ids (B, S) with padding (B, S) bool, nothing hidden -> pooled features (B, D)."""
        return pool_features(self.forward_multimodal(text=ids, text_pad=pad), self.num_prefix_tokens, pool, pad)


def pool_features(x: torch.Tensor, num_prefix_tokens: int, pool: str, pad: torch.Tensor | None = None) -> torch.Tensor:
    """(B, P+L, D) -> (B, D): the [cls] token (``"token"``) or the mean over the L tokens that are
    not padding (``"avg"``; ``pad`` (B, L) bool, True = padding)."""
    if pad is None or pool != "avg":
        return pool_tokens(x, num_prefix_tokens, pool)
    x = x[:, num_prefix_tokens:]
    valid = (~pad).unsqueeze(-1).to(x.dtype)
    return (x * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)


# ----------------------------------------------------------------------------------------- decoder


class M3AEDecoder(nn.Module):
    """Encoder tokens of the visible positions -> pixels for every patch and logits for every text position.

    Steps (M3AE sec. 3, following MAE): one shared projection to ``decoder_embed_dim``; per modality,
    its own mask token at the hidden positions (``ids_restore``), its own fixed position table and
    learned type embedding; one transformer over ``[prefix] + image + text`` with text padding
    excluded as keys; a final norm; a linear head per modality.
    """

    def __init__(self, embed_dim: int, patch_dim: int, vocab_size: int, grid_size: tuple[int, int], max_len: int, *,
                 decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4.0, qkv_bias: QkvBias = "qkv", attn_impl: AttnImpl = "auto",
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        d = decoder_embed_dim
        self.decoder_embed = nn.Linear(embed_dim, d, **factory)
        self.mask_token = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, 1, d, **factory)) for m in ("image", "text")})
        self.type_embed = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, 1, d, **factory)) for m in ("image", "text")})
        register_fixed_buffer(self, "image_pos_embed", lambda: sincos_pos_embed_2d(d, grid_size).unsqueeze(0))
        register_fixed_buffer(self, "text_pos_embed", lambda: sincos_pos_embed_1d(d, max_len).unsqueeze(0))
        self.decoder_blocks = nn.ModuleList([
            Block(d, decoder_num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, attn_impl=attn_impl,
                  norm_layer=lambda n: nn.LayerNorm(n, eps=1e-6, **factory), **factory)
            for _ in range(decoder_depth)
        ])
        self.decoder_norm = nn.LayerNorm(d, eps=1e-6, **factory)
        self.image_pred = nn.Linear(d, patch_dim, **factory)
        self.text_pred = nn.Linear(d, vocab_size, **factory)

    def init_weights(self) -> None:
        init_vit_weights(self)
        for p in (*self.mask_token.values(), *self.type_embed.values()):
            nn.init.normal_(p, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {f"{group}.{m}" for group in ("mask_token", "type_embed") for m in ("image", "text")}

    def _fill(self, x: torch.Tensor, ids_restore: torch.Tensor, modality: str, pos: torch.Tensor) -> torch.Tensor:
        """Kept tokens (B, K, Dd) -> all positions (B, L, Dd) with mask tokens, position and type."""
        x = restore_tokens(x, ids_restore, self.mask_token[modality])
        return x + pos.to(x.dtype) + self.type_embed[modality].to(x.dtype)

    def forward(self, prefix: torch.Tensor, image_x: torch.Tensor | None = None,
                image_ids_restore: torch.Tensor | None = None, text_x: torch.Tensor | None = None,
                text_ids_restore: torch.Tensor | None = None, text_pad: torch.Tensor | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """prefix (B, P, D), image_x (B, Ki, D) + image_ids_restore (B, Li), text_x (B, Kt, D) +
        text_ids_restore (B, S) + text_pad (B, S) -> (pixels (B, Li, p*p*C) | None, logits (B, S, V) | None)."""
        parts = [self.decoder_embed(prefix)]
        b, p = prefix.shape[:2]
        pads = [torch.zeros(b, p, dtype=torch.bool, device=prefix.device)]
        n_img = 0
        if image_x is not None:
            assert image_ids_restore is not None
            n_img = image_ids_restore.shape[1]
            parts.append(self._fill(self.decoder_embed(image_x), image_ids_restore, "image", self.image_pos_embed))
            pads.append(torch.zeros(b, n_img, dtype=torch.bool, device=prefix.device))
        if text_x is not None:
            assert text_ids_restore is not None
            s = text_ids_restore.shape[1]
            parts.append(self._fill(self.decoder_embed(text_x), text_ids_restore, "text", self.text_pos_embed[:, :s]))
            pads.append(text_pad if text_pad is not None else torch.zeros(b, s, dtype=torch.bool, device=prefix.device))
        x = torch.cat(parts, dim=1)
        key_pad = torch.cat(pads, dim=1)
        bias = key_padding_bias(key_pad, x.dtype) if bool(key_pad.any()) else None
        for blk in self.decoder_blocks:
            x = blk(x, bias)
        x = self.decoder_norm(x)
        image_out = self.image_pred(x[:, p:p + n_img]) if image_x is not None else None
        text_out = self.text_pred(x[:, p + n_img:]) if text_x is not None else None
        return image_out, text_out


# ------------------------------------------------------------------------------------------- losses


def masked_token_cross_entropy(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """M3AE's text loss: cross-entropy over the ``valid`` positions (hidden and not padding), averaged
    per sample, then over the batch; a sample without valid positions adds 0 (as the reference).

    logits (B, S, V), target (B, S) long, valid (B, S) bool -> scalar. Only the valid positions are
    upcast to fp32 and scored, so the full (B, S, V) logits never get an fp32 copy.
    """
    b = target.shape[0]
    rows = valid.nonzero(as_tuple=True)[0]
    ce = F.cross_entropy(logits[valid].float(), target[valid], reduction="none")
    per_sample = torch.zeros(b, device=ce.device, dtype=ce.dtype).index_add_(0, rows, ce)
    count = valid.sum(dim=1).clamp(min=1).to(ce.dtype)
    return (per_sample / count).mean()


# -------------------------------------------------------------------------------------------- model


def build_multimodal_encoder(cfg: Any, what: str) -> MultimodalEncoder:
    """The M3AE encoder for a config with M3AE's encoder fields (``M3AECfg``, ``RetrievalCfg``), after
    checking the settings it supports; ``what`` names the model in errors."""
    if cfg.num_frames:
        raise ValueError(f"{what} is an image-text model; num_frames must be 0, got {cfg.num_frames}")
    if cfg.pos_embed != "sincos":
        raise ValueError(f"{what} uses fixed 2-D sin-cos image positions; pos_embed must be 'sincos', "
                         f"got {cfg.pos_embed!r}")
    if cfg.rel_pos_bias != "none":
        raise ValueError(f"{what} has no relative position bias over its image + text sequence; rel_pos_bias "
                         f"must be 'none', got {cfg.rel_pos_bias!r}")
    if cfg.global_pool not in ("token", "avg"):
        raise ValueError(f"global_pool must be 'token' or 'avg', got {cfg.global_pool!r}")
    if cfg.global_pool == "token" and not cfg.cls_token:
        raise ValueError("global_pool='token' needs cls_token=True")
    return MultimodalEncoder(
        cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio,
        vocab_size=cfg.vocab_size, max_len=cfg.max_len, qkv_bias=cfg.qkv_bias,
        drop_path_rate=cfg.drop_path_rate, init_values=cfg.init_values or None, cls_token=cfg.cls_token,
        attn_impl=cfg.attn_impl)


class M3AE(EncoderModel):
    """Multimodal masked autoencoder over image-caption pairs.

    ``forward(batch)``: ``image`` (B, C, H, W) and/or ``text`` (B, S) token ids with ``text_pad``
    (B, S) bool (True = padding; all False when absent); masks ``mask`` (B, Li) and ``text_mask``
    (B, S) bool, True = hidden, the same hidden count in every row (drawn here when absent). With
    only ``image`` or only ``text`` the batch is an unpaired one, weighted by ``image_only_weight``
    / ``text_only_weight``.

    Returns ``loss``; ``image_loss`` and ``text_loss`` (detached; 0 for a modality the batch lacks,
    so every rank logs the same keys); with an image ``pred`` (B, Li, p*p*C) and ``mask``; with text
    ``text_logits`` (B, S, V) and ``text_mask`` (all detached).
    """

    def __init__(self, cfg: M3AECfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = build_multimodal_encoder(cfg, "M3AE")
        self.grid_size = self.encoder.grid_size
        self.decoder = M3AEDecoder(
            cfg.embed_dim, cfg.patch_size**2 * cfg.in_chans, cfg.vocab_size, self.grid_size, cfg.max_len,
            decoder_embed_dim=cfg.decoder_embed_dim, decoder_depth=cfg.decoder_depth,
            decoder_num_heads=cfg.decoder_num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,  # type: ignore[arg-type]
            attn_impl=cfg.attn_impl)  # type: ignore[arg-type]

    # -- features for retrieval and probing (the model contract's embedding hooks)

    embedding = "pooled encoder feature (encode_image)"
    text_embedding = "pooled encoder feature of the caption alone (encode_text)"

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> (B, D): the [cls] token (``global_pool="token"``, M3AE's choice) or
        the mean of the patch tokens (``"avg"``), from the final-normed encoder output."""
        return self.encoder.encode_image(images, self.cfg.global_pool)

    def encode_text(self, ids: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, S), padding (B, S) bool -> (B, D): [cls] or the mean over non-padding tokens."""
        return self.encoder.encode_text(ids, pad, self.cfg.global_pool)

    # -- the algorithm

    def forward_encoder(self, image: torch.Tensor | None, text: torch.Tensor | None, text_pad: torch.Tensor | None,
                        image_ids_keep: torch.Tensor | None, text_ids_keep: torch.Tensor | None) -> torch.Tensor:
        """Visible patches (B, Ki of Li) and text tokens (B, Kt of S) -> (B, 1+Ki+Kt, D)."""
        return self.encoder.forward_multimodal(image, text, text_pad, image_ids_keep=image_ids_keep,
                                               text_ids_keep=text_ids_keep)

    def forward_decoder(self, latent: torch.Tensor, image_ids_restore: torch.Tensor | None,
                        text_ids_restore: torch.Tensor | None, text_pad: torch.Tensor | None, num_image_kept: int
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(B, P+Ki+Kt, D) -> pixels (B, Li, p*p*C) | None, text logits (B, S, V) | None."""
        p = self.encoder.num_prefix_tokens
        image_x = latent[:, p:p + num_image_kept] if image_ids_restore is not None else None
        text_x = latent[:, p + num_image_kept:] if text_ids_restore is not None else None
        return self.decoder(latent[:, :p], image_x, image_ids_restore, text_x, text_ids_restore, text_pad)

    def forward_loss(self, image: torch.Tensor | None, pred: torch.Tensor | None, mask: torch.Tensor | None,
                     text: torch.Tensor | None, logits: torch.Tensor | None, text_mask: torch.Tensor | None,
                     text_pad: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Pixel MSE over hidden patches; token cross-entropy over hidden, non-padding text positions."""
        image_loss = text_loss = None
        if image is not None:
            assert pred is not None and mask is not None
            target = image_pixel_target(image, self.cfg.patch_size, self.cfg.norm_pix_loss)
            image_loss = masked_mse(pred, target, mask)
        if text is not None:
            assert logits is not None and text_mask is not None and text_pad is not None
            text_loss = masked_token_cross_entropy(logits, text, text_mask & ~text_pad)
        return image_loss, text_loss

    def _masks(self, batch: dict[str, torch.Tensor], image: torch.Tensor | None, text: torch.Tensor | None
               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        mask = text_mask = None
        if image is not None:
            mask = batch.get("mask")
            if mask is None:  # convenience only: training masks come from the data pipeline
                mask = random_mask(image.shape[0], self.encoder.num_patches, self.cfg.image_mask_ratio).to(image.device)
            check_mask(mask, self.encoder.num_patches)
        if text is not None:
            text_mask = batch.get("text_mask")
            if text_mask is None:
                text_mask = random_mask(text.shape[0], text.shape[1], self.cfg.text_mask_ratio).to(text.device)
            check_mask(text_mask, text.shape[1])
        return mask, text_mask

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image, text = batch.get("image"), batch.get("text")
        if image is None and text is None:
            raise ValueError(f"M3AE needs batch['image'], batch['text'] or both; got keys {sorted(batch)}")
        text_pad = None
        if text is not None:
            text_pad = batch.get("text_pad")
            if text_pad is None:
                text_pad = torch.zeros(text.shape, dtype=torch.bool, device=text.device)
        mask, text_mask = self._masks(batch, image, text)
        img_idx = mask_to_indices(mask) if mask is not None else None
        txt_idx = mask_to_indices(text_mask) if text_mask is not None else None
        latent = self.forward_encoder(image, text, text_pad, img_idx.ids_keep if img_idx else None,
                                      txt_idx.ids_keep if txt_idx else None)
        num_image_kept = img_idx.ids_keep.shape[1] if img_idx else 0
        pred, logits = self.forward_decoder(latent, img_idx.ids_restore if img_idx else None,
                                            txt_idx.ids_restore if txt_idx else None, text_pad, num_image_kept)
        image_loss, text_loss = self.forward_loss(image, pred, mask, text, logits, text_mask, text_pad)
        cfg = self.cfg
        if image_loss is not None and text_loss is not None:
            loss = cfg.image_weight * image_loss + cfg.text_weight * text_loss
        elif image_loss is not None:
            loss = cfg.image_only_weight * image_loss
        else:
            assert text_loss is not None
            loss = cfg.text_only_weight * text_loss
        zero = loss.detach().new_zeros(())
        out = {"loss": loss,
               "image_loss": image_loss.detach() if image_loss is not None else zero,
               "text_loss": text_loss.detach() if text_loss is not None else zero}
        if pred is not None:
            out.update(pred=pred.detach(), mask=mask)
        if logits is not None:
            out.update(text_logits=logits.detach(), text_mask=text_mask)
        return out

    def example_batch(self, batch_size: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
        """A valid random batch on CPU: image, text with ragged padding, and the pipeline's masks."""
        return _m3ae_example(self.cfg, batch_size, torch.Generator().manual_seed(seed))


def random_image_text_batch(cfg: M3AECfg, batch_size: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Random images and token ids with ragged padding (row 0 unpadded), for tests and examples."""
    s = cfg.max_len
    image = torch.randn(batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    lengths = torch.randint(1, s + 1, (batch_size,), generator=g)
    lengths[0] = s  # one row without padding
    text_pad = torch.arange(s)[None, :] >= lengths[:, None]
    text = torch.randint(0, cfg.vocab_size, (batch_size, s), generator=g).masked_fill(text_pad, 0)
    return {"image": image, "text": text, "text_pad": text_pad}


def vision_encoder_state(state: dict[str, torch.Tensor], prefix: str = "encoder.") -> dict[str, torch.Tensor]:
    """An M3AE state dict -> ``encoder.*`` weights for an image-only ``VisionEncoder`` / ``Classifier``
    (the image type embedding folded into the patch bias; see :func:`mmmae.heads.vision_encoder_state`)."""
    return {f"{prefix}{k}": v for k, v in core_vision_encoder_state(state, prefix).items()}


def _m3ae_mask_fn(cfg: M3AECfg) -> MaskFn:
    """Image mask ``mask`` (B, Li) and ``text_mask`` (B, max_len), exact hidden counts per row; a
    text-only batch (``modality="text"``) gets the text mask only. The text mask covers padding
    positions too (as the reference); padding is excluded from attention and from the loss."""
    num_patches = (cfg.img_size // cfg.patch_size) ** 2

    def make(batch_size: int, generator: torch.Generator | None, modality: str = "image") -> dict[str, torch.Tensor]:
        if modality not in ("image", "text"):
            raise ValueError(f"M3AE takes image and/or text batches, got a {modality!r} batch")
        out = {}
        if modality == "image":  # paired (image + text) or image-only batches
            out["mask"] = random_mask(batch_size, num_patches, cfg.image_mask_ratio, generator=generator)
        out["text_mask"] = random_mask(batch_size, cfg.max_len, cfg.text_mask_ratio, generator=generator)
        return out
    return make


# M3AE keeps one decoder (512 wide, 8 blocks, 16 heads) for small/base/large/huge and 16-px patches for
# all of them (young-geng/m3ae_public m3ae/model.py get_transformer_by_config, m3ae_main.py patch_size 16).
M3AE_SIZES: dict[str, dict[str, int]] = {"vit_tiny_test": TEST_DECODER, "vit_huge": {"patch_size": 16},
                                           "vit_giant": {"patch_size": 16}}


def _m3ae_example(cfg: M3AECfg, batch_size: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {**random_image_text_batch(cfg, batch_size, g), **_m3ae_mask_fn(cfg)(batch_size, g)}


@register_model("m3ae", M3AECfg, make_mask_fn=_m3ae_mask_fn, takes=("image_text",), size_recipe=M3AE_SIZES,
                example_batch=_m3ae_example, visualize=patch_views)
def _build_m3ae(cfg: M3AECfg) -> M3AE:
    return M3AE(cfg)
