"""Fixed sine-cosine position tables.

The 2-D table follows the layout of the official MAE table (``get_2d_sincos_pos_embed``): the first
half of the channels encodes the column (w) coordinate and the second half the row (h) coordinate, and
each half is ``[sin(pos * omega), cos(pos * omega)]`` with ``omega = 1 / 10000 ** (2i / D_half)``.
Keeping that layout makes officially released MAE weights line up with ours position for position.
"""

from __future__ import annotations

import torch


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Sin-cos features of arbitrary (float) positions.

    Args:
        embed_dim: D, must be even.
        positions: any shape; flattened to (N,).
    Returns:
        (N, D) float32: ``[sin(p * omega_0..D/2), cos(p * omega_0..D/2)]``.
    """
    if embed_dim % 2 != 0:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()


def sincos_pos_embed_1d(embed_dim: int, length: int, *, interleave: bool = False) -> torch.Tensor:
    """(L, D) table over positions 0..L-1.

    ``interleave=False``: ``[sin..., cos...]`` halves, MAE's 1-D layout (M3AE's text table).
    ``interleave=True``: ``[sin w0, cos w0, sin w1, cos w1, ...]``, the layout of VideoMAE's
    ``get_sinusoid_encoding_table`` over the flattened T*H*W tokens, which its released weights expect.
    """
    table = sincos_1d(embed_dim, torch.arange(length))
    if not interleave:
        return table
    half = embed_dim // 2
    return torch.stack([table[:, :half], table[:, half:]], dim=-1).reshape(length, embed_dim)


def sincos_pos_embed_2d(embed_dim: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """(H*W, D) table, row-major over an (H, W) token grid, in the official MAE channel layout.

    MAE builds ``np.meshgrid(grid_w, grid_h)`` so its first grid is the column index; the first D/2
    channels therefore encode w and the last D/2 encode h.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    gh, gw = grid_size
    hh, ww = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    emb_w = sincos_1d(embed_dim // 2, ww)
    emb_h = sincos_1d(embed_dim // 2, hh)
    return torch.cat([emb_w, emb_h], dim=1)


def pos_table(kind: str, embed_dim: int, grid_size: tuple[int, ...]) -> torch.Tensor:
    """The fixed table of a token grid: ``"sincos"`` is the 2-D (H, W) or separable 3-D (T, H, W)
    table, ``"sincos_1d"`` VideoMAE's interleaved 1-D table over the flattened grid. -> (L, D)."""
    if kind == "sincos":
        return (sincos_pos_embed_3d if len(grid_size) == 3 else sincos_pos_embed_2d)(embed_dim, grid_size)  # type: ignore[arg-type]
    if kind == "sincos_1d":
        n = 1
        for g in grid_size:
            n *= g
        return sincos_pos_embed_1d(embed_dim, n, interleave=True)
    raise ValueError(f"pos_embed must be 'sincos' or 'sincos_1d', got {kind!r}")


def sincos_pos_embed_3d(embed_dim: int, grid_size: tuple[int, int, int]) -> torch.Tensor:
    """(T*H*W, D) separable space-time table (MAE-ST / OmniMAE style), t-major.

    Like MAE-ST, D/4 channels encode time and the other 3D/4 encode space in the 2-D layout.
    """
    if embed_dim % 16 != 0:
        raise ValueError(f"3-D sin-cos embedding needs a dimension divisible by 16, got {embed_dim}")
    gt, gh, gw = grid_size
    d_t = embed_dim // 4
    d_s = embed_dim - d_t
    spatial = sincos_pos_embed_2d(d_s, (gh, gw))  # (H*W, d_s)
    temporal = sincos_pos_embed_1d(d_t, gt)  # (T, d_t)
    spatial = spatial[None].expand(gt, -1, -1)
    temporal = temporal[:, None].expand(-1, gh * gw, -1)
    return torch.cat([spatial, temporal], dim=-1).reshape(gt * gh * gw, embed_dim)


def interpolate_pos_table(table: torch.Tensor, src_grid: tuple[int, ...], dst_grid: tuple[int, ...], *,
                          num_prefix_tokens: int = 0) -> torch.Tensor:
    """Resample a position table from one token grid to another, as the references fine-tune at a
    new resolution.

    2-D, (H, W) -> (H', W'): facebookresearch/mae util/pos_embed.py ``interpolate_pos_embed`` (from
    DeiT): the patch rows become a (1, D, H, W) image, ``F.interpolate(mode="bicubic",
    align_corners=False)`` resizes it, and it is flattened back row-major; the prefix rows ([cls])
    are kept as they are.
    3-D, (T, H, W) -> (T, H', W'): MCG-NJU/VideoMAE run_class_finetuning.py: each of the T time
    slices is resized the same way over space; time is never interpolated, so T must not change.

    Args:
        table: (1, P+L, D) or (P+L, D), L = prod(src_grid), rows t-major then row-major.
        src_grid / dst_grid: the token grids, both 2-D or both 3-D.
        num_prefix_tokens: P leading rows left untouched.
    Returns:
        the table over ``dst_grid``, (1, P+L', D) or (P+L', D) like the input, in its dtype.
    """
    src, dst = tuple(src_grid), tuple(dst_grid)
    if len(src) not in (2, 3) or len(dst) != len(src):
        raise ValueError(f"grids must both be (H, W) or both (T, H, W), got {src} and {dst}")
    if len(src) == 3 and src[0] != dst[0]:
        raise ValueError(f"a (T, H, W) table is resized over space only (VideoMAE keeps T): got T={src[0]} "
                         f"-> T={dst[0]}; a different frame count needs a table of its own")
    batched = table.ndim == 3
    if not batched:
        table = table.unsqueeze(0)
    if table.ndim != 3 or table.shape[0] != 1:
        raise ValueError(f"table must be (1, P+L, D) or (P+L, D), got {tuple(table.shape)}")
    n_src = 1
    for g in src:
        n_src *= g
    if table.shape[1] != num_prefix_tokens + n_src:
        raise ValueError(f"table has {table.shape[1]} rows but {num_prefix_tokens} prefix rows + grid {src} "
                         f"need {num_prefix_tokens + n_src}")
    if src == dst:
        return table if batched else table[0]
    d = table.shape[-1]
    prefix, body = table[:, :num_prefix_tokens], table[:, num_prefix_tokens:]
    slices, (h, w), (h2, w2) = (src[0] if len(src) == 3 else 1), src[-2:], dst[-2:]
    # (1, T*H*W, D) -> (T, D, H, W): every time slice is one image of D channels.
    grid = body.reshape(slices, h, w, d).permute(0, 3, 1, 2).float()
    grid = torch.nn.functional.interpolate(grid, size=(h2, w2), mode="bicubic", align_corners=False)
    body = grid.permute(0, 2, 3, 1).reshape(1, slices * h2 * w2, d).to(table.dtype)
    out = torch.cat([prefix, body], dim=1)
    return out if batched else out[0]
