"""A per-process tally of input reads that stops a run whose data is mostly unreadable.

Every data source (images, videos, captions) skips an unreadable file and draws another; this tally
is what keeps skipping from hiding a broken data set. Each DataLoader worker holds its own copy, so
the share is judged per process; the per-batch ``skipped_*`` counts are what reach the metrics.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Hashable

log = logging.getLogger(__name__)

MIN_ATTEMPTS = 20  # reads before the failed share is judged


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
