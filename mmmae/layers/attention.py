"""Multi-head self-attention with a fused qkv projection and a per-device kernel choice."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

QkvBias = Literal["qkv", "qv", "none"]
AttnImpl = Literal["auto", "sdpa", "math"]


def key_padding_bias(key_pad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) bool, True at padding -> (B, 1, 1, L) additive bias (0 or a large negative)."""
    bias = torch.zeros(key_pad.shape, dtype=dtype, device=key_pad.device)
    bias = bias.masked_fill(key_pad, torch.finfo(dtype).min)
    return bias[:, None, None, :]


class Attention(nn.Module):
    """Self-attention over (B, L, D).

    ``qkv_bias``: ``"qkv"`` is the usual bias on all three projections (MAE, timm); ``"qv"`` learns
    biases for q and v and keeps the k bias at zero (BEiT / VideoMAE, whose released weights store
    ``q_bias`` and ``v_bias`` only); ``"none"`` has no bias.

    ``attn_impl``: ``"sdpa"`` calls ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels
    on GPU); ``"math"`` is two batched matmuls and a softmax; ``"auto"`` picks sdpa on CUDA, and on
    CPU math for sequences up to ``CPU_MATH_MAX_LEN`` tokens and sdpa beyond. Measured here (2 cores,
    bf16 autocast, forward + backward, width 384, 6 heads): at 197 tokens math 9.5 ms vs sdpa 15.2 ms;
    at 800 tokens 75 vs 68 ms; at 1568 (a VideoMAE decoder) 282 vs 209 ms.
    """

    CPU_MATH_MAX_LEN = 512

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: QkvBias = "qkv", attn_drop: float = 0.0,
                 proj_drop: float = 0.0, attn_impl: AttnImpl = "auto", device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        if qkv_bias not in ("qkv", "qv", "none"):
            raise ValueError(f"qkv_bias must be 'qkv', 'qv' or 'none', got {qkv_bias!r}")
        if attn_impl not in ("auto", "sdpa", "math"):
            raise ValueError(f"attn_impl must be 'auto', 'sdpa' or 'math', got {attn_impl!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv_bias_mode = qkv_bias
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias == "qkv", **factory)
        if qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(dim, **factory))
            self.v_bias = nn.Parameter(torch.zeros(dim, **factory))
        else:
            self.q_bias = self.v_bias = None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, **factory)
        self.proj_drop = nn.Dropout(proj_drop)

    def _use_sdpa(self, x: torch.Tensor) -> bool:
        if self.attn_impl == "auto":
            return x.device.type == "cuda" or x.shape[1] > self.CPU_MATH_MAX_LEN
        return self.attn_impl == "sdpa"

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D); attn_bias broadcastable to (B, heads, L, L), added to the logits."""
        b, n, d = x.shape
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
            qkv = F.linear(x, self.qkv.weight, bias)
        else:
            qkv = self.qkv(x)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        drop = self.attn_drop if self.training else 0.0
        if self._use_sdpa(x):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=drop)
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1)
            if attn_bias is not None:
                logits = logits + attn_bias
            attn = logits.softmax(dim=-1)
            if drop > 0:
                attn = F.dropout(attn, p=drop)
            out = attn @ v
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.proj_drop(self.proj(out))
