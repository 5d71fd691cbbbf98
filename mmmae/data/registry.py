"""DATASETS: ``data.dataset`` name -> builder(cfg, split, model_cfg) -> Dataset.

Method packages register their sources when imported (the same entry-point discovery as models).
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

from torch.utils.data import Dataset

from mmmae.registry import _ensure_registered

DatasetBuilder = Callable[[Any, str, Any], Dataset]
DATASETS: dict[str, DatasetBuilder] = {}


def register_dataset(name: str) -> Callable[[DatasetBuilder], DatasetBuilder]:
    def deco(fn: DatasetBuilder) -> DatasetBuilder:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        DATASETS[name] = fn
        return fn
    return deco


def build_dataset(cfg: Any, split: str, model_cfg: Any, name: str | None = None) -> Dataset:
    """Build ``data.dataset`` (or ``name``) for ``split`` ("train" or "val")."""
    _ensure_registered()
    name = name or cfg.data.dataset
    if name not in DATASETS:
        near = difflib.get_close_matches(name, DATASETS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise KeyError(f"unknown data.dataset {name!r}{hint}; available: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](cfg, split, model_cfg)
