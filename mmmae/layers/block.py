"""Pre-norm transformer block (ViT), with stochastic depth and optional layer scale."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from mmmae.layers.attention import Attention, AttnImpl, QkvBias


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole residual branches per sample, rescale the survivors."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """fc1 -> act -> drop -> fc2 -> drop (timm names, so converted weights map one to one)."""

    def __init__(self, in_features: int, hidden_features: int, *, act_layer: Callable[[], nn.Module] = nn.GELU,
                 drop: float = 0.0, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, device=device, dtype=dtype)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features, device=device, dtype=dtype)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    """Per-channel learnable residual scale (CaiT / BEiT ``init_values``)."""

    def __init__(self, dim: int, init_values: float, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), init_values, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """x + attn(norm1(x)), then x + mlp(norm2(x)), each branch through layer scale and drop path.

    ``window_size`` gives the attention its own relative position bias table (BEiT); a bias shared by
    all blocks comes in through ``forward``'s ``attn_bias`` instead.
    """

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0, qkv_bias: QkvBias = "qkv",
                 drop_path: float = 0.0, init_values: float | None = None, attn_impl: AttnImpl = "auto",
                 window_size: tuple[int, int] | None = None, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 act_layer: Callable[[], nn.Module] = nn.GELU, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_impl=attn_impl, window_size=window_size,
                              **factory)
        self.ls1 = LayerScale(dim, init_values, **factory) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, **factory)
        self.ls2 = LayerScale(dim, init_values, **factory) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None,
                token_index: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D); attn_bias broadcastable to (B, heads, N, N); token_index (B or 1, N) for a
        block with its own relative position table (see ``Attention.forward``)."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_bias, token_index)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
