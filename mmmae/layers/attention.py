"""Multi-head self-attention with a fused qkv projection and a per-device kernel choice, and BEiT's
relative position bias (one table per block, or one :class:`RelativePositionBias` shared by all)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmmae.layers.fixed import register_fixed_buffer

QkvBias = Literal["qkv", "qv", "none"]
AttnImpl = Literal["auto", "sdpa", "math"]


def key_padding_bias(key_pad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) bool, True at padding -> (B, 1, 1, L) additive bias (0 or a large negative)."""
    bias = torch.zeros(key_pad.shape, dtype=dtype, device=key_pad.device)
    bias = bias.masked_fill(key_pad, torch.finfo(dtype).min)
    return bias[:, None, None, :]


def num_relative_distances(window_size: tuple[int, int]) -> int:
    """Rows of BEiT's bias table: every (dy, dx) offset between two patches, plus cls-to-token,
    token-to-cls and cls-to-cls (microsoft/unilm beit/modeling_finetune.py, RelativePositionBias)."""
    wh, ww = window_size
    return (2 * wh - 1) * (2 * ww - 1) + 3


def relative_position_index(window_size: tuple[int, int]) -> torch.Tensor:
    """(1 + Wh*Ww, 1 + Wh*Ww) long: the table row for each (query, key) pair of [cls] + the patch grid.

    As BEiT / SimMIM (models/vision_transformer.py, RelativePositionBias): patches i, j (row-major)
    at (yi, xi), (yj, xj) take ``(yi - yj + Wh - 1) * (2*Ww - 1) + (xi - xj + Ww - 1)``; row 0
    (cls as the query) takes R - 3, column 0 (cls as the key) R - 2, and (cls, cls) R - 1, where R
    is :func:`num_relative_distances`.
    """
    wh, ww = window_size
    if wh < 1 or ww < 1:
        raise ValueError(f"window_size must be two positive ints, got {window_size}")
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()  # (Wh*Ww,) row-major, like the patch tokens
    dy = ys[:, None] - ys[None, :] + (wh - 1)  # query minus key, shifted to start at 0
    dx = xs[:, None] - xs[None, :] + (ww - 1)
    r = num_relative_distances(window_size)
    index = torch.empty(wh * ww + 1, wh * ww + 1, dtype=torch.long)
    index[1:, 1:] = dy * (2 * ww - 1) + dx
    index[0, :] = r - 3
    index[:, 0] = r - 2
    index[0, 0] = r - 1
    return index


def gather_relative_position_bias(table: torch.Tensor, index: torch.Tensor,
                                  token_index: torch.Tensor | None = None) -> torch.Tensor:
    """Look the bias of every (query, key) pair up in ``table`` (R, heads).

    ``index`` is :func:`relative_position_index` (1+L, 1+L). Without ``token_index`` the sequence is
    all of [cls] + patches -> (1, heads, 1+L, 1+L). ``token_index`` (B or 1, N) names, for each token
    of a shorter sequence, its row of ``index`` (0 = [cls], 1 + i = patch i) -> (B or 1, heads, N, N).
    """
    # Contiguous, as the official code makes it: SDPA's fused kernels want the key axis at stride 1.
    if token_index is None:
        return table[index].permute(2, 0, 1).unsqueeze(0).contiguous()
    pairs = index[token_index[:, :, None], token_index[:, None, :]]  # (B, N, N)
    return table[pairs].permute(0, 3, 1, 2).contiguous()


class RelativePositionBias(nn.Module):
    """One relative position bias table for every block (SimMIM's ``USE_SHARED_RPB``; BEiT's
    ``use_shared_rel_pos_bias``). ``forward(token_index=None)`` -> (B or 1, heads, N, N), zero at init.

    State-dict keys follow the official ones: ``relative_position_bias_table`` (R, heads). The index is a
    fixed (non-persistent) buffer: the official checkpoints also store ``relative_position_index``,
    which their own loader drops and rebuilds (SimMIM utils.py, remap_pretrained_keys_vit).
    """

    def __init__(self, window_size: tuple[int, int], num_heads: int, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.window_size = (int(window_size[0]), int(window_size[1]))
        self.num_relative_distance = num_relative_distances(self.window_size)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros(self.num_relative_distance, num_heads, device=device, dtype=dtype))
        ws = self.window_size
        register_fixed_buffer(self, "relative_position_index", lambda: relative_position_index(ws))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.relative_position_bias_table)  # BEiT / SimMIM leave the table at zero

    def forward(self, token_index: torch.Tensor | None = None) -> torch.Tensor:
        return gather_relative_position_bias(self.relative_position_bias_table, self.relative_position_index,
                                             token_index)


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

    ``window_size`` (Wh, Ww) gives the block its own relative position bias table over [cls] + a
    Wh x Ww patch grid (BEiT's ``use_rel_pos_bias``; keys ``relative_position_bias_table`` and the fixed
    ``relative_position_index``, as in the official code). Every additive bias (padding, shared or own
    relative bias) reaches SDPA as ``attn_mask``, so the kernel choice above is unchanged.
    """

    CPU_MATH_MAX_LEN = 512

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: QkvBias = "qkv", attn_drop: float = 0.0,
                 proj_drop: float = 0.0, attn_impl: AttnImpl = "auto",
                 window_size: tuple[int, int] | None = None, device: torch.device | None = None,
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
        if window_size is not None:
            ws = (int(window_size[0]), int(window_size[1]))
            self.window_size: tuple[int, int] | None = ws
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros(num_relative_distances(ws), num_heads, **factory))
            register_fixed_buffer(self, "relative_position_index", lambda: relative_position_index(ws))
        else:
            self.window_size = None
            self.relative_position_bias_table = None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, **factory)
        self.proj_drop = nn.Dropout(proj_drop)

    def _use_sdpa(self, x: torch.Tensor) -> bool:
        if self.attn_impl == "auto":
            return x.device.type == "cuda" or x.shape[1] > self.CPU_MATH_MAX_LEN
        return self.attn_impl == "sdpa"

    def own_relative_bias(self, n: int, token_index: torch.Tensor | None) -> torch.Tensor:
        """This block's relative position bias for a sequence of ``n`` tokens -> (B or 1, heads, n, n)."""
        index = self.relative_position_index
        if token_index is None and n != index.shape[0]:
            raise ValueError(f"the relative position bias covers [cls] + {index.shape[0] - 1} patches; got {n} "
                             "tokens without a token_index naming which ones")
        return gather_relative_position_bias(self.relative_position_bias_table, index, token_index)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None,
                token_index: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D); attn_bias broadcastable to (B, heads, L, L), added to the logits; token_index
        (B or 1, L): each token's row in this block's relative position index (only with a table)."""
        b, n, d = x.shape
        if self.relative_position_bias_table is not None:
            own = self.own_relative_bias(n, token_index)
            attn_bias = own if attn_bias is None else attn_bias + own
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
            qkv = F.linear(x, self.qkv.weight, bias)
        else:
            qkv = self.qkv(x)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        drop = self.attn_drop if self.training else 0.0
        if self._use_sdpa(x):
            # SDPA takes a float mask only in the query's dtype (bf16 under autocast).
            mask = attn_bias.to(q.dtype) if attn_bias is not None else None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
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
