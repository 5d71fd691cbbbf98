"""Image-caption data: sources, map-style and streaming datasets, collate, retrieval splits.

Sources become lists of ``CaptionRecord(image_path, captions, image_id)``, one per image (captions
grouped), in file order so everything downstream is deterministic:

- official COCO captions json + image folder (``load_coco_captions``);
- the Karpathy split file ``dataset_coco.json`` (``load_karpathy``);
- a CSV/TSV or JSONL of (image, caption) pairs (``load_pairs_file``);
- WebDataset-style tar shards are streamed instead (``CaptionShards``), read with ``tarfile``.

``load_caption_source`` picks the loader from the file, ``build_caption_dataset`` goes on to the
dataset. Every sample is a dict::

    image     float (3, H, W)  transform(PIL RGB image)
    text      long (S,)        token ids (only with a tokenizer)
    text_pad  bool (S,)        True at padding (only with a tokenizer)
    caption   str
    image_id  int | str
    index     int              the item actually returned (a replacement when an image was bad)
    skipped   int              unreadable images this call skipped before finding a good one

Unreadable images are skipped, not fatal: one warning naming the file, a deterministic replacement,
and the count travels in the sample so it survives DataLoader workers (``collate_captions`` sums it).
A ``max_bad_fraction`` guard still stops a run whose image folder is mostly wrong.
"""

from __future__ import annotations

import csv
import glob
import io
import itertools
import json
import logging
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from mmmae.data.quality import ReadFailures
from mmmae.targets import IMAGE_STATS, image_stats  # named normalisations live in the core
from mmmae.vl.tokenizers import TextTokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "CaptionRecord",
    "load_coco_captions",
    "load_karpathy",
    "load_pairs_file",
    "expand_shard_urls",
    "CaptionSource",
    "load_caption_source",
    "build_caption_dataset",
    "CaptionDataset",
    "CaptionShards",
    "collate_captions",
    "RetrievalSplit",
    "RetrievalImages",
    "IMAGE_STATS",
    "image_stats",
]

ImageId = int | str
Transform = Callable[[Image.Image], torch.Tensor]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


# What PIL raises on missing, truncated or non-image files. Anything else (a transform bug) must
# surface, not be mistaken for bad data.
_BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_MAX_TRIES_PER_ITEM = 1000


class CaptionRecord(NamedTuple):
    """One image and all its captions."""

    image_path: str
    captions: list[str]
    image_id: ImageId


# --------------------------------------------------------------------------------------- sources

def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _coco_records(data: dict[str, Any], images_dir: str, source: str) -> list[CaptionRecord]:
    """COCO captions dict -> records in the order of ``data["images"]``."""
    by_image: dict[int, list[str]] = {}
    files: dict[int, str] = {}
    for img in data["images"]:
        files[img["id"]] = img["file_name"]
        by_image[img["id"]] = []
    orphans = 0
    for ann in data["annotations"]:
        caps = by_image.get(ann["image_id"])
        if caps is None:
            orphans += 1
            continue
        caps.append(str(ann["caption"]).strip())
    if orphans:
        logger.warning("%s: %d captions refer to image ids missing from 'images'; ignored", source, orphans)
    records = [CaptionRecord(os.path.join(images_dir, files[i]), caps, i) for i, caps in by_image.items() if caps]
    if len(records) < len(by_image):
        logger.info("%s: %d images without captions left out", source, len(by_image) - len(records))
    return records


def load_coco_captions(captions_json: str, images_dir: str) -> list[CaptionRecord]:
    """Official COCO captions (``captions_train2017.json``) -> one record per captioned image.

    ``images[].file_name`` is joined to ``images_dir``; ``image_id`` is the COCO id (int).
    """
    return _coco_records(_read_json(captions_json), images_dir, captions_json)


_KARPATHY_SPLITS = ("train", "restval", "val", "test")


def _karpathy_records(data: dict[str, Any], images_root: str, splits: Sequence[str], source: str
                      ) -> list[CaptionRecord]:
    bad = [s for s in splits if s not in _KARPATHY_SPLITS]
    if bad:
        raise ValueError(f"{source}: unknown Karpathy split(s) {bad}; expected some of {_KARPATHY_SPLITS}")
    wanted = set(splits)
    records = []
    for img in data["images"]:
        if img.get("split") not in wanted:
            continue
        caps = [str(s["raw"]).strip() if "raw" in s else " ".join(s["tokens"]) for s in img["sentences"]]
        if not caps:
            continue
        # COCO entries carry filepath (train2014/val2014); Flickr30k entries only a filename.
        path = os.path.join(images_root, img.get("filepath", ""), img["filename"])
        image_id = img.get("cocoid", img.get("imgid", img["filename"]))
        records.append(CaptionRecord(path, caps, image_id))
    return records


def load_karpathy(path: str, images_root: str, splits: Sequence[str] = ("train", "restval")
                  ) -> list[CaptionRecord]:
    """Karpathy split file (``dataset_coco.json`` / ``dataset_flickr30k.json``) -> records.

    Image path is ``images_root/filepath/filename``; the default splits are the usual 113k-image
    COCO training set (train + restval). ``image_id`` is ``cocoid`` (else ``imgid``).
    """
    if isinstance(splits, str):
        splits = (splits,)
    return _karpathy_records(_read_json(path), images_root, tuple(splits), path)


_IMAGE_KEYS = ("image", "image_path", "file_name", "filename", "filepath", "path")
_CAPTION_KEYS = ("caption", "captions", "text")
_ID_KEYS = ("image_id", "id")


def _first_key(keys: Sequence[str], wanted: Sequence[str]) -> str | None:
    return next((k for k in wanted if k in keys), None)


class _Grouper:
    """Groups (image, caption) pairs per image, in order of first appearance."""

    def __init__(self, images_root: str, source: str) -> None:
        self.images_root, self.source = images_root, source
        self.by_path: dict[str, CaptionRecord] = {}

    def add(self, image: str, captions: list[str], image_id: ImageId | None, where: str) -> None:
        if not image:
            raise ValueError(f"{self.source}{where}: empty image path")
        if re.match(r"^[a-z][a-z0-9+.-]*://", image, re.IGNORECASE):
            raise ValueError(f"{self.source}{where}: {image!r} is a URL; download the images and "
                             f"list paths relative to the image root instead")
        rec = self.by_path.get(image)
        if rec is None:
            rec = CaptionRecord(os.path.join(self.images_root, image), [],
                                image if image_id is None else image_id)
            self.by_path[image] = rec
        rec.captions.extend(c.strip() for c in captions)


def _looks_like_image(cell: str) -> bool:
    return cell.strip().lower().rsplit(".", 1)[-1] in IMAGE_EXTS


def _pairs_from_csv(path: str, grouper: _Grouper) -> None:
    with open(path, encoding="utf-8", newline="") as f:
        first_line = f.readline()
        f.seek(0)
        # No csv.Sniffer: captions full of ';' or '|' fool it. A tab-only first line means TSV.
        tabbed = "\t" in first_line and "," not in first_line
        delimiter = "\t" if path.lower().endswith(".tsv") or tabbed else ","
        rows = csv.reader(f, delimiter=delimiter)
        first = next(rows, None)
        if first is None:
            return
        names = [c.strip().lower() for c in first]
        img_key, cap_key = _first_key(names, _IMAGE_KEYS), _first_key(names, _CAPTION_KEYS)
        id_key = _first_key(names, _ID_KEYS)
        if img_key is not None and cap_key is not None:
            img_col, cap_col = names.index(img_key), names.index(cap_key)
            id_col = names.index(id_key) if id_key is not None else None
            pending: Iterator[list[str]] = rows
            start = 2
        elif len(first) == 2 and sum(_looks_like_image(c) for c in first) == 1:
            # Headerless two-column file: the column holding an image file name is the image
            # (CC3M-style TSVs put the caption first).
            img_col = 0 if _looks_like_image(first[0]) else 1
            cap_col, id_col = 1 - img_col, None
            pending = itertools.chain([first], rows)
            start = 1
        else:
            raise ValueError(
                f"{path}: needs a header naming an image column (one of {_IMAGE_KEYS}) and a caption "
                f"column (one of {_CAPTION_KEYS}), or two headerless columns one of which is an image "
                f"file name; first row is {first!r}")
        for line_no, row in enumerate(pending, start):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) <= max(img_col, cap_col):
                raise ValueError(f"{path}:{line_no}: expected at least {max(img_col, cap_col) + 1} "
                                 f"columns, got {row!r}")
            image_id = row[id_col] if id_col is not None and id_col < len(row) else None
            grouper.add(row[img_col].strip(), [row[cap_col]], image_id, f":{line_no}")


def _pairs_from_jsonl(path: str, grouper: _Grouper) -> None:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from e
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
            img_key, cap_key = _first_key(list(obj), _IMAGE_KEYS), _first_key(list(obj), _CAPTION_KEYS)
            if img_key is None or cap_key is None:
                raise ValueError(f"{path}:{line_no}: needs an image key (one of {_IMAGE_KEYS}) and a "
                                 f"caption key (one of {_CAPTION_KEYS}); found {sorted(obj)}")
            caps = obj[cap_key]
            caps = [caps] if isinstance(caps, str) else [str(c) for c in caps]
            id_key = _first_key(list(obj), _ID_KEYS)
            grouper.add(str(obj[img_key]), caps, obj[id_key] if id_key else None, f":{line_no}")


def load_pairs_file(path: str, images_root: str) -> list[CaptionRecord]:
    """CSV/TSV (``image,caption`` header, or detectable headerless) or JSONL of pairs -> records.

    JSONL lines are objects such as ``{"image": "a/b.jpg", "caption": "..."}`` (``captions`` may be a
    list). Image paths are relative to ``images_root``; rows of the same image are grouped, in order
    of first appearance. ``image_id`` is an ``image_id``/``id`` column when present, else the
    relative path.
    """
    grouper = _Grouper(images_root, path)
    if path.lower().endswith(".jsonl"):
        _pairs_from_jsonl(path, grouper)
    else:
        _pairs_from_csv(path, grouper)
    return list(grouper.by_path.values())


_BRACE = re.compile(r"\{([^{}]*)\}")


def _has_magic(path: str) -> bool:
    return re.search(r"[*?[]", path) is not None


def _expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> three names (zero padding kept); ``{x,y}`` -> alternatives."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end():]
    return [out for opt in options for out in _expand_braces(head + opt + tail)]


def expand_shard_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard paths from a path, a glob, a brace list (``shard-{000..003}.tar``), or a list of those.

    Several specs may also be joined with ``::`` (WebDataset's convention). Globs are sorted; a
    literal path that does not exist or a glob that matches nothing is a FileNotFoundError.
    """
    specs = urls.split("::") if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for spec in specs:
        for name in _expand_braces(os.path.expanduser(spec)):
            if _has_magic(name):
                found = sorted(glob.glob(name))
                if not found:
                    raise FileNotFoundError(f"no shard matches {name!r} (from {spec!r})")
                out.extend(found)
            elif os.path.isfile(name):
                out.append(name)
            else:
                raise FileNotFoundError(f"no such shard {name!r} (from {spec!r})")
    return out


def _is_shard_spec(captions: str) -> bool:
    if captions.lower().endswith((".tar", ".tar.gz", ".tgz")):
        return True
    # A pattern only when it is not itself an existing file (paths may contain '[' or '{').
    return not os.path.isfile(captions) and (
        "::" in captions or _has_magic(captions) or _BRACE.search(captions) is not None)


@dataclass
class CaptionSource:
    """What ``load_caption_source`` found: records (map-style) or shard paths (streaming)."""

    kind: str  # "coco" | "karpathy" | "pairs" | "shards"
    records: list[CaptionRecord] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)


def _split_names(split: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(split, str):
        # Karpathy convention: "train" means train + restval (113,287 COCO images).
        return ("train", "restval") if split == "train" else (split,)
    return tuple(split)


def _check_images_exist(records: list[CaptionRecord], images: str) -> None:
    """Fail fast when the image root is wrong, without stat-ing every file of a large set."""
    if not records:
        return
    step = max(1, len(records) // 8)
    probe = records[::step][:8]
    missing = [r.image_path for r in probe if not os.path.isfile(r.image_path)]
    if len(missing) == len(probe):
        raise FileNotFoundError(f"data.images: none of {len(probe)} sampled images exist under "
                                f"{images!r} (e.g. {missing[0]!r})")
    if missing:
        logger.warning("data.images: %d of %d sampled images are missing under %r (e.g. %r); they will "
                       "be skipped", len(missing), len(probe), images, missing[0])


def load_caption_source(captions: str, images: str, split: str | Sequence[str] = "train") -> CaptionSource:
    """Pick the loader from ``captions`` (config key ``data.captions``) and ``images`` (``data.images``).

    - ``.json`` with ``annotations`` -> COCO (the file is the split; ``split`` is not used);
    - ``.json`` whose ``images[]`` carry ``sentences`` -> Karpathy, filtered by ``split`` ("train" =
      train + restval, or "val", "test", or a list);
    - ``.csv`` / ``.tsv`` / ``.jsonl`` -> pairs (an empty ``images`` means the file's own directory);
    - ``.tar`` / glob / brace list -> shards (``images`` is not used).
    """
    if not captions:
        raise ValueError("data.captions is empty: give a COCO/Karpathy json, a csv/jsonl of pairs, or tar shards")
    if _is_shard_spec(captions):
        try:
            return CaptionSource("shards", shards=expand_shard_urls(captions))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"data.captions: {e}") from e
    if not os.path.isfile(captions):
        raise FileNotFoundError(f"data.captions: no such file {captions!r}")
    low = captions.lower()
    if not images and low.endswith((".csv", ".tsv", ".jsonl")):
        images = os.path.dirname(os.path.abspath(captions))  # pairs files often sit beside their images
    if not images or not os.path.isdir(images):
        raise FileNotFoundError(f"data.images: no such directory {images!r} (needed by data.captions={captions!r})")
    if low.endswith(".json"):
        data = _read_json(captions)
        if isinstance(data, dict) and "annotations" in data and "images" in data:
            source = CaptionSource("coco", records=_coco_records(data, images, captions))
        elif (isinstance(data, dict) and isinstance(data.get("images"), list) and data["images"]
              and "sentences" in data["images"][0]):
            source = CaptionSource("karpathy", records=_karpathy_records(
                data, images, _split_names(split), captions))
        else:
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"data.captions: {captions!r} is neither COCO captions (images + annotations) "
                             f"nor a Karpathy split file (images[].sentences); top level: {keys}")
    elif low.endswith((".csv", ".tsv", ".jsonl")):
        source = CaptionSource("pairs", records=load_pairs_file(captions, images))
    else:
        raise ValueError(f"data.captions: cannot tell the format of {captions!r}; expected .json (COCO or "
                         f"Karpathy), .csv/.tsv/.jsonl (pairs), or .tar shards (path, glob or {{000..009}})")
    if not source.records:
        raise ValueError(f"data.captions: {captions!r} gave no image-caption pairs (split={split!r})")
    _check_images_exist(source.records, images)
    logger.info("%s: %d images, %d captions (%s)", captions, len(source.records),
                sum(len(r.captions) for r in source.records), source.kind)
    return source


# ------------------------------------------------------------------------------ image reading

def _load_rgb(src: str | bytes) -> Image.Image:
    """Decode fully (``convert`` forces it), so truncated files fail here and not in the transform."""
    with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
        return im.convert("RGB")


def _rng(*keys: int) -> random.Random:
    """A generator that depends only on ``keys``: a str seed is hashed with SHA-512, so it is the
    same in every process regardless of PYTHONHASHSEED, and distinct key tuples do not collide."""
    return random.Random("rng:" + ",".join(str(int(k)) for k in keys))


def _tokenize_one(tokenizer: TextTokenizer, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids, pad = tokenizer([caption])
    return ids[0], pad[0]


# ------------------------------------------------------------------------------- map-style

class CaptionDataset(Dataset):
    """Map-style image-caption dataset over ``CaptionRecord`` s.

    ``mode="all"``: one item per (image, caption) pair, for captioning-style pretraining passes over
    every caption. ``mode="random"``: one item per image with one of its captions drawn per epoch
    (``set_epoch``), deterministic in (seed, epoch, index), as CLIP-style training on COCO does.

    An unreadable image is skipped: a replacement index is drawn from (seed, epoch, index, attempt),
    and ``sample["skipped"]`` counts the skips. Counters are per process (per DataLoader worker);
    ``set_epoch`` reaches workers only when they are re-created each epoch (``persistent_workers=False``).
    """

    def __init__(self, records_by_image: Sequence[CaptionRecord], transform: Transform,
                 tokenizer: TextTokenizer | None = None, mode: str = "all", seed: int = 0, *,
                 max_bad_fraction: float = 0.05) -> None:
        if mode not in ("all", "random"):
            raise ValueError(f"CaptionDataset mode must be 'all' or 'random', got {mode!r}")
        records = [r for r in records_by_image if r.captions]
        if len(records) < len(records_by_image):
            logger.warning("CaptionDataset: %d images without captions left out", len(records_by_image) - len(records))
        if not records:
            raise ValueError("CaptionDataset: no images with captions")
        self.records = records
        self.transform, self.tokenizer = transform, tokenizer
        self.mode, self.seed, self.epoch = mode, int(seed), 0
        if mode == "all":
            # (image index, caption index) per item; a tensor rather than a list of tuples so forked
            # workers do not copy it page by page through reference counting.
            self._pairs = torch.tensor([(i, j) for i, r in enumerate(records) for j in range(len(r.captions))],
                                       dtype=torch.long)
        self._bad = ReadFailures(max_bad_fraction, "CaptionDataset", "image")

    def __len__(self) -> int:
        return len(self._pairs) if self.mode == "all" else len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Changes the caption drawn per image in ``random`` mode (and replacement draws)."""
        self.epoch = int(epoch)

    def locate(self, index: int) -> tuple[int, int]:
        """Item index -> (image index, caption index) for this epoch."""
        if self.mode == "all":
            i, j = self._pairs[index].tolist()
            return i, j
        n = len(self.records[index].captions)
        return index, _rng(self.seed, self.epoch, index, 0).randrange(n)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        index %= n
        current = index
        skipped = 0
        for attempt in range(_MAX_TRIES_PER_ITEM):
            img_i, cap_i = self.locate(current)
            rec = self.records[img_i]
            try:
                pil = _load_rgb(rec.image_path)
                self._bad.ok(rec.image_path)
                break
            except _BAD_IMAGE_ERRORS as e:
                skipped += 1
                self._bad.failed(rec.image_path, rec.image_path, f"{type(e).__name__}: {e}", total=len(self.records))
                # Salt 1 keeps replacement draws apart from random-mode caption draws (salt 0).
                current = _rng(self.seed, self.epoch, index, 1, attempt).randrange(n)
        else:
            raise RuntimeError(f"CaptionDataset: no readable image after {_MAX_TRIES_PER_ITEM} tries for "
                               f"index {index}; recent failures {list(self._bad.recent)}")
        caption = rec.captions[cap_i]
        sample: dict[str, Any] = {"image": self.transform(pil), "caption": caption, "image_id": rec.image_id,
                                  "index": current, "skipped": skipped}
        if self.tokenizer is not None:
            sample["text"], sample["text_pad"] = _tokenize_one(self.tokenizer, caption)
        return sample


# ------------------------------------------------------------------------------ streaming

def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _split_member_name(name: str) -> tuple[str, str]:
    """WebDataset keys: ``dir/key.ext.more`` -> (``dir/key``, ``ext.more``), split at the basename's first dot."""
    d, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(d, stem) if d else stem), ext.lower() if dot else ""


class CaptionShards(IterableDataset):
    """WebDataset-style tar shards (``key.jpg``/``.jpeg``/``.png``/``.webp`` + ``key.txt``), streamed.

    Shards are split over distributed ranks x DataLoader workers; with fewer shards than that, every
    worker reads all shards and keeps every n-th sample instead, so no worker idles. ``shuffle_buffer
    > 1`` shuffles shard order per epoch (same order on every rank) and samples through a buffer;
    ``<= 1`` streams in file order (evaluation). ``repeat=True`` cycles forever, reshuffling per pass,
    for step-based training where ranks must not run out of data at different times.

    ``index`` is the sample's position within its shard; ``image_id`` its key.
    """

    def __init__(self, urls: str | Sequence[str], transform: Transform, tokenizer: TextTokenizer | None = None,
                 shuffle_buffer: int = 1000, seed: int = 0, *, max_bad_fraction: float = 0.05,
                 repeat: bool = False) -> None:
        super().__init__()
        self.urls = expand_shard_urls(urls)
        self.transform, self.tokenizer = transform, tokenizer
        self.shuffle_buffer, self.seed = int(shuffle_buffer), int(seed)
        self.max_bad_fraction, self.repeat = max_bad_fraction, repeat
        self.epoch = 0
        ReadFailures(max_bad_fraction, "CaptionShards", "image")  # validate now, not inside a worker

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _raw_samples(self, shards: list[str], keep: Callable[[int], bool]
                     ) -> Iterator[tuple[str, int, str, dict[str, bytes]]]:
        """Yields (shard, position in shard, key, {ext: bytes}) for consecutive members sharing a key."""
        ordinal = 0
        for shard in shards:
            pos = 0
            try:
                # Stream mode ("r|*"): sequential reads, gz handled, no seeking over large shards.
                with tarfile.open(shard, mode="r|*") as tar:
                    key, parts = None, {}
                    for member in tar:
                        if not member.isfile():
                            continue
                        k, ext = _split_member_name(member.name)
                        if k != key:
                            if key is not None:
                                if keep(ordinal):
                                    yield shard, pos, key, parts
                                ordinal, pos = ordinal + 1, pos + 1
                            key, parts = k, {}
                        f = tar.extractfile(member)
                        parts[ext] = f.read() if f is not None else b""
                    if key is not None:
                        if keep(ordinal):
                            yield shard, pos, key, parts
                        ordinal += 1
            except (tarfile.TarError, OSError) as e:
                logger.error("CaptionShards: cannot read shard %s after %d samples (%s: %s); going on with the next",
                             shard, pos, type(e).__name__, e)

    def _shuffled(self, items: Iterator[Any], rng: random.Random) -> Iterator[Any]:
        if self.shuffle_buffer <= 1:
            yield from items
            return
        buf: list[Any] = []
        for item in items:
            if len(buf) < self.shuffle_buffer:
                buf.append(item)
                continue
            j = rng.randrange(len(buf))
            buf[j], item = item, buf[j]
            yield item
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world = _dist_rank_world()
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        gid, total = rank * nworkers + wid, world * nworkers
        bad = ReadFailures(self.max_bad_fraction, "CaptionShards", "image")
        epoch, yielded, skipped = self.epoch, 0, 0
        while True:
            shards = list(self.urls)
            if self.shuffle_buffer > 1:
                _rng(self.seed, epoch).shuffle(shards)  # same permutation on every rank and worker
            if len(shards) >= total:
                mine, keep = shards[gid::total], (lambda i: True)
            else:
                mine, keep = shards, (lambda i: i % total == gid)
            stream = self._shuffled(self._raw_samples(mine, keep), _rng(self.seed, epoch, gid, 2))
            for shard, pos, key, parts in stream:
                name = f"{shard}:{key}"
                img_ext = next((e for e in IMAGE_EXTS if e in parts), None)
                caption = parts.get("txt")
                try:
                    if img_ext is None or caption is None:
                        raise ValueError(f"sample has {sorted(parts)}; needs an image ({IMAGE_EXTS}) and txt")
                    pil = _load_rgb(parts[img_ext])
                    bad.ok(name)
                except _BAD_IMAGE_ERRORS as e:
                    skipped += 1
                    bad_name = f"{name}.{img_ext}" if img_ext else name
                    bad.failed(bad_name, bad_name, f"{type(e).__name__}: {e}")
                    continue
                text = caption.decode("utf-8", errors="replace").strip()
                sample: dict[str, Any] = {"image": self.transform(pil), "caption": text, "image_id": key,
                                          "index": pos, "skipped": skipped}
                if self.tokenizer is not None:
                    sample["text"], sample["text_pad"] = _tokenize_one(self.tokenizer, text)
                skipped = 0
                yielded += 1
                yield sample
            if bad.attempts and not yielded:
                raise bad.all_bad()
            if skipped:
                logger.warning("CaptionShards: %d unreadable samples at the end of worker %d's pass were "
                               "not reported in any batch", skipped, gid)
                skipped = 0
            if not self.repeat or not bad.attempts:
                return
            epoch += 1


# -------------------------------------------------------------------------- building, collate

def build_caption_dataset(captions: str, images: str, transform: Transform, tokenizer: TextTokenizer | None,
                          *, split: str | Sequence[str] = "train", mode: str = "all", seed: int = 0,
                          shuffle_buffer: int = 1000, max_bad_fraction: float = 0.05,
                          repeat: bool = False) -> CaptionDataset | CaptionShards:
    """``data.captions`` / ``data.images`` -> a ``CaptionDataset`` (files) or ``CaptionShards`` (tars)."""
    source = load_caption_source(captions, images, split)
    if source.kind == "shards":
        return CaptionShards(source.shards, transform, tokenizer, shuffle_buffer, seed,
                             max_bad_fraction=max_bad_fraction, repeat=repeat)
    return CaptionDataset(source.records, transform, tokenizer, mode, seed, max_bad_fraction=max_bad_fraction)


def collate_captions(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """B samples -> ``image`` (B, 3, H, W), ``text``/``text_pad`` (B, S) when tokenized, ``index`` (B,),
    ``skipped_images`` (int, summed over the batch), and lists ``caption``, ``image_id``."""
    if not samples:
        raise ValueError("collate_captions: empty batch")
    batch: dict[str, Any] = {
        "image": torch.stack([s["image"] for s in samples]),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        "skipped_images": int(sum(s.get("skipped", 0) for s in samples)),
        "caption": [s["caption"] for s in samples],
        "image_id": [s["image_id"] for s in samples],
    }
    if "text" in samples[0]:
        batch["text"] = torch.stack([s["text"] for s in samples])
        batch["text_pad"] = torch.stack([s["text_pad"] for s in samples])
    return batch


# -------------------------------------------------------------------------------- retrieval

class RetrievalImages(Dataset):
    """Unique images of a ``RetrievalSplit``: ``{"image" (3, H, W), "index", "image_id"}``.

    No skipping: a retrieval score over a silently altered image set would not be comparable.
    """

    def __init__(self, image_paths: list[str], image_ids: list[ImageId], transform: Transform) -> None:
        self.image_paths, self.image_ids, self.transform = image_paths, image_ids, transform

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.image_paths[index]
        try:
            pil = _load_rgb(path)
        except _BAD_IMAGE_ERRORS as e:
            raise RuntimeError(f"RetrievalImages: cannot read {path} ({type(e).__name__}: {e})") from e
        return {"image": self.transform(pil), "index": index, "image_id": self.image_ids[index]}


@dataclass
class RetrievalSplit:
    """Image-text retrieval ground truth: ``NI`` unique images, ``NT`` captions.

    ``txt2img`` (NT,) long: the image of each caption. ``img2txt``: per image, its caption indices.
    Image i2t recall@K hits when any of ``img2txt[i]`` is in the top K; t2i when ``txt2img[t]`` is.
    """

    image_paths: list[str]
    image_ids: list[ImageId]
    captions: list[str]
    txt2img: torch.Tensor
    img2txt: list[list[int]]

    @classmethod
    def from_records(cls, records: Sequence[CaptionRecord], max_captions_per_image: int | None = None
                     ) -> RetrievalSplit:
        """``max_captions_per_image=5`` gives the common COCO/Flickr protocol (a few COCO images have 6-7)."""
        paths: list[str] = []
        ids: list[ImageId] = []
        captions: list[str] = []
        txt2img: list[int] = []
        img2txt: list[list[int]] = []
        seen: dict[str, int] = {}
        for rec in records:
            caps = rec.captions[:max_captions_per_image] if max_captions_per_image else rec.captions
            if not caps:
                continue
            i = seen.get(rec.image_path)
            if i is None:  # the same image listed twice (pairs files) stays one gallery entry
                i = seen[rec.image_path] = len(paths)
                paths.append(rec.image_path)
                ids.append(rec.image_id)
                img2txt.append([])
            for c in caps:
                img2txt[i].append(len(captions))
                txt2img.append(i)
                captions.append(c)
        return cls(paths, ids, captions, torch.tensor(txt2img, dtype=torch.long), img2txt)

    @property
    def num_images(self) -> int:
        return len(self.image_paths)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def image_dataset(self, transform: Transform) -> RetrievalImages:
        return RetrievalImages(self.image_paths, self.image_ids, transform)

    def tokenize(self, tokenizer: TextTokenizer, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """All captions -> ids (NT, S), pad (NT, S), in caption-index order."""
        parts = [tokenizer(self.captions[i:i + batch_size]) for i in range(0, len(self.captions), batch_size)]
        if not parts:
            return tokenizer([])
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
