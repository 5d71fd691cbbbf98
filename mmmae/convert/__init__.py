"""Checkpoint conversion between released layouts and mmmae: kept as the converter-only entry points;
the weights layer that reads, converts and loads every layout is :mod:`mmmae.weights`."""

from mmmae.convert.vit import (from_hf_videomae, from_hf_vitmae, from_official_mae, from_official_videomae,
                               load_checkpoint_file)

__all__ = ["from_hf_videomae", "from_hf_vitmae", "from_official_mae", "from_official_videomae",
           "load_checkpoint_file"]
