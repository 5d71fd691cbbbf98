"""Videos in WebDataset-style tar shards (``tools/prepare_videos.py --shards``), read by random access.

A shard holds ``<key>.<video extension>`` members with ``<key>.json`` (``{"label": int, "path": str}``)
beside them; keys hold no dot, as in WebDataset, where a member's key ends at the first dot of its
name. Shards are plain (uncompressed) tars, indexed once and read by seek (``mmmae.data.tars``).
Items are then addressable by index like files on disk, and the clip dataset's seeded sampling,
skip-and-replace and repeated sampling apply unchanged. An item's path reads ``<shard>/<member>``, so an error names both.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from mmmae.data.tars import Member, index_tar, read_member

from .datasets import VIDEO_EXTENSIONS, Item
from .decoding import VideoDecodeError, VideoReader, open_video

__all__ = ["read_shard_list", "ShardIndex"]


def read_shard_list(path: str | os.PathLike[str], root: str | os.PathLike[str] = "") -> list[str]:
    """Shard paths from a list file (one per line, relative to ``root``, default the list's folder),
    or the one shard ``path`` itself when it is a ``.tar``."""
    path = os.fspath(path)
    if path.endswith(".tar"):
        return [os.path.abspath(path)]
    base = os.fspath(root) or os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        raise ValueError(f"{path}: lists no shards")
    return [os.path.abspath(os.path.join(base, n)) for n in names]


class ShardIndex:
    """Where every video of a set of shards lies: ``items`` ``(shard/member, label)`` in shard order.

    Raises:
        FileNotFoundError: a listed shard is missing.
        ValueError: a shard is not a readable tar, a label is not an integer, or no shard holds a video.
    """

    def __init__(self, shards: Sequence[str]) -> None:
        self._where: dict[str, tuple[str, Member]] = {}
        self.items: list[Item] = []
        for shard in shards:
            self._index(shard)
        if not self.items:
            raise ValueError(f"no videos in the shards {list(shards)[:3]}")

    def _index(self, shard: str) -> None:
        samples = index_tar(shard, "video shard")
        with open(shard, "rb") as f:  # the labels: one handle for all of the shard's small json members
            for _, parts in samples:
                label = -1
                if "json" in parts:
                    f.seek(parts["json"].offset)
                    label = self._label(shard, parts["json"].name, f.read(parts["json"].size))
                for member in parts.values():
                    if os.path.splitext(member.name)[1].lower() in VIDEO_EXTENSIONS:
                        path = f"{shard}/{member.name}"
                        self._where[path] = (shard, member)
                        self.items.append((path, label))

    @staticmethod
    def _label(shard: str, name: str, raw: bytes) -> int:
        try:
            label = json.loads(raw).get("label", -1)
        except (ValueError, AttributeError) as e:
            raise ValueError(f"{shard}/{name}: not a JSON object with a label: {e}") from e
        if not isinstance(label, int) or label < -1:
            raise ValueError(f"{shard}/{name}: label {label!r} is not an integer >= -1")
        return label

    def read_bytes(self, path: str) -> bytes:
        """The stored file of item ``path`` (one seek and one read in its shard)."""
        try:
            shard, member = self._where[path]
        except KeyError:
            raise KeyError(f"{path} is not a video of these shards") from None
        try:
            return read_member(shard, member)
        except OSError as e:
            raise VideoDecodeError(path, f"cannot read the shard: {e}") from e

    def open(self, path: str, backend: str = "auto", *, num_threads: int = 1, device: str = "cpu") -> VideoReader:
        """``open_video`` for an item of these shards (the same arguments), decoding from memory."""
        return open_video(path, backend, num_threads=num_threads, device=device, data=self.read_bytes(path))
