"""Decoders: MAE's light transformer decoder and SimMIM's one-layer heads."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from mmmae.encoder import init_vit_weights
from mmmae.layers import Block
from mmmae.layers.fixed import register_fixed_buffer
from mmmae.layers.attention import AttnImpl
from mmmae.masking import gather_tokens, restore_tokens

# The decoder every method gives the ``vit_tiny_test`` encoder (unit tests, CPU smoke runs).
TEST_DECODER = {"decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}


class MAEDecoder(nn.Module):
    """Encoder tokens of the visible positions -> a prediction for every (or every selected) position.

    Steps (MAE sec. 3): project to ``decoder_embed_dim``; put mask tokens at the hidden positions
    (``ids_restore``); add the decoder's own fixed position table (``pos_table``: (L, D) or a function
    making it, which lets a meta-device model rebuild it); run ``decoder_depth`` blocks; norm;
    project to ``out_dim``. ``ids_decode`` (B, N) optionally runs the decoder on a subset of positions
    only (VideoMAEv2 decoder masking); otherwise all L positions are decoded.
    """

    def __init__(self, embed_dim: int, out_dim: int, pos_table: torch.Tensor | Callable[[], torch.Tensor], *,
                 decoder_embed_dim: int = 512,
                 decoder_depth: int = 8, decoder_num_heads: int = 16, mlp_ratio: float = 4.0,
                 num_prefix_tokens: int = 1, qkv_bias: str = "qkv", attn_impl: AttnImpl = "auto",
                 embed_bias: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_prefix_tokens = num_prefix_tokens
        # VideoMAE's encoder-to-decoder projection has no bias; MAE's has one.
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=embed_bias, **factory)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim, **factory))
        make = pos_table if callable(pos_table) else pos_table.clone

        def table() -> torch.Tensor:
            t = make()
            if t.shape[-1] != decoder_embed_dim:
                raise ValueError(f"decoder position table has width {t.shape[-1]}, expected {decoder_embed_dim}")
            return t.reshape(1, -1, decoder_embed_dim)

        register_fixed_buffer(self, "decoder_pos_embed", table)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,  # type: ignore[arg-type]
                  attn_impl=attn_impl, norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6, **factory), **factory)
            for _ in range(decoder_depth)
        ])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6, **factory)
        self.decoder_pred = nn.Linear(decoder_embed_dim, out_dim, **factory)

    def init_weights(self) -> None:
        init_vit_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def forward(self, x: torch.Tensor, ids_restore: torch.Tensor, *,
                ids_decode: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, P+K, D) with P prefix tokens, ids_restore (B, L) -> (B, L or N, out_dim)."""
        x = self.decoder_embed(x)
        p = self.num_prefix_tokens
        prefix, x = x[:, :p], x[:, p:]
        x = restore_tokens(x, ids_restore, self.mask_token) + self.decoder_pos_embed.to(x.dtype)
        if ids_decode is not None:
            x = gather_tokens(x, ids_decode)
        x = torch.cat([prefix, x], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, p:]


class PixelShuffleHead(nn.Module):
    """SimMIM's decoder: a 1x1 convolution to ``stride^2 * C`` channels and a pixel shuffle.

    Tokens (B, L, D) on an (h, w) grid -> image (B, C, h*stride, w*stride). With stride equal to the
    patch size this is a per-token linear map to the patch's pixels, which is why SimMIM calls it a
    linear head.
    """

    def __init__(self, embed_dim: int, stride: int, out_chans: int = 3, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.stride = stride
        self.proj = nn.Conv2d(embed_dim, stride**2 * out_chans, kernel_size=1, device=device, dtype=dtype)
        self.shuffle = nn.PixelShuffle(stride)

    def init_weights(self) -> None:
        init_vit_weights(self)
        nn.init.xavier_uniform_(self.proj.weight.view(self.proj.weight.shape[0], -1))
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        b, n, d = x.shape
        x = x.transpose(1, 2).reshape(b, d, *grid_size)
        return self.shuffle(self.proj(x))
