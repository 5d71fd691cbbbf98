"""Random access to WebDataset-style tar shards: index the members once, then read any one by seek.

A shard is a plain (uncompressed) tar whose members ``<key>.<ext>`` group into samples by key, as in
WebDataset, where a member's key ends at the first dot of its base name (``dir/000123.jpg`` and
``dir/000123.txt`` are one sample, ``dir/000123``). Opening a plain tar reads only its headers, so an
index over many shards is cheap, and a read is one seek and one read: items become addressable by
index like files on disk, which is what the trainer's resumable sampler needs. Video shards
(``mmmae.video.shards``) and caption shards (``mmmae.vl.data.CaptionShards``) are both read this way.
"""

from __future__ import annotations

import os
import tarfile
from typing import NamedTuple


class Member(NamedTuple):
    """Where a member's bytes lie in its shard."""

    name: str  # the member's path inside the tar
    offset: int
    size: int


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's key and extension: ``dir/key.ext.more`` -> (``dir/key``, ``ext.more``), lower-cased
    extension, split at the base name's first dot."""
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(folder, stem) if folder else stem), (ext.lower() if dot else "")


def index_tar(path: str, what: str = "shard") -> list[tuple[str, dict[str, Member]]]:
    """The samples of one shard in order of first appearance: ``(key, {extension: Member})``.

    Raises:
        FileNotFoundError: the shard is missing (``what`` names the kind of shard in messages).
        ValueError: it is not a readable uncompressed tar (a compressed tar cannot be read by seeking).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} not found")
    samples: dict[str, dict[str, Member]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if info.isfile():
                    key, ext = split_key(info.name)
                    samples.setdefault(key, {})[ext] = Member(info.name, info.offset_data, info.size)
    except tarfile.TarError as e:
        raise ValueError(f"{what} {path} is not a readable uncompressed tar (random access seeks in plain tars; "
                         f"a .tar.gz must be unpacked first): {e}") from e
    return list(samples.items())


def read_member(path: str, member: Member) -> bytes:
    """A member's bytes (one seek and one read). Raises OSError when the shard cannot be read or is
    cut short; the message names the shard and the member."""
    with open(path, "rb") as f:
        f.seek(member.offset)
        data = f.read(member.size)
    if len(data) != member.size:
        raise OSError(f"{path}/{member.name}: shard cut short: {len(data)} of {member.size} bytes")
    return data
