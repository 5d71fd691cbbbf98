"""Hardware peaks and FLOP counts for utilisation figures (MFU) in the training loop and benchmarks.

MFU = achieved model FLOP/s over the device's peak. On GPUs the peak is the chip's dense bf16 spec
(a table of known parts); on CPUs, which have no single spec figure, it is a dense matmul measured
on the spot at the run's precision.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets.
GPU_BF16_PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(dtype: torch.dtype, device: torch.device, n: int = 2048, seconds: float = 2.0) -> float:
    """Achievable dense matmul throughput at this precision, measured now (n x n x n products)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def spec_peak_tflops(device: torch.device) -> tuple[float, str] | None:
    """The chip's dense bf16 spec for a known GPU: (TFLOP/s, part name), else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for part, peak in GPU_BF16_PEAK_TFLOPS.items():
        if part in name:
            return peak, part
    return None


def device_peak_tflops(device: torch.device, precision: str, *, seconds: float = 0.5) -> tuple[float, str]:
    """The peak an MFU figure divides by, and where it comes from: a known GPU's dense bf16 spec, or
    a matmul measured now at the run's precision (CPUs, unknown GPUs)."""
    spec = spec_peak_tflops(device)
    if spec is not None:
        return spec[0], f"{spec[1]} dense bf16 spec"
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision == "fp16" else torch.float32
    n = 4096 if device.type == "cuda" else 2048
    return matmul_peak_tflops(dtype, device, n=n, seconds=seconds), f"measured {str(dtype).split('.')[-1]} matmul"


def count_flops(fn: Callable[[], Any], model: torch.nn.Module) -> float:
    """FLOPs torch's counter sees while ``fn`` runs. Attention runs its explicit-matmul path meanwhile:
    the counter does not know every fused attention kernel (e.g. SDPA's CPU flash kernel)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmmae.layers import Attention
    attn = [m for m in model.modules() if isinstance(m, Attention)]
    saved = [m.attn_impl for m in attn]
    for m in attn:
        m.attn_impl = "math"
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            fn()
    finally:
        for m, impl in zip(attn, saved):
            m.attn_impl = impl
    return float(counter.get_total_flops())
