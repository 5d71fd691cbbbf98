"""Unreadable inputs: the one skip-and-replace reader (:func:`read_item`) and the tally that stops a
run whose data is mostly unreadable (:class:`ReadFailures`).

Every data source (image folders, video clips, caption files and shards) reads through
:func:`read_item`. Training skips an unreadable file and reads a replacement drawn from
(seed, epoch, index, attempt) with :func:`mmmae.data.sampler.mix_seed`, so a sample depends on
neither the worker nor the order; evaluation never replaces, it marks the sample unreadable so
the evaluator leaves it out and lists it. The tally is what keeps skipping from hiding a broken
data set. Each DataLoader worker holds its own copy, so the share is judged per process; the
per-batch ``skipped_*`` counts are what reach the metrics.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Generic, Hashable, Iterable, TypeVar

from mmmae.data.sampler import mix_seed

log = logging.getLogger(__name__)

MIN_ATTEMPTS = 20  # reads before the failed share is judged
T = TypeVar("T")


class ReadFailures:
    """``ok(key)`` after a good read, ``failed(key, name, reason)`` after a bad one. ``failed`` raises a
    RuntimeError naming the files when more than ``max_bad_fraction`` of at least ``min_attempts``
    reads failed, or when every one of ``total`` items has most recently failed.

    ``what`` names the reader in messages, ``noun`` the kind of input ("image", "video").
    """

    def __init__(self, max_bad_fraction: float, what: str, noun: str = "file", *,
                 min_attempts: int = MIN_ATTEMPTS) -> None:
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.max_bad_fraction, self.what, self.noun, self.min_attempts = max_bad_fraction, what, noun, min_attempts
        self.attempts = 0
        self.failures = 0
        self.names: dict[Hashable, str] = {}  # every item that failed once -> its file name
        self.failing: set[Hashable] = set()  # items whose latest read failed
        self.recent: deque[str] = deque(maxlen=10)

    def ok(self, key: Hashable = None) -> None:
        self.attempts += 1
        self.failing.discard(key)  # a partly corrupt file may still give a good sample

    def failed(self, key: Hashable, name: str, reason: str, *, total: int | None = None) -> None:
        self.attempts += 1
        self.failures += 1
        self.names[key] = name
        self.failing.add(key)
        self.recent.append(name)
        log.warning("%s: skipping unreadable %s %s (%s)", self.what, self.noun, name, reason)
        if total is not None and len(self.failing) >= total:
            raise self.all_bad()
        if self.attempts >= self.min_attempts and self.failures > self.max_bad_fraction * self.attempts:
            raise RuntimeError(
                f"{self.what}: {self.failures} of {self.attempts} {self.noun} reads failed "
                f"({self.failures / self.attempts:.1%} > data.max_bad_fraction={self.max_bad_fraction}); "
                f"unreadable {self.noun}s ({len(set(self.names.values()))}): {self.summary()}")

    def all_bad(self) -> RuntimeError:
        return RuntimeError(f"{self.what}: every {self.noun} tried is unreadable ({self.failures} failures): "
                            f"{self.summary()}")

    def summary(self, limit: int = 10) -> str:
        files = sorted(set(self.names.values()))
        more = f" and {len(files) - limit} more" if len(files) > limit else ""
        return ", ".join(files[:limit]) + more


# --- The one skip-and-replace reader ------------------------------------------------------------------

MAX_RETRIES = 50  # replacements one call tries before giving up


def _type_and_message(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


@dataclass(frozen=True)
class ItemRead(Generic[T]):
    """What :func:`read_item` got for one item.

    ``value`` is ``read``'s result (None when evaluation found the item unreadable); ``item`` the item
    it came from (a replacement in training); ``skipped`` the unreadable items passed over on the way;
    ``unreadable`` and ``error`` name the file and the reason when evaluation could not read it.
    """

    value: T | None
    item: int
    skipped: int = 0
    unreadable: str | None = None
    error: str | None = None
    evaluation: bool = False

    @property
    def valid(self) -> bool:
        return self.unreadable is None

    def fields(self) -> dict[str, Any]:
        """The sample fields that record the read: ``skipped`` in training; ``valid``, ``unreadable``
        (the file) and ``error`` (why) in evaluation, which ``collate_dicts`` turns into the batch's
        ``failed`` / ``unreadable`` lists."""
        if self.evaluation:
            return {"valid": self.valid, "unreadable": self.unreadable, "error": self.error}
        return {"skipped": self.skipped}


def replacement(seed: int, epoch: int, index: int, attempt: int, size: int, tried: Iterable[int]) -> int:
    """The item that replaces ``index``'s ``attempt``-th unreadable read: uniform over the ``size``
    items not in ``tried``, from ``random.Random(mix_seed(seed, epoch, index, "replace", attempt))``.
    It depends on nothing else (not the worker, not what this process read before)."""
    excluded = sorted(set(tried))
    if len(excluded) >= size:
        raise ValueError(f"every one of the {size} items was tried")
    k = random.Random(mix_seed(seed, epoch, index, "replace", attempt)).randrange(size - len(excluded))
    for t in excluded:  # the k-th item not tried: step over the tried ones at or below it
        if t > k:
            break
        k += 1
    return k


def read_item(index: int, size: int, read: Callable[[int], T], *, errors: tuple[type[BaseException], ...],
              name: Callable[[int], str], reads: ReadFailures, seed: int = 0, epoch: int = 0, replace: bool = True,
              max_retries: int = MAX_RETRIES, reason: Callable[[BaseException], str] = _type_and_message
              ) -> ItemRead[T]:
    """Read item ``index`` of ``size`` with ``read(i)``, which raises one of ``errors`` for an
    unreadable input (``name(i)`` names its file in messages; ``reason(error)`` says why).

    Training (``replace=True``): an unreadable item is counted in ``reads`` (which raises, naming the
    files, once too many reads fail or every item is known bad) and replaced by
    :func:`replacement`'s draw for (seed, epoch, index, attempt), never an item already tried in
    this call; after ``max_retries`` replacements a RuntimeError names the item and the files.
    Evaluation (``replace=False``): never a replacement; the result is marked unreadable (``valid``
    False, the file and the reason) so the evaluation can leave it out and list it.
    """
    tried = [index]
    current = index
    for attempt in range(max_retries + 1):
        try:
            value = read(current)
        except errors as e:
            why = reason(e)
            if not replace:
                log.warning("%s: unreadable %s %s (%s): left out of the evaluation and listed",
                            reads.what, reads.noun, name(index), why)
                return ItemRead(None, index, 0, name(index), why, evaluation=True)
            reads.failed(current, name(current), why, total=size)
            if len(tried) >= size:
                raise reads.all_bad() from e
            if attempt == max_retries:
                break
            current = replacement(seed, epoch, index, attempt, size, tried)
            tried.append(current)
        else:
            if replace:
                reads.ok(current)
            return ItemRead(value, current, len(tried) - 1, evaluation=not replace)
    raise RuntimeError(f"{reads.what}: item {index}: no readable {reads.noun} after {max_retries + 1} tries; "
                       f"unreadable so far: {reads.summary()}")
