"""Checkpoint conversion between released layouts (official repos, Hugging Face, timm) and mmmae."""

from mmmae.convert.vit import (from_hf_videomae, from_hf_vitmae, from_official_mae, from_official_videomae,
                               load_checkpoint_file)

__all__ = ["from_hf_videomae", "from_hf_vitmae", "from_official_mae", "from_official_videomae",
           "load_checkpoint_file"]
