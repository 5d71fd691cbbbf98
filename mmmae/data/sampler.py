"""The one seed scheme (:func:`mix_seed`), samplers (seeded, resumable, distributed) and dataset wrappers
(per-sample seeding, first items)."""

from __future__ import annotations

import hashlib
import math
from typing import Any, Iterator

import torch
from torch.utils.data import Dataset, Sampler


def mix_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any parts with a stable ``repr`` (ints, strings, None): the one seed
    scheme of the data pipeline (samplers, masks, augmentation, replacement draws). Python's hash() is
    salted per process; a linear mix such as ``seed * 1_000_003 + epoch * 10_007 + i`` repeats seeds
    across epochs once a data set has more than 10_007 items; a hash keeps every tuple apart."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class ResumableDistributedSampler(Sampler[int]):
    """Shuffles with a generator seeded by (seed, epoch) and shards across ranks, like
    ``DistributedSampler``, and can start part-way into an epoch (``set_epoch(epoch, start=n)`` skips
    the first n of this rank's indices), so a resumed run sees exactly the data it would have seen."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0) -> None:
        if length <= 0:
            raise ValueError("the dataset is empty")
        self.length, self.num_replicas, self.rank = length, num_replicas, rank
        self.shuffle, self.seed = shuffle, seed
        self.epoch = 0
        self.start = 0
        self.num_samples = math.ceil(length / num_replicas)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, "order"))
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = self.num_samples * self.num_replicas
        order += order[: total - len(order)]  # pad so every rank gets the same count
        return iter(order[self.rank:total:self.num_replicas][self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


class SeededDataset(Dataset):
    """Runs the wrapped dataset's ``__getitem__`` under a CPU RNG seeded by (seed, epoch, index).

    Augmentations that draw from torch's global RNG (torchvision's) then depend only on the sample,
    not on which worker process or at which point of the run it was loaded: that is what makes data
    order, augmentation and masks identical after a resume.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "seed", "epoch"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, self.epoch, index))
            return self.dataset[index]


class FirstItems(Dataset):
    """The first ``limit`` items of a dataset (``data.limit``), keeping its ``set_epoch`` and other
    attributes, which ``torch.utils.data.Subset`` hides."""

    def __init__(self, dataset: Dataset, limit: int) -> None:
        self.dataset, self.limit = dataset, min(int(limit), len(dataset))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.limit

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "limit"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.limit:
            raise IndexError(f"index {index} out of range for {self.limit} items")
        return self.dataset[index]

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of a :class:`ResumableDistributedSampler` (drop_last), resumable at a batch boundary."""

    def __init__(self, length: int, batch_size: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0) -> None:
        self.sampler = ResumableDistributedSampler(length, num_replicas, rank, shuffle, seed)
        self.batch_size = batch_size
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.start_batch = start_batch
        self.sampler.set_epoch(epoch, start=start_batch * self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        it = iter(self.sampler)
        for _ in range(len(self)):
            yield [next(it) for _ in range(self.batch_size)]

    def __len__(self) -> int:
        return self.sampler.num_samples // self.batch_size - self.start_batch


class MixedBatchSampler(Sampler[list[int]]):
    """Homogeneous batches from several sources behind one ``ConcatDataset``: every batch draws one
    source, chosen with the given probabilities by a generator seeded by (seed, epoch, batch), and
    takes its next ``batch_size`` indices of that source (OmniMAE's image / video steps).

    ``sizes`` are the sources' lengths in concatenation order; an epoch is as many batches as the
    sources would give on their own, so each source is seen about once per epoch in expectation.
    """

    def __init__(self, sizes: list[int], probs: list[float], batch_size: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0) -> None:
        if len(sizes) != len(probs) or not sizes:
            raise ValueError("MixedBatchSampler needs one probability per source")
        if any(p < 0 for p in probs) or sum(probs) <= 0:
            raise ValueError(f"source probabilities must be >= 0 with a positive sum, got {probs}")
        self.sizes, self.batch_size, self.seed = sizes, batch_size, seed
        self.probs = torch.tensor(probs, dtype=torch.float64) / sum(probs)
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.samplers = [ResumableDistributedSampler(n, num_replicas, rank, True, seed + i) for i, n in enumerate(sizes)]
        self.num_batches = sum(s.num_samples for s in self.samplers) // batch_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _stream(self, src: int) -> Iterator[int]:
        """Endless shuffled indices of one source (a new permutation per pass)."""
        rep = 0
        while True:
            s = self.samplers[src]
            s.set_epoch(self.epoch * 1000 + rep)
            yield from (self.offsets[src] + i for i in s)
            rep += 1

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, "mix"))
        choice = torch.multinomial(self.probs, self.num_batches, replacement=True, generator=g).tolist()
        streams = [self._stream(i) for i in range(len(self.sizes))]
        for b, src in enumerate(choice):
            batch = [next(streams[src]) for _ in range(self.batch_size)]
            if b >= self.start_batch:  # replay the skipped batches so every stream is where it was
                yield batch

    def __len__(self) -> int:
        return self.num_batches - self.start_batch
