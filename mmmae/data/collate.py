"""Batch assembly: stack samples and make the batch's masks (masks are made here, not in the model)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils.data import default_collate

from mmmae.data.sampler import mix_seed
from mmmae.registry import MaskFn

def flatten_samples(samples: Sequence[Any]) -> list[dict[str, Any]]:
    """Datasets with repeated sampling return a list of views per item; flatten them into one batch."""
    flat: list[dict[str, Any]] = []
    for s in samples:
        flat.extend(s if isinstance(s, (list, tuple)) else [s])
    return flat


def skip_counter_name(sample: dict[str, Any]) -> str:
    """The batch counter for a sample's skipped inputs, named for what was skipped."""
    for key, name in (("video", "skipped_videos"), ("image", "skipped_images")):
        if key in sample:
            return name
    return "skipped_inputs"


def collate_dicts(samples: Sequence[Any]) -> dict[str, Any]:
    """Stack dict samples; the per-sample ``skipped`` count becomes one integer counter named for
    what was skipped (``skipped_videos``, ``skipped_images``); strings stay lists."""
    flat = flatten_samples(samples)
    counter_name = skip_counter_name(flat[0])
    skipped = sum(int(s.get("skipped", 0)) for s in flat)
    keys = [k for k in flat[0] if k != "skipped"]
    batch: dict[str, Any] = {}
    for k in keys:
        vals = [s[k] for s in flat]
        batch[k] = vals if isinstance(vals[0], (str, type(None))) else default_collate(vals)
    batch[counter_name] = skipped
    return batch


class MaskCollator:
    """Collate, then add the method's masks. Each sample's mask comes from a generator seeded by
    (seed, epoch, sample index, view): it does not depend on which batch, rank or worker the sample
    lands in, so a run resumed on another number of processes, or with another batch size, hides the
    same tokens; and no generator state is shared between DataLoader workers. Batches without sample
    indices get one batch-level draw."""

    def __init__(self, mask_fn: MaskFn | None, seed: int = 0,
                 collate: Callable[[Sequence[Any]], dict[str, Any]] = collate_dicts) -> None:
        self.mask_fn = mask_fn
        self.seed = seed
        self.epoch = 0
        self.collate = collate

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, samples: Sequence[Any]) -> dict[str, Any]:
        batch = self.collate(samples)
        if self.mask_fn is None:
            return batch
        modality = next((k for k in ("video", "image", "text") if k in batch), "image")
        size = len(batch[modality]) if modality in batch else len(next(
            v for v in batch.values() if torch.is_tensor(v) and v.ndim > 0))
        index = batch.get("index")
        if not (torch.is_tensor(index) and index.ndim == 1 and len(index) == size):
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, None))
            batch.update(self.mask_fn(size, g, modality=modality))
            return batch
        views: dict[int, int] = {}  # repeated views of one item get masks of their own
        parts = []
        for i in index.tolist():
            v = views.get(i, 0)
            views[i] = v + 1
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, i, v))
            parts.append(self.mask_fn(1, g, modality=modality))
        batch.update({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
        return batch
