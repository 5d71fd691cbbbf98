"""Image-caption data: sources, map-style datasets over caption files and tar shards, retrieval splits.

Sources become lists of ``CaptionRecord(image_path, captions, image_id)``, one per image (captions
grouped), in file order so everything downstream is deterministic:

- official COCO captions json + image folder (``load_coco_captions``);
- the Karpathy split file ``dataset_coco.json`` (``load_karpathy``);
- a CSV/TSV or JSONL of (image, caption) pairs (``load_pairs_file``);
- WebDataset-style tar shards are indexed and read by seek instead (``CaptionShards``).

``load_caption_source`` picks the loader from the file, ``build_caption_dataset`` goes on to the
dataset. Every sample is a dict::

    image     float (3, H, W)  transform(PIL RGB image)
    text      long (S,)        token ids (only with a tokenizer)
    text_pad  bool (S,)        True at padding (only with a tokenizer)
    caption   str
    image_id  int | str        the image's id (a shard sample's key); a replacement's when one was read
    index     int              the item asked for (what seeds its masks)
    skipped   int              unreadable images this call skipped before finding a good one (training)

Images are read through the one skip-and-replace reader (``mmmae.data.quality.read_item``). In
training an unreadable image is skipped, not fatal: one warning naming the file, a deterministic
replacement, and the count travels in the sample so it survives DataLoader workers (the batch's
``skipped_images``, summed by ``mmmae.data.collate.collate_dicts``); a ``max_bad_fraction`` guard still
stops a run whose image folder is mostly wrong. In evaluation (``replace=False``) nothing is replaced:
the sample has no image, ``valid=False``, the file in ``unreadable`` and the reason in ``error``.
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset

from mmmae.data.quality import ReadFailures, read_item
from mmmae.data.sampler import mix_seed
from mmmae.data.tars import Member, index_tar, read_member
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
    "RetrievalSplit",
    "IMAGE_STATS",
    "image_stats",
]

ImageId = int | str
Transform = Callable[[Image.Image], torch.Tensor]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


# What PIL raises on missing, truncated or non-image files. Anything else (a transform bug) must
# surface, not be mistaken for bad data.
_BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


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
    """What ``load_caption_source`` found: records (caption files) or shard paths (tar shards)."""

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


def _tokenize_one(tokenizer: TextTokenizer, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids, pad = tokenizer([caption])
    return ids[0], pad[0]


def _sample(image: torch.Tensor | None, caption: str | None, image_id: ImageId, index: int,
            tokenizer: TextTokenizer | None, fields: dict[str, Any]) -> dict[str, Any]:
    sample: dict[str, Any] = {"image": image, "caption": caption, "image_id": image_id, "index": index, **fields}
    if tokenizer is not None and caption is not None:
        sample["text"], sample["text_pad"] = _tokenize_one(tokenizer, caption)
    return sample


# ------------------------------------------------------------------------------- map-style

class CaptionDataset(Dataset):
    """Map-style image-caption dataset over ``CaptionRecord`` s.

    ``mode="all"``: one item per (image, caption) pair, for captioning-style pretraining passes over
    every caption. ``mode="random"``: one item per image with one of its captions drawn per epoch
    (``set_epoch``), deterministic in (seed, epoch, index), as CLIP-style training on COCO does.

    Images are read through :func:`mmmae.data.quality.read_item`. Training (``replace=True``): an
    unreadable image is skipped and another item drawn from (seed, epoch, index, attempt), and
    ``sample["skipped"]`` counts the skips. Evaluation (``replace=False``): never a replacement; the
    sample has no image, ``valid=False`` and the file in ``unreadable``. Counters are per process (per
    DataLoader worker); ``set_epoch`` reaches workers only when they are re-created each epoch
    (``persistent_workers=False``).
    """

    def __init__(self, records_by_image: Sequence[CaptionRecord], transform: Transform,
                 tokenizer: TextTokenizer | None = None, mode: str = "all", seed: int = 0, *,
                 max_bad_fraction: float = 0.05, replace: bool = True) -> None:
        if mode not in ("all", "random"):
            raise ValueError(f"CaptionDataset mode must be 'all' or 'random', got {mode!r}")
        records = [r for r in records_by_image if r.captions]
        if len(records) < len(records_by_image):
            logger.warning("CaptionDataset: %d images without captions left out", len(records_by_image) - len(records))
        if not records:
            raise ValueError("CaptionDataset: no images with captions")
        self.records = records
        self.transform, self.tokenizer = transform, tokenizer
        self.mode, self.seed, self.epoch, self.replace = mode, int(seed), 0, replace
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
        return index, random.Random(mix_seed(self.seed, self.epoch, index, "caption")).randrange(n)

    def _path(self, index: int) -> str:
        return self.records[self.locate(index)[0]].image_path

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        index %= n
        got = read_item(index, n, lambda i: _load_rgb(self._path(i)), errors=_BAD_IMAGE_ERRORS, name=self._path,
                        reads=self._bad, seed=self.seed, epoch=self.epoch, replace=self.replace)
        img_i, cap_i = self.locate(got.item)
        rec = self.records[img_i]
        image = self.transform(got.value) if got.valid else None
        return _sample(image, rec.captions[cap_i], rec.image_id, index, self.tokenizer, got.fields())


class CaptionShards(Dataset):
    """WebDataset-style tar shards (``key.jpg``/``.jpeg``/``.png``/``.webp`` + ``key.txt``), read by index.

    The members of every shard are indexed once (``mmmae.data.tars``: shards are plain tars, so this
    reads only their headers) and a sample is read with one seek per member, so the shards behave like
    files on disk: the trainer's resumable distributed sampler shards them over ranks and workers and
    resumes exactly, and unreadable samples (a corrupt image, a key without image or caption) are
    skipped, replaced and counted through :func:`mmmae.data.quality.read_item` as for caption files.
    Items are in shard order, then member order; ``image_id`` is the sample's key and a file reads
    ``<shard>/<member>`` in messages. Compressed shards cannot be read by seeking: unpack them.
    """

    def __init__(self, urls: str | Sequence[str], transform: Transform, tokenizer: TextTokenizer | None = None,
                 seed: int = 0, *, max_bad_fraction: float = 0.05, replace: bool = True) -> None:
        self.urls = expand_shard_urls(urls)
        self.transform, self.tokenizer = transform, tokenizer
        self.seed, self.epoch, self.replace = int(seed), 0, replace
        self.keys: list[str] = []
        self._members: list[tuple[int, Member | None, Member | None]] = []  # (shard, image, caption)
        self._parts: dict[int, list[str]] = {}  # items lacking an image or a caption: what they have
        for s, shard in enumerate(self.urls):
            for key, parts in index_tar(shard, "caption shard"):
                image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
                if image is None or "txt" not in parts:
                    self._parts[len(self.keys)] = sorted(parts)
                self.keys.append(key)
                self._members.append((s, image, parts.get("txt")))
        if not self.keys:
            raise ValueError(f"no samples in the caption shards {self.urls[:3]}")
        self._bad = ReadFailures(max_bad_fraction, "CaptionShards", "image")
        self._by_name: dict[str, int] | None = None  # image name -> item, made on the first open_image

    def __len__(self) -> int:
        return len(self.keys)

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch's replacement draws."""
        self.epoch = int(epoch)

    def name(self, index: int) -> str:
        """``<shard>/<member>`` of item ``index``'s image (its key when it has none)."""
        s, image, _ = self._members[index]
        return f"{self.urls[s]}/{image.name if image is not None else self.keys[index]}"

    def records(self) -> list[CaptionRecord]:
        """The shards as a retrieval gallery: one record per sample that has a caption (read as
        training reads it), naming its image ``<shard>/<member>`` (:meth:`open_image` reads it)."""
        out = []
        for i, (s, _, text) in enumerate(self._members):
            caption = read_member(self.urls[s], text).decode("utf-8", errors="replace").strip() if text else ""
            if caption:
                out.append(CaptionRecord(self.name(i), [caption], self.keys[i]))
        return out

    def open_image(self, name: str) -> Image.Image:
        """The image a record names (:meth:`records`); raises ValueError for a sample without one."""
        if self._by_name is None:
            self._by_name = {self.name(i): i for i in range(len(self))}
        s, image, _ = self._members[self._by_name[name]]
        if image is None:
            raise ValueError(f"{name}: the sample has no image ({', '.join(IMAGE_EXTS)})")
        return _load_rgb(read_member(self.urls[s], image))

    def _read(self, index: int) -> tuple[Image.Image, str]:
        s, image, text = self._members[index]
        if image is None or text is None:
            raise ValueError(f"sample has {self._parts[index]}; needs an image ({', '.join(IMAGE_EXTS)}) and txt")
        caption = read_member(self.urls[s], text).decode("utf-8", errors="replace").strip()
        return _load_rgb(read_member(self.urls[s], image)), caption

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        got = read_item(index, n, self._read, errors=_BAD_IMAGE_ERRORS, name=self.name, reads=self._bad,
                        seed=self.seed, epoch=self.epoch, replace=self.replace)
        if not got.valid:
            return _sample(None, None, self.keys[index], index, self.tokenizer, got.fields())
        pil, caption = got.value
        return _sample(self.transform(pil), caption, self.keys[got.item], index, self.tokenizer, got.fields())


# ----------------------------------------------------------------------------------- building

def build_caption_dataset(captions: str, images: str, transform: Transform, tokenizer: TextTokenizer | None,
                          *, split: str | Sequence[str] = "train", mode: str = "all", seed: int = 0,
                          max_bad_fraction: float = 0.05, replace: bool = True) -> CaptionDataset | CaptionShards:
    """``data.captions`` / ``data.images`` -> a ``CaptionDataset`` (files) or ``CaptionShards`` (tars);
    ``replace`` False for evaluation (unreadable images are listed, never replaced)."""
    source = load_caption_source(captions, images, split)
    if source.kind == "shards":
        return CaptionShards(source.shards, transform, tokenizer, seed, max_bad_fraction=max_bad_fraction,
                             replace=replace)
    return CaptionDataset(source.records, transform, tokenizer, mode, seed, max_bad_fraction=max_bad_fraction,
                          replace=replace)


# -------------------------------------------------------------------------------- retrieval

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

    def tokenize(self, tokenizer: TextTokenizer, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """All captions -> ids (NT, S), pad (NT, S), in caption-index order."""
        parts = [tokenizer(self.captions[i:i + batch_size]) for i in range(0, len(self.captions), batch_size)]
        if not parts:
            return tokenizer([])
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
