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


INPUT_KEYS = ("video", "image")  # a sample whose input is None has nothing to stack: it was unreadable
VERDICT_KEYS = ("valid", "unreadable", "error")  # what a reader says about a read (read_item's fields)


def _readable(sample: dict[str, Any]) -> bool:
    return sample.get("valid", True) is not False and all(sample.get(k, 0) is not None for k in INPUT_KEYS)


def _failure(sample: dict[str, Any]) -> dict[str, Any]:
    """An unreadable sample as the evaluators list it: its file, index, label and the reason."""
    entry: dict[str, Any] = {}
    path = sample.get("unreadable") or sample.get("path")
    if path is not None:
        entry["path"] = path
    entry.update({k: sample[k] for k in ("index", "label", "error") if k in sample})
    return entry


def _column(values: list[Any]) -> Any:
    if any(v is None or isinstance(v, str) for v in values):
        return values  # captions, paths, string ids
    if (all(torch.is_tensor(v) and v.dtype == torch.uint8 for v in values)
            and len({tuple(v.shape) for v in values}) > 1):
        return values  # raw uint8 crops of several sizes, for device-side augmentation (data.gpu_augment)
    return default_collate(values)


def collate_dicts(samples: Sequence[Any]) -> dict[str, Any]:
    """The one collate: dict samples (or lists of repeated views, flattened in order) -> a batch.

    - tensors and numbers are stacked (``default_collate``); a field holding strings or None stays a list,
      and so do uint8 tensors of several shapes (the raw crops that ``data.gpu_augment`` resizes on the device);
    - the per-sample ``skipped`` counts become one integer counter named for what was skipped
      (``skipped_videos``, ``skipped_images``: :func:`skip_counter_name`);
    - samples that carry a reader's verdict (``valid`` / ``error``: evaluation) or whose input
      (``image`` / ``video``) is None were unreadable: they are set aside, not stacked. The batch then
      holds the readable samples only, ``valid`` (their bool tensor, all True), ``unreadable`` (the files
      set aside) and ``failed`` (``{"path", "index", "label", "error"}`` per sample set aside, as far as
      the sample has them). With no readable sample every field is None (``valid`` empty).
    """
    flat = flatten_samples(samples)
    if not flat:
        raise ValueError("collate_dicts: an empty batch")
    skipped = sum(int(s.get("skipped", 0)) for s in flat)
    counter = skip_counter_name(flat[0])
    kept = [s for s in flat if _readable(s)]
    verdicts = len(kept) < len(flat) or any("valid" in s or "error" in s for s in flat)
    skip = {"skipped", *VERDICT_KEYS} if verdicts else {"skipped"}
    keys = [k for k in (kept or flat)[0] if k not in skip]
    batch: dict[str, Any] = {k: _column([s[k] for s in kept]) if kept else None for k in keys}
    if verdicts:
        gone = [s for s in flat if not _readable(s)]
        batch["valid"] = torch.ones(len(kept), dtype=torch.bool)
        batch["unreadable"] = [_failure(s).get("path") for s in gone]
        batch["failed"] = [_failure(s) for s in gone]
    batch[counter] = skipped
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
