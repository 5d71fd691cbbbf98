"""MaskedEncoder: the one ViT trunk every method shares, and the vision encoder built on it.

The trunk knows nothing about pixels or text: a tokenizer turns its modality into tokens (B, L, D)
and a position table (1, L, D); the trunk adds the table, hides tokens one of two ways, runs the
blocks and the final norm.

- ``ids_keep`` drops hidden tokens before the blocks (MAE, VideoMAE, OmniMAE, M3AE): the encoder
  never sees them, which is what makes MAE cheap.
- ``mask`` swaps hidden tokens for a learned mask token *before* the position table is added, so
  the mask token knows where it is (SimMIM, BEiT/BEVT).

Position can also (or only) enter as BEiT's relative position bias on the attention logits:
``rel_pos_bias="shared"`` is one table for all blocks (SimMIM's ViT, ``USE_SHARED_RPB``), ``"block"``
one per block (BEiT's ``use_rel_pos_bias``, SimMIM's fine-tuning). Kept tokens look their bias up by
their grid position, so it also works with ``ids_keep``.
"""

from __future__ import annotations

from typing import Callable, Iterator, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmmae.layers import (Attention, Block, LayerScale, PatchEmbed2d, RelativePositionBias, TubeletEmbed3d,
                          key_padding_bias)
from mmmae.layers.attention import AttnImpl, QkvBias
from mmmae.layers.fixed import register_fixed_buffer
from mmmae.layers.pos_embed import pos_table
from mmmae.masking import check_mask, gather_tokens

RelPosBias = Literal["none", "shared", "block"]


def init_vit_weights(module: nn.Module) -> None:
    """MAE's init: xavier-uniform linears with zero bias, unit LayerNorms; q/v biases and relative
    position bias tables (BEiT-style attention) at zero and layer scales at their init value."""
    for m in module.modules():
        if isinstance(m, Attention):
            for p in (m.q_bias, m.v_bias, m.relative_position_bias_table):
                if p is not None:
                    nn.init.zeros_(p)
        elif isinstance(m, RelativePositionBias):
            m.reset_parameters()
        elif isinstance(m, LayerScale):
            nn.init.constant_(m.gamma, m.init_values)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class MaskedEncoder(nn.Module):
    """Transformer trunk with an optional [cls] token and an optional mask token.

    Shapes: tokens (B, L, D); pos (1 or B, L, D); ids_keep (B, K); mask (B, L) bool, True = hidden;
    key_pad (B, L) bool, True = padding (ignored as attention keys). Output (B, [1+]K or [1+]L, D).

    ``rel_pos_bias`` (``"none"``, ``"shared"``, ``"block"``) needs ``rel_pos_grid`` (H, W), the grid
    the L tokens lie on (row-major); the shared table is ``rel_pos_bias.relative_position_bias_table``,
    per-block tables ``blocks.N.attn.relative_position_bias_table`` (the official key names).
    """

    def __init__(self, embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, *,
                 qkv_bias: QkvBias = "qkv", drop_path_rate: float = 0.0, init_values: float | None = None,
                 cls_token: bool = True, mask_token: bool = False, final_norm: bool = True,
                 attn_impl: AttnImpl = "auto", rel_pos_bias: RelPosBias = "none",
                 rel_pos_grid: tuple[int, int] | None = None, norm_layer: Callable[[int], nn.Module] | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if rel_pos_bias not in ("none", "shared", "block"):
            raise ValueError(f"rel_pos_bias must be 'none', 'shared' or 'block', got {rel_pos_bias!r}")
        if rel_pos_bias != "none" and (rel_pos_grid is None or len(rel_pos_grid) != 2):
            raise ValueError(f"rel_pos_bias={rel_pos_bias!r} needs rel_pos_grid, the (H, W) token grid; "
                             f"got {rel_pos_grid!r}")
        factory = {"device": device, "dtype": dtype}
        norm_layer = norm_layer or (lambda d: nn.LayerNorm(d, eps=1e-6, **factory))
        self.embed_dim = self.num_features = embed_dim
        self.num_prefix_tokens = 1 if cls_token else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **factory)) if cls_token else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **factory)) if mask_token else None
        grid = (int(rel_pos_grid[0]), int(rel_pos_grid[1])) if rel_pos_bias != "none" else None
        self.rel_pos_grid = grid
        self.use_rel_pos_bias = rel_pos_bias == "block"  # the official flag for per-block tables
        self.rel_pos_bias = RelativePositionBias(grid, num_heads, **factory) if rel_pos_bias == "shared" else None
        # Stochastic depth rises linearly over the blocks (computed in Python: works on the meta device).
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=dpr[i],
                  init_values=init_values, attn_impl=attn_impl,
                  window_size=grid if self.use_rel_pos_bias else None, norm_layer=norm_layer, **factory)
            for i in range(depth)
        ])
        self.norm = norm_layer(embed_dim) if final_norm else nn.Identity()
        self.grad_checkpointing = False

    def init_weights(self) -> None:
        init_vit_weights(self)
        for p in (self.cls_token, self.mask_token):
            if p is not None:
                nn.init.normal_(p, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {name for name in ("cls_token", "mask_token") if getattr(self, name) is not None}

    def prepare_tokens(self, tokens: torch.Tensor, *, pos: torch.Tensor | None = None,
                       ids_keep: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                       key_pad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hide, position and prefix tokens; returns (x (B, [1+]N, D), key_pad aligned with x or None)."""
        if ids_keep is not None and mask is not None:
            raise ValueError("pass either ids_keep (drop hidden tokens) or mask (replace them), not both")
        b, n, d = tokens.shape
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("this encoder was built without a mask token (mask_token=False); "
                                 "pass ids_keep to drop hidden tokens instead")
            # Replaced in place, so per-sample hidden counts may differ (BEiT's block-wise masks, BEVT).
            check_mask(mask, n, equal_counts=False)
            # torch.where, not a blend: whatever the hidden tokens hold (even NaN) must not leak through.
            tokens = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        if pos is not None:
            tokens = tokens + pos.to(tokens.dtype)
        if ids_keep is not None:
            if ids_keep.shape[0] != b or ids_keep.ndim != 2:
                raise ValueError(f"ids_keep must be (B={b}, K), got {tuple(ids_keep.shape)}")
            tokens = gather_tokens(tokens, ids_keep)
            if key_pad is not None:
                key_pad = torch.gather(key_pad, 1, ids_keep)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
            if key_pad is not None:
                key_pad = torch.cat([key_pad.new_zeros(b, 1), key_pad], dim=1)
        return tokens, key_pad

    def relative_token_index(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor | None:
        """Each token of x (B, N, D)'s row in the relative position index (0 = [cls], 1 + i = patch i)
        -> (B or 1, N); None when x is all of [cls] + the grid (the index as it stands)."""
        grid = self.rel_pos_grid
        if grid is None:
            return None
        n, prefix, num = x.shape[1], self.num_prefix_tokens, grid[0] * grid[1]
        if ids_keep is None:
            if n != prefix + num:
                raise ValueError(f"the relative position bias covers a {grid[0]}x{grid[1]} token grid "
                                 f"({prefix} + {num} tokens); got {n} tokens")
            return None if prefix else torch.arange(1, n + 1, device=x.device)[None]
        rows = ids_keep + 1
        if prefix:
            rows = torch.cat([rows.new_zeros(rows.shape[0], 1), rows], dim=1)
        return rows

    def iter_blocks(self, x: torch.Tensor, key_pad: torch.Tensor | None = None, *,
                    ids_keep: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """Run the blocks, yielding each block's output (B, N, D) (before the final norm).
        ``ids_keep`` (B, K): which grid tokens x holds, for the relative position bias."""
        bias = key_padding_bias(key_pad, x.dtype) if key_pad is not None and bool(key_pad.any()) else None
        token_index = self.relative_token_index(x, ids_keep)
        if self.rel_pos_bias is not None:
            # One table for all blocks (SimMIM models/vision_transformer.py, forward_features).
            shared = self.rel_pos_bias(token_index)
            bias = shared if bias is None else bias + shared
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, bias, token_index, use_reentrant=False)
            else:
                x = blk(x, bias, token_index)
            yield x

    def forward_tokens(self, tokens: torch.Tensor, *, pos: torch.Tensor | None = None,
                       ids_keep: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                       key_pad: torch.Tensor | None = None) -> torch.Tensor:
        """The trunk on tokens a tokenizer made: hide, position, run the blocks, norm.
        Subclasses whose ``forward`` takes pixels or text still reach the trunk through this."""
        x, key_pad = self.prepare_tokens(tokens, pos=pos, ids_keep=ids_keep, mask=mask, key_pad=key_pad)
        for x in self.iter_blocks(x, key_pad, ids_keep=ids_keep):
            pass
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, *, pos: torch.Tensor | None = None,
                ids_keep: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                key_pad: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_tokens(tokens, pos=pos, ids_keep=ids_keep, mask=mask, key_pad=key_pad)


class VisionEncoder(MaskedEncoder):
    """A trunk with a pixel tokenizer: 2-D patches for images, 3-D tubelets for videos.

    Exposes timm's interface (``forward_features``, ``forward_intermediates``, ``no_weight_decay``,
    ``set_grad_checkpointing``, ``num_features``) so heads and downstream tools treat every vision
    encoder alike. Position tables are fixed sin-cos buffers: ``pos_embed="sincos"`` (2-D for images,
    3-D separable for videos) or ``"sincos_1d"`` (VideoMAE's table over the flattened t*h*w tokens), or
    ``"none"`` (``pos_embed`` is None: SimMIM's ViT, ``USE_APE False``, whose positions come only from
    the relative position bias, ``rel_pos_bias="shared"`` or ``"block"``, images only).
    An image given to a video encoder is repeated over ``tubelet_size`` frames (OmniMAE).
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, *,
                 num_frames: int | None = None, tubelet_size: int = 2, pos_embed: str = "sincos",
                 rel_pos_bias: RelPosBias = "none", **trunk_kwargs) -> None:
        factory = {k: trunk_kwargs[k] for k in ("device", "dtype") if k in trunk_kwargs}
        if pos_embed not in ("sincos", "sincos_1d", "none"):
            raise ValueError(f"pos_embed must be 'sincos', 'sincos_1d' or 'none', got {pos_embed!r}")
        if num_frames is not None and rel_pos_bias != "none":
            raise ValueError(f"the relative position bias is 2-D (BEiT); a video encoder takes rel_pos_bias='none', "
                             f"got {rel_pos_bias!r}")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        grid2d = (size[0] // patch_size, size[1] // patch_size)
        super().__init__(embed_dim, depth, num_heads, mlp_ratio, rel_pos_bias=rel_pos_bias,
                         rel_pos_grid=grid2d if rel_pos_bias != "none" else None, **trunk_kwargs)
        self.is_video = num_frames is not None
        if self.is_video:
            self.patch_embed = TubeletEmbed3d(img_size, patch_size, num_frames, tubelet_size, in_chans,
                                              embed_dim, **factory)
        else:
            self.patch_embed = PatchEmbed2d(img_size, patch_size, in_chans, embed_dim, **factory)
        self.grid_size = self.patch_embed.grid_size
        self.num_patches = self.patch_embed.num_patches
        grid = self.grid_size
        if pos_embed == "none":
            self.pos_embed = None
        else:
            register_fixed_buffer(self, "pos_embed", lambda: pos_table(pos_embed, embed_dim, grid).unsqueeze(0))

    def init_weights(self) -> None:
        super().init_weights()
        self.patch_embed.init_weights()

    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels -> tokens (B, L, D), without position. Images into a video encoder become static clips."""
        if self.is_video and x.ndim == 4:
            pe = self.patch_embed
            if tuple(x.shape[1:]) != (pe.in_chans, *pe.img_size):
                raise ValueError(f"expected images of shape (B, {pe.in_chans}, {pe.img_size[0]}, {pe.img_size[1]}) "
                                 f"or videos of shape (B, {pe.in_chans}, {pe.num_frames}, {pe.img_size[0]}, "
                                 f"{pe.img_size[1]}), got {tuple(x.shape)}")
            x = x.unsqueeze(2).expand(-1, -1, pe.num_frames, -1, -1)
        return self.patch_embed(x)

    def forward_features(self, x: torch.Tensor, *, ids_keep: torch.Tensor | None = None,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pixels (B, C, H, W) or (B, C, T, H, W) -> normed tokens (B, [1+]K or [1+]L, D)."""
        return self.forward_tokens(self.tokenize(x), pos=self.pos_embed, ids_keep=ids_keep, mask=mask)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, *,
                              norm: bool = False, output_fmt: str = "NLC",
                              intermediates_only: bool = False) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm-style intermediate features: the outputs of the last ``indices`` blocks (an int) or of
        the listed blocks, prefix tokens removed, as (B, L, D) (``NLC``) or (B, D, *grid) (``NCHW``)."""
        depth = len(self.blocks)
        take = list(range(depth - indices, depth)) if isinstance(indices, int) else \
            list(range(depth)) if indices is None else [i % depth for i in indices]
        x, _ = self.prepare_tokens(self.tokenize(x), pos=self.pos_embed)
        feats = []
        for i, x in enumerate(self.iter_blocks(x)):
            if i in take:
                y = (self.norm(x) if norm else x)[:, self.num_prefix_tokens:]
                if output_fmt == "NCHW":
                    y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], *self.grid_size)
                feats.append(y)
        if intermediates_only:
            return feats
        return self.norm(x), feats

    def forward(self, x: torch.Tensor, *, ids_keep: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_features(x, ids_keep=ids_keep, mask=mask)
