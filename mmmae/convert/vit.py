"""Converter-only entry points (state dict in, mmmae state dict out), now served by :mod:`mmmae.weights`.

Position tables are fixed sin-cos buffers in mmmae's pretraining models: a released table is checked
against ours instead of loaded, so a layout mismatch is an error rather than a silently shuffled model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmmae.weights.io import read_source
from mmmae.weights.layouts import from_hf_videomae, from_hf_vitmae, from_official_mae, from_official_videomae

__all__ = ["from_hf_videomae", "from_hf_vitmae", "from_official_mae", "from_official_videomae",
           "load_checkpoint_file"]


def load_checkpoint_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's flat state dict (any source :func:`mmmae.weights.read_source` reads), as stored."""
    return read_source(path).state
