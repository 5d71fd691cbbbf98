"""Video datasets: annotation parsing, a training clip dataset, a multi-view test dataset.

Items are ``(absolute_path, label)`` pairs; label ``-1`` means unlabelled. Unreadable videos are
part of life with scraped datasets (Kinetics loses a few percent of its YouTube clips to
corruption), so the training dataset skips them, counts them in each sample (the count survives
DataLoader worker processes, where a per-dataset tally does not reach the main process) and
stops with a clear error when too many are bad. The test dataset never replaces a video: it
flags the unreadable ones so an evaluator can list them.
"""

from __future__ import annotations

import csv
import difflib
import json
import os
import re
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from mmmae.data.quality import MAX_RETRIES, ReadFailures, read_item
from mmmae.data.sampler import mix_seed

from .decoding import VideoDecodeError, VideoReader, check_decode_device, open_video, resolve_backend
from .sampling import SHORT_MODES, ClipSampler
from .transforms import IMAGENET_MEAN, IMAGENET_STD, ClipTransform, Normalize, ShortSideResize, SpatialCrops, crop_clip

__all__ = [
    "Item",
    "VIDEO_EXTENSIONS",
    "read_class_list",
    "read_annotation_list",
    "list_video_folder",
    "read_ssv2_annotations",
    "REPEAT_MODES",
    "VideoClipDataset",
    "VideoTestDataset",
]

Item = tuple[str, int]
REPEAT_MODES = ("shared_window", "independent")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv")

_INT_RE = re.compile(r"[+-]?\d+")


def read_class_list(class_list: str | os.PathLike[str] | Sequence[str]) -> list[str]:
    """Class names in index order: a file with one name per line, or the names themselves."""
    if isinstance(class_list, (str, os.PathLike)):
        with open(class_list, encoding="utf-8") as f:
            names = [line.strip() for line in f]
        names = [n for n in names if n]
    else:
        names = [str(n) for n in class_list]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"class list {class_list if isinstance(class_list, str) else ''} repeats names: {dup[:5]}")
    return names


def _normalise_name(name: str) -> str:
    # Kinetics folders spell class names with underscores ("arm_wrestling"), lists with spaces.
    return " ".join(name.replace("_", " ").strip().strip('"').lower().split())


class _LabelResolver:
    """Turns a label field into an int: an integer, or a class name looked up in the class list."""

    def __init__(self, class_names: list[str] | None) -> None:
        self.names = class_names
        self.exact = {n: i for i, n in enumerate(class_names or [])}
        self.loose = {_normalise_name(n): i for i, n in enumerate(class_names or [])}

    def known(self, field: str) -> bool:
        """True when ``field`` parses as a label (int or known class name)."""
        return self.lookup(field) is not None

    def lookup(self, field: str) -> int | None:
        field = field.strip()
        if _INT_RE.fullmatch(field):
            return int(field)
        if field in self.exact:
            return self.exact[field]
        return self.loose.get(_normalise_name(field))

    def resolve(self, field: str, where: str) -> int:
        """``where`` ("file:line") goes into every error message."""
        label = self.lookup(field)
        if label is None:
            if self.names is None:
                raise ValueError(f"{where}: label {field!r} is a class name but no class_list was given")
            near = difflib.get_close_matches(field, self.names, n=3, cutoff=0.5)
            if not near:
                loose = difflib.get_close_matches(_normalise_name(field), list(self.loose), n=3, cutoff=0.5)
                near = [self.names[self.loose[m]] for m in loose]
            raise ValueError(f"{where}: unknown class name {field!r}; nearest class names: {near or 'none'}")
        if label < -1:
            raise ValueError(f"{where}: label {label} is negative (only -1, meaning unlabelled, is allowed)")
        if self.names is not None and label >= len(self.names):
            raise ValueError(f"{where}: label {label} is out of range for {len(self.names)} classes")
        return label


def _join(root: str | os.PathLike[str], rel: str) -> str:
    return os.path.abspath(os.path.join(root, rel))


def read_annotation_list(
    path: str | os.PathLike[str],
    root: str | os.PathLike[str],
    class_list: str | os.PathLike[str] | Sequence[str] | None = None,
    fmt: str = "auto",
) -> list[Item]:
    """Parse a ``path label`` list or a ``path,label`` CSV into ``(absolute_path, label)`` items.

    Formats (``fmt="auto"`` picks CSV for a ``.csv`` file or a first line with a comma):

    - space list: ``relative/path.mp4 label`` per line. The path holds no spaces; the line splits
      on its last whitespace. (A class name with spaces, such as ``arm wrestling``, is accepted
      when the whole rest of the line after the first token is a known class name.)
    - CSV: ``path,label``; the first row is a header when its label is neither an integer nor a
      known class name. Quote fields with commas.

    Labels are integer indices or class names resolved through ``class_list`` (a file with one
    name per line, or a sequence of names); matching also accepts underscores for spaces and
    any case. Blank lines and lines starting with ``#`` are skipped.

    Raises:
        ValueError: a malformed line or unknown class name; the message names the file, the
            line and, for names, the nearest class names.
    """
    path = os.fspath(path)
    names = read_class_list(class_list) if class_list is not None else None
    resolver = _LabelResolver(names)
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().splitlines()
    if fmt == "auto":
        first = next((ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")), "")
        fmt = "csv" if path.lower().endswith(".csv") or "," in first else "space"
    if fmt not in ("csv", "space"):
        raise ValueError(f"fmt must be 'auto', 'csv' or 'space', got {fmt!r}")

    items: list[Item] = []
    if fmt == "csv":
        numbered = [(n, ln) for n, ln in enumerate(lines, 1) if ln.strip() and not ln.lstrip().startswith("#")]
        for k, (lineno, row) in enumerate(zip((n for n, _ in numbered), csv.reader(ln for _, ln in numbered))):
            where = f"{path}:{lineno}"
            if len(row) != 2:
                raise ValueError(f"{where}: expected 2 CSV columns 'path,label', got {len(row)}: {row}")
            rel, field = row[0].strip(), row[1].strip()
            if k == 0 and not resolver.known(field):
                continue  # header row
            items.append((_join(root, rel), resolver.resolve(field, where)))
        return items

    for lineno, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{path}:{lineno}"
        parts = text.rsplit(None, 1)
        if len(parts) != 2:
            raise ValueError(f"{where}: expected 'path label', got {text!r}")
        rel, field = parts
        if any(c.isspace() for c in rel):
            head, rest = text.split(None, 1)
            if resolver.known(rest):
                rel, field = head, rest
            else:
                raise ValueError(
                    f"{where}: more than two fields in {text!r}; paths in a space-separated list "
                    "cannot contain spaces (use the CSV form)"
                )
        items.append((_join(root, rel), resolver.resolve(field, where)))
    return items


def list_video_folder(root: str | os.PathLike[str], extensions: Sequence[str] = VIDEO_EXTENSIONS) -> list[Item]:
    """Every video under ``root`` (recursively, sorted, extensions matched case-insensitively),
    unlabelled (label -1): for pretraining on raw footage or extracting embeddings."""
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()  # os.walk visits directories in this order: keep it deterministic
        for name in sorted(filenames):
            if name.lower().endswith(exts):
                items.append((os.path.abspath(os.path.join(dirpath, name)), -1))
    return items


def read_ssv2_annotations(
    annotation_json: str | os.PathLike[str],
    labels_json: str | os.PathLike[str],
    root: str | os.PathLike[str],
    extension: str = ".webm",
) -> list[Item]:
    """Something-Something v2: ``train.json`` / ``validation.json`` (a list of
    ``{"id", "template", "placeholders", ...}``) with ``labels.json`` (template text -> index
    string). The label is the template with its ``[`` ``]`` removed; the video is
    ``<root>/<id><extension>``. Entries without a template (the test split) get label -1.
    """
    with open(labels_json, encoding="utf-8") as f:
        labels = {name: int(idx) for name, idx in json.load(f).items()}
    with open(annotation_json, encoding="utf-8") as f:
        entries = json.load(f)
    if not isinstance(entries, list):
        raise ValueError(f"{annotation_json}: expected a JSON list of videos, got {type(entries).__name__}")
    items = []
    for k, entry in enumerate(entries):
        video = _join(root, f"{entry['id']}{extension}")
        template = entry.get("template")
        if template is None:
            items.append((video, -1))
            continue
        name = template.replace("[", "").replace("]", "")
        if name not in labels:
            near = difflib.get_close_matches(name, list(labels), n=3, cutoff=0.5)
            raise ValueError(
                f"{annotation_json}: entry {k} (id {entry['id']}): template {name!r} is not in "
                f"{labels_json}; nearest: {near or 'none'}"
            )
        items.append((video, labels[name]))
    return items


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class VideoClipDataset(Dataset):
    """Random training clips, ``num_samples`` of them from each decoded video.

    ``dataset[i]`` is a list of ``num_samples`` dicts ``{"video": float (3, T, H, W), "label",
    "index": i, "skipped"}``: repeated sampling decodes the video once for all its samples.
    ``repeat_mode="shared_window"`` (VideoMAEv2 dataset/pretrain_datasets.py ``VideoMAE.__getitem__``
    and VideoMAE's fine-tuning kinetics.py / ssv2.py ``num_sample``: one set of frame indices, the
    transform run once per sample) gives every sample the same frames, differing only in their
    spatial augmentation (and, in collate, their masks); ``"independent"`` (MAE-ST util/kinetics.py:
    ``get_start_end_idx`` once per ``repeat_aug``) draws each sample's window too. Randomness comes from one
    ``torch.Generator`` seeded by ``mix_seed(seed, epoch, i, "clip")``, so a sample does not depend
    on worker count, order or process. Call ``set_epoch`` every epoch (DataLoader workers see it when
    they are created per epoch, i.e. without ``persistent_workers``).

    An unreadable video logs a warning and is replaced by another item (``read_item``: drawn from
    (seed, epoch, i, attempt), never one already tried in this call, at most ``max_retries``
    times); ``skipped`` on the first sample counts the videos this call skipped (0 on the rest, so summing over samples counts each skip once). Each dataset
    copy (one per worker) also keeps a tally and raises ``RuntimeError`` naming the files when
    the skipped share of its reads exceeds ``max_bad_fraction`` after ``min_attempts`` reads,
    or as soon as every item is known bad.

    Args:
        items: ``(path, label)`` pairs.
        num_frames: frames per clip (T); used when ``sampler`` is not given.
        sampling_rate: stride between sampled frames; used when ``sampler`` is not given.
        transform: ``transform(clip, generator)`` on a uint8 (T, H, W, 3) clip, returning float
            (3, T, H, W); default: ImageNet normalisation only.
        backend: decoding backend, ``"auto"`` (torchcodec, else decord, else PyAV), ``"torchcodec"``,
            ``"decord"`` or ``"pyav"``.
        decode_device: ``"cpu"``, or ``"cuda"`` to decode on the GPU (torchcodec); the clip's frames
            come back to the CPU for the augmentation, so decoding runs in the loading process
            (``num_workers=0``) or in spawned workers, never in forked ones.
        num_samples: clips per video per call; their frames are decoded together, once.
        opener: ``open_video``'s stand-in for items that are not files on disk (e.g.
            ``ShardIndex.open`` for videos in tar shards); the same arguments.
        short_clip: ``"loop"`` or ``"pad"`` for videos shorter than a clip (the ``fit`` rule only).
        sampler: which frames make up a clip; default: VideoMAE's pretraining rule for
            ``num_frames`` x ``sampling_rate``.
        repeat_mode: ``"shared_window"`` or ``"independent"``.
        max_bad_fraction: tolerated share of unreadable reads.
        seed: base seed.
        min_attempts: reads before the share is judged.
        max_retries: replacements tried in one call before giving up.
        num_threads: decoder threads per video (1 suits one DataLoader worker per core).
    """

    def __init__(
        self,
        items: Sequence[Item],
        num_frames: int = 16,
        sampling_rate: int = 4,
        transform: ClipTransform | None = None,
        backend: str = "auto",
        num_samples: int = 1,
        short_clip: str = "loop",
        max_bad_fraction: float = 0.1,
        seed: int = 0,
        min_attempts: int = 20,
        max_retries: int = MAX_RETRIES,
        num_threads: int = 1,
        sampler: ClipSampler | None = None,
        repeat_mode: str = "shared_window",
        decode_device: str = "cpu",
        opener: Callable[..., VideoReader] | None = None,
    ) -> None:
        if not items:
            raise ValueError("VideoClipDataset needs at least one item")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if short_clip not in SHORT_MODES:
            raise ValueError(f"short_clip={short_clip!r}; choose one of {SHORT_MODES}")
        if repeat_mode not in REPEAT_MODES:
            raise ValueError(f"repeat_mode={repeat_mode!r}; choose one of {REPEAT_MODES}")
        self.items = [(os.fspath(p), int(y)) for p, y in items]
        self.sampler = sampler or ClipSampler(num_frames, sampling_rate, short=short_clip)
        self.num_frames = self.sampler.num_frames
        self.sampling_rate = self.sampler.sampling_rate
        self.repeat_mode = repeat_mode
        self.transform: ClipTransform = transform if transform is not None else Normalize()
        self.backend = resolve_backend(backend)
        check_decode_device(decode_device, self.backend)
        self.decode_device = decode_device
        self.opener: Callable[..., VideoReader] = opener or open_video
        self.num_samples = num_samples
        self.short_clip = short_clip
        self.seed = seed
        self.max_retries = max_retries
        self.num_threads = num_threads
        self.epoch = 0
        # Per-copy tally (each DataLoader worker holds its own copy).
        self.reads = ReadFailures(max_bad_fraction, "VideoClipDataset", "video", min_attempts=min_attempts)

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's randomness; call before each epoch."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        if not 0 <= index < len(self.items):
            raise IndexError(f"index {index} out of range for {len(self.items)} items")

        def read(i: int) -> list[dict[str, Any]]:
            # A fresh generator per attempt: the clip drawn from the video finally used does not
            # depend on how many bad ones came before it. Known-bad items are decoded again rather
            # than skipped from the tally: a clip from a partly corrupt file may succeed, and the
            # result must not depend on what this worker happened to see before.
            return self._load(*self.items[i], index, _generator(mix_seed(self.seed, self.epoch, index, "clip")))

        got = read_item(index, len(self.items), read, errors=(VideoDecodeError,), name=lambda i: self.items[i][0],
                        reads=self.reads, seed=self.seed, epoch=self.epoch, max_retries=self.max_retries,
                        reason=lambda e: e.reason)
        samples = got.value
        samples[0]["skipped"] = got.skipped
        return samples

    def _load(self, path: str, label: int, index: int, generator: torch.Generator) -> list[dict[str, Any]]:
        """Decode the union of all samples' frames once, then cut and augment each sample.

        One ``read`` of the sorted union: each backend then seeks at most once per keyframe gap
        and decodes every frame once, where K separate reads would decode shared GOPs K times.
        """
        with self.opener(path, self.backend, num_threads=self.num_threads, device=self.decode_device) as reader:
            n = reader.num_frames
            draws = 1 if self.repeat_mode == "shared_window" else self.num_samples
            clips = [self.sampler.train(n, generator) for _ in range(draws)]
            clips = clips * (self.num_samples // draws)
            union = sorted({i for clip in clips for i in clip})
            frames = reader.read(union).cpu()  # (U, H, W, 3) uint8; the augmentations run on the CPU
        where = {f: k for k, f in enumerate(union)}
        samples = []
        for clip in clips:
            # (3, T, H, W); or the worker half of device-side augmentation: {"video": uint8 crop, "video_flip"}
            video = self.transform(frames[[where[i] for i in clip]], generator)
            fields = video if isinstance(video, dict) else {"video": video}
            samples.append({**fields, "label": label, "index": index, "skipped": 0})
        return samples

    @property
    def attempts(self) -> int:
        return self.reads.attempts

    @property
    def failures(self) -> int:
        return self.reads.failures


class VideoTestDataset(Dataset):
    """Multi-view evaluation: ``num_clips`` temporal clips x ``num_crops`` spatial crops.

    ``dataset[i]`` is ``{"video": float (V, 3, T, S, S) or None, "label", "index": i, "path",
    "valid", "unreadable", "error"}`` with ``V = num_clips * num_crops`` ordered clip-major (view ``c * num_crops
    + s`` is clip c, crop s), frames short-side resized to ``short_side`` (default the crop size
    S) and normalised. An unreadable video is never replaced (``read_item`` in evaluation mode): it
    gives ``valid=False``, ``video=None``, the file in ``unreadable`` and the reason in ``error``
    instead of raising, so an evaluator can count and list what it could not score (``collate_dicts``
    sets it aside in the batch's ``failed``). ``ok`` repeats ``valid``.

    The clips come from ``sampler.test`` (default: VideoMAE's dense test clips, kinetics.py
    ``VideoClsDataset`` mode ``test``; segment sampling for SSv2, ssv2.py). The resize is bilinear
    without antialiasing (``antialias=False``), as VideoMAE's ``cv2.resize(INTER_LINEAR)``.
    """

    def __init__(
        self,
        items: Sequence[Item],
        num_frames: int = 16,
        sampling_rate: int = 4,
        num_clips: int = 5,
        num_crops: int = 3,
        crop_size: int = 224,
        short_side: int | None = None,
        backend: str = "auto",
        short_clip: str = "loop",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        num_threads: int = 1,
        sampler: ClipSampler | None = None,
        antialias: bool = False,
        decode_device: str = "cpu",
        opener: Callable[..., VideoReader] | None = None,
    ) -> None:
        short_side = crop_size if short_side is None else short_side
        if short_side < crop_size:
            raise ValueError(f"short_side ({short_side}) must be >= crop_size ({crop_size})")
        if short_clip not in SHORT_MODES:
            raise ValueError(f"short_clip={short_clip!r}; choose one of {SHORT_MODES}")
        if num_clips < 1:
            raise ValueError(f"num_clips must be >= 1, got {num_clips}")
        self.items = [(os.fspath(p), int(y)) for p, y in items]
        self.sampler = sampler or ClipSampler(num_frames, sampling_rate, short=short_clip)
        self.num_frames = self.sampler.num_frames
        self.sampling_rate = self.sampler.sampling_rate
        self.num_clips = num_clips
        self.num_crops = num_crops
        self.crop_size = crop_size
        self.backend = resolve_backend(backend)
        check_decode_device(decode_device, self.backend)
        self.decode_device = decode_device
        self.opener: Callable[..., VideoReader] = opener or open_video
        self.short_clip = short_clip
        self.num_threads = num_threads
        self.resize = ShortSideResize(short_side, antialias=antialias)
        self.crops = SpatialCrops(crop_size, num_crops)
        self.normalize = Normalize(mean, std)
        self.reads = ReadFailures(1.0, "VideoTestDataset", "video")  # names only: evaluation never stops on bad files
        # How the views are made, for the evaluation report (mmmae.evaluation.classify copies it).
        self.protocol = {"num_clips": num_clips, "num_crops": num_crops, "num_frames": self.num_frames,
                         "sampling_rate": self.sampling_rate, "sampling": self.sampler.sampling,
                         "clip_rule": self.sampler.rule, "crop_size": crop_size, "short_side": short_side,
                         "resize": "bilinear, " + ("antialiased" if antialias else "no antialias"),
                         "aggregation": "mean of per-view softmax"}

    def __len__(self) -> int:
        return len(self.items)

    def _views(self, i: int) -> torch.Tensor:
        """All views of item ``i``: (V, 3, T, S, S)."""
        with self.opener(self.items[i][0], self.backend, num_threads=self.num_threads,
                         device=self.decode_device) as reader:
            clips = self.sampler.test(reader.num_frames, self.num_clips)
            union = sorted({f for clip in clips for f in clip})
            frames = reader.read(union).cpu()  # (U, H, W, 3) uint8
        # Resize the distinct frames once, not once per clip.
        frames = self.resize(frames)
        where = {f: k for k, f in enumerate(union)}
        offsets = self.crops.offsets(frames.shape[1], frames.shape[2])
        views = []
        for clip in clips:
            sel = frames[[where[f] for f in clip]]  # (T, h, w, 3)
            for top, left in offsets:
                views.append(self.normalize(crop_clip(sel, top, left, self.crop_size, self.crop_size)))
        return torch.stack(views)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.items[index]
        got = read_item(index, len(self.items), self._views, errors=(VideoDecodeError,),
                        name=lambda i: self.items[i][0], reads=self.reads, replace=False, reason=lambda e: e.reason)
        return {"video": got.value, "label": label, "index": index, "path": path, **got.fields()}
