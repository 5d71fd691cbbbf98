"""SOURCES: ``data.dataset`` name -> its typed config, what it yields, and its dataset builder.

A source registers once, with the dataclass of its ``data`` block (a subclass of :class:`DataCfg`,
the fields every source has) and the kind of input it yields (``image``, ``video``, ``image_text``,
``video_image`` or ``omni``), which the config checks against the method before any work starts.
The builder is ``(cfg, split, model_cfg) -> Dataset`` with ``split`` ``train`` or ``val``.
Method packages register their sources when imported (the same entry-point discovery as models).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

from torch.utils.data import Dataset

from mmmae.registry import _ensure_registered

DatasetBuilder = Callable[[Any, str, Any], Dataset]

INPUT_KINDS = ("image", "video", "image_text", "video_image", "omni")


@dataclass
class DataCfg:
    """The fields of every source's ``data`` block."""

    dataset: str = "synthetic"  # which source to read (the registered name)
    batch_size: int = 8  # micro batch per process (loader items)
    num_workers: int = 2
    limit: int = 0  # use only the first N items (debugging, tiny configs)
    # Training: the share of unreadable inputs a run tolerates (each is replaced deterministically);
    # evaluation never replaces, it lists and counts them.
    max_bad_fraction: float = 0.1


@dataclass(frozen=True)
class SourceSpec:
    name: str
    cfg_cls: type  # the data block's dataclass (a DataCfg subclass)
    provides: str  # one of INPUT_KINDS
    build: DatasetBuilder
    # Loader items carry ``data.num_samples`` views each (repeated sampling), so a micro batch holds
    # ``batch_size x num_samples`` samples.
    repeated: bool = False
    # The source's own training batch sampler, (dataset, batch_size, world, rank, seed) -> a batch
    # sampler with set_epoch(epoch, start_batch) (OmniMAE's image/video mixing); None: the trainer's
    # shuffled, resumable shards of the dataset.
    batch_sampler: Callable[[Any, int, int, int, int], Any] | None = None
    # Training batches' device half of the augmentation, (cfg, model_cfg, device) -> batch -> batch or
    # None (video sources with data.gpu_augment: resize, flip and normalise on the device).
    device_transform: Callable[[Any, Any, Any], Any] | None = None


SOURCES: dict[str, SourceSpec] = {}


def register_dataset(name: str, cfg_cls: type, provides: str, *, repeated: bool = False,
                     batch_sampler: Callable[[Any, int, int, int, int], Any] | None = None,
                     device_transform: Callable[[Any, Any, Any], Any] | None = None
                     ) -> Callable[[DatasetBuilder], DatasetBuilder]:
    if not (isinstance(cfg_cls, type) and issubclass(cfg_cls, DataCfg)):
        raise TypeError(f"source {name!r}: its config class must subclass mmmae.data.registry.DataCfg")
    if provides not in INPUT_KINDS:
        raise ValueError(f"source {name!r}: provides={provides!r}; choose one of {INPUT_KINDS}")

    def deco(fn: DatasetBuilder) -> DatasetBuilder:
        if name in SOURCES:
            raise ValueError(f"dataset {name!r} is registered twice")
        SOURCES[name] = SourceSpec(name, cfg_cls, provides, fn, repeated, batch_sampler, device_transform)
        return fn
    return deco


def list_sources() -> list[str]:
    _ensure_registered()
    return sorted(SOURCES)


def get_source(name: str) -> SourceSpec:
    _ensure_registered()
    if name not in SOURCES:
        near = difflib.get_close_matches(name, SOURCES, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise KeyError(f"unknown data.dataset {name!r}{hint}; available: {', '.join(sorted(SOURCES))}")
    return SOURCES[name]


def views_per_item(data: Any) -> int:
    """Samples per loader item: ``data.num_samples`` for a repeated-sampling source, else 1."""
    return max(int(data.num_samples), 1) if get_source(data.dataset).repeated else 1


def limited(dataset: Dataset, limit: int) -> Dataset:
    """``data.limit``: the first ``limit`` items (all of them for 0)."""
    from mmmae.data.sampler import FirstItems
    return FirstItems(dataset, limit) if limit else dataset


def build_dataset(cfg: Any, split: str, model_cfg: Any) -> Dataset:
    """Build the ``data`` block's source for ``split`` ("train" or "val"); ``data.limit`` keeps its first
    items, for every source alike, here (a source with its own batch sampler, which indexes its parts,
    limits each part with :func:`limited`)."""
    spec = get_source(cfg.data.dataset)
    dataset = spec.build(cfg, split, model_cfg)
    return dataset if spec.batch_sampler is not None else limited(dataset, cfg.data.limit)


# The source whose data block describes how loose inputs of a kind are read (extraction, pictures,
# queries) when the config's own source yields something else.
INPUT_SOURCES = {"image": "image_folder", "video": "video_folder"}


def input_data(cfg: Any, kind: str) -> Any:
    """The data block for reading ``kind`` inputs (``image`` or ``video``) outside the training set:
    the config's own ``data`` block when its source reads that kind (e.g. a video list's sampling
    rate and backend), else the defaults of :data:`INPUT_SOURCES`'s source for that kind with the
    config's batch size and workers."""
    from omegaconf import OmegaConf
    own, reader = get_source(cfg.data.dataset), get_source(INPUT_SOURCES[kind])
    if issubclass(own.cfg_cls, reader.cfg_cls):
        return cfg.data
    return OmegaConf.merge(OmegaConf.structured(reader.cfg_cls),
                           {"batch_size": cfg.data.batch_size, "num_workers": cfg.data.num_workers})
