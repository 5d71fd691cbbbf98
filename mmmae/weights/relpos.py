"""BEiT / SimMIM relative position bias tables carried to another patch grid, as the reference does
when fine-tuning at a new resolution (microsoft/SimMIM utils.py ``remap_pretrained_keys_vit``, the
code BEiT's run_class_finetuning.py also uses).

A table (R, heads) holds one row per (dy, dx) offset between two patches of a W x W grid,
``(2W - 1)^2`` of them in row-major order of (dy, dx), then ``num_extra_tokens`` = 3 rows for
[cls] (cls-to-token, token-to-cls, cls-to-cls; :func:`mmmae.layers.attention.relative_position_index`).
The reference resizes the offset grid of each head, ``src_size = 2W - 1`` to ``dst_size = 2W' - 1``,
and keeps the [cls] rows as they are:

- the source offsets are placed on a geometric progression: 0, +-1, +-(1 + q), +-(1 + q + q^2), ...
  with ``q`` found by bisection on [1.01, 1.5] so that the outermost source offset lands on
  ``dst_size // 2`` (:func:`geometric_ratio`); near offsets keep their spacing, far ones spread out;
- each head's (src_size, src_size) grid is interpolated at the integer target offsets
  ``-dst_size // 2 ... dst_size // 2`` with scipy's ``interp2d(kind='cubic')``.

On a regular grid ``interp2d`` fits FITPACK's interpolating bicubic spline (``regrid_smth`` with
``s=0``: interior knots at every data point but the second and the second to last, i.e. the not-a-knot
cubic spline along each axis) and evaluates it with the arguments clamped to the data's range (the
edge value outside it). That spline is the tensor product of the 1-D not-a-knot splines, so here it
is one (dst_size, src_size) matrix per axis, built in float64 with torch (scipy is not needed; its
``interp2d`` no longer exists since scipy 1.14). The index buffer is rebuilt from the new grid.
"""

from __future__ import annotations

import torch

NUM_EXTRA_TOKENS = 3  # BEiT / SimMIM: cls-to-token, token-to-cls, cls-to-cls


def geometric_ratio(src_size: int, dst_size: int) -> float:
    """The reference's ratio ``q``: bisection on [1.01, 1.5], stopping when the bracket is under 1e-6,
    of ``1 + q + ... + q^(n-1) > dst_size // 2`` with ``n = src_size // 2``; the last midpoint is ``q``
    (a target beyond the bracket leaves ``q`` at its edge, as in the reference)."""
    left, right = 1.01, 1.5
    n = src_size // 2
    q = left
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q**n) / (1.0 - q) > dst_size // 2:
            right = q
        else:
            left = q
    return q


def source_offsets(src_size: int, q: float) -> torch.Tensor:
    """(src_size,) float64: where the reference places the source offsets, ``-d[n-1] .. -d[0], 0,
    d[0] .. d[n-1]`` with ``d[i] = 1 + q + ... + q^i``."""
    dis, cur = [], 1.0
    for i in range(src_size // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return torch.tensor([-d for d in reversed(dis)] + [0.0] + dis, dtype=torch.float64)


def not_a_knot_matrix(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """(P, M) float64: the linear map from values at the M increasing nodes ``x`` to the not-a-knot
    cubic spline through them, evaluated at ``xq`` (P,) clamped to ``[x[0], x[-1]]``.

    The spline is written in Hermite form: node slopes ``s`` solve the C2 conditions at the interior
    nodes plus not-a-knot at both ends (third derivative continuous at x[1] and x[M-2]), ``s = S y``."""
    x = x.to(torch.float64)
    m = x.numel()
    if m < 4:
        raise ValueError(f"a cubic spline needs at least 4 nodes, got {m}")
    h = x[1:] - x[:-1]  # (M-1,)
    eye = torch.eye(m, dtype=torch.float64)
    delta = (eye[1:] - eye[:-1]) / h[:, None]  # (M-1, M): divided differences as a map of y
    a = torch.zeros(m, m, dtype=torch.float64)
    b = torch.zeros(m, m, dtype=torch.float64)
    for i in range(1, m - 1):
        a[i, i - 1], a[i, i], a[i, i + 1] = h[i], 2 * (h[i - 1] + h[i]), h[i - 1]
        b[i] = 3 * (h[i] * delta[i - 1] + h[i - 1] * delta[i])
    d0 = h[0] + h[1]
    a[0, 0], a[0, 1] = h[1], d0
    b[0] = ((h[0] + 2 * d0) * h[1] * delta[0] + h[0] ** 2 * delta[1]) / d0
    d1 = h[-2] + h[-1]
    a[-1, -2], a[-1, -1] = d1, h[-2]
    b[-1] = (h[-1] ** 2 * delta[-2] + (2 * d1 + h[-1]) * h[-2] * delta[-1]) / d1
    slopes = torch.linalg.solve(a, b)  # (M, M)

    xq = xq.to(torch.float64).clamp(x[0], x[-1])
    k = (torch.searchsorted(x, xq, right=True) - 1).clamp(0, m - 2)  # (P,) interval of each point
    hk = h[k]
    t = (xq - x[k]) / hk
    h00, h10 = 2 * t**3 - 3 * t**2 + 1, t**3 - 2 * t**2 + t
    h01, h11 = -2 * t**3 + 3 * t**2, t**3 - t**2
    return (h00[:, None] * eye[k] + h01[:, None] * eye[k + 1]
            + (h10 * hk)[:, None] * slopes[k] + (h11 * hk)[:, None] * slopes[k + 1])


def interpolate_rel_pos_table(table: torch.Tensor, dst_window: int,
                              num_extra_tokens: int = NUM_EXTRA_TOKENS) -> torch.Tensor:
    """(R, heads) table of a W x W grid -> the table of a ``dst_window`` x ``dst_window`` grid,
    ((2 dst_window - 1)^2 + num_extra_tokens, heads), as SimMIM ``remap_pretrained_keys_vit``.
    The source grid is read from R; the [cls] rows (the last ``num_extra_tokens``) are kept."""
    rows, heads = table.shape
    src_size = int((rows - num_extra_tokens) ** 0.5)
    if src_size * src_size != rows - num_extra_tokens or src_size % 2 == 0:
        raise ValueError(f"a relative position table of {rows} rows is not (2W - 1)^2 + {num_extra_tokens} "
                         f"for a square W x W grid")
    dst_size = 2 * dst_window - 1
    if src_size == dst_size:
        return table
    if src_size < 5:
        raise ValueError(f"a relative position table of a {(src_size + 1) // 2}x{(src_size + 1) // 2} grid cannot "
                         f"be resized: the reference's bicubic spline needs at least a 3x3 grid")
    q = geometric_ratio(src_size, dst_size)
    x = source_offsets(src_size, q)
    t = dst_size // 2
    xq = torch.arange(-t, t + 1, dtype=torch.float64)
    a = not_a_knot_matrix(x, xq)  # (dst_size, src_size), the same map along dy and dx
    z = table[: src_size * src_size].to(torch.float64).reshape(src_size, src_size, heads)
    new = torch.einsum("ir,rch,jc->ijh", a, z, a).reshape(dst_size * dst_size, heads)
    return torch.cat([new.to(table.dtype), table[src_size * src_size:]], dim=0)
