"""Fixed (non-learned, non-persistent) buffers that can be rebuilt after meta-device construction.

Position tables and filter kernels are functions of the configuration, not weights: they are kept
out of state dicts, and a model built on the ``meta`` device gets them back from their recipe when
it is materialised (``mmmae.registry.materialize``). A pickled model carries each recipe as the
table it makes (recipes are often closures over the configuration, which pickle cannot store).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class _Table:
    """A recipe that returns a stored table (what a recipe becomes when its module is pickled)."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    def __call__(self) -> torch.Tensor:
        return self.table.clone()


class _Recipe:
    """``make`` as given; pickled as the table it makes (on CPU)."""

    def __init__(self, make: Callable[[], torch.Tensor]) -> None:
        self.make = make

    def __call__(self) -> torch.Tensor:
        return self.make()

    def __reduce__(self) -> tuple[type, tuple[torch.Tensor]]:
        with torch.device("cpu"):
            return _Table, (self.make(),)


def register_fixed_buffer(module: nn.Module, name: str, make: Callable[[], torch.Tensor]) -> None:
    """Register ``make()`` as a non-persistent buffer and remember how to rebuild it."""
    module.register_buffer(name, make(), persistent=False)
    makers = module.__dict__.setdefault("_fixed_buffer_makers", {})
    makers[name] = _Recipe(make)


def reset_fixed_buffers(root: nn.Module) -> None:
    """Recompute every fixed buffer under ``root`` (on CPU, then moved to the buffer's current device
    and dtype; a buffer still on ``meta`` lands on CPU)."""
    for m in root.modules():
        for name, make in m.__dict__.get("_fixed_buffer_makers", {}).items():
            old = getattr(m, name)
            with torch.device("cpu"):
                fresh = make()
            device = old.device if old.device.type != "meta" else torch.device("cpu")
            setattr(m, name, fresh.to(device=device, dtype=old.dtype if old.is_floating_point() else fresh.dtype))


def release_fixed_buffer(module: nn.Module, name: str) -> Callable[[], torch.Tensor]:
    """Drop the fixed buffer ``name`` (so a learned parameter can take its place); returns its recipe."""
    makers = module.__dict__.get("_fixed_buffer_makers", {})
    if name not in makers:
        raise KeyError(f"{type(module).__name__} has no fixed buffer {name!r}; it has {sorted(makers)}")
    delattr(module, name)
    return makers.pop(name)
