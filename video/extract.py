"""Embeddings of videos (``mmmae.embedding``'s video inputs) and sliding-window features.

Videos come from a folder (recursive; ids = paths relative to it) or a list file (``path [label]``
lines, paths relative to ``root``; ids = the paths as written). One fixed view: the centre clip of 16
frames (``VIDEO_FRAMES``) every ``data.sampling_rate`` (a video model: its own ``num_frames``), short
side resized to the model's ``img_size`` and centre-cropped; unreadable videos are skipped and listed.

``extract_windows``: one row per sliding window over each whole video, as VideoMAEv2's
extract_tad_feature.py for temporal action detection (:func:`window_starts`; ids ``video#start_frame``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from mmmae.config import model_cfg
from mmmae.data.registry import input_data
from mmmae.embedding import Embedder, InputItem, load_model, read_list, register_inputs, save_rows
from mmmae.evaluation import eval_loader, progress_bar, run_batches
from mmmae.targets import image_stats

from .datasets import VIDEO_EXTENSIONS, VideoTestDataset, list_video_folder
from .decoding import VideoDecodeError, open_video

log = logging.getLogger(__name__)

__all__ = ["VIDEO_FRAMES", "WINDOW_NORMS", "embed_videos", "embed_window_query", "extract_windows", "list_videos",
           "parse_windows", "window_offsets", "window_starts"]

# Frames an image model averages over a video's centre clip (every ``sampling_rate`` frames).
VIDEO_FRAMES = 16


def list_videos(input_path: str, root: str = "") -> list[InputItem]:
    """A folder (every video under it, sorted; ids relative to it) or a ``path label`` list."""
    if os.path.isdir(input_path):
        base = os.path.abspath(input_path)
        return [InputItem(Path(os.path.relpath(p, base)).as_posix(), p) for p, _ in list_video_folder(input_path)]
    if os.path.isfile(input_path):
        return [InputItem(i, p) for i, p in read_list(input_path, root)]
    raise FileNotFoundError(f"--input {input_path!r} is neither a folder of videos nor a list file")


@torch.no_grad()
def embed_videos(emb: Embedder, cfg: DictConfig, items: list[InputItem], *, batch_size: int,
                 device: torch.device, progress: bool = True
                 ) -> tuple[torch.Tensor, list[int], list[dict[str, Any]], dict[str, Any]]:
    mcfg = model_cfg(cfg.model)
    # A video encoder takes exactly its own clip length; frame averaging over an image model's
    # frames takes VIDEO_FRAMES of them.
    d = input_data(cfg, "video")
    num_frames = int(mcfg.num_frames) if emb.is_video_model else VIDEO_FRAMES
    ds = VideoTestDataset([(it.path, -1) for it in items], num_frames=num_frames,
                          sampling_rate=d.sampling_rate, num_clips=1, num_crops=1, crop_size=mcfg.img_size,
                          backend=d.backend, short_clip=d.short_clip)
    embs, keep, failed = [], [], []
    for batch in run_batches(eval_loader(ds, batch_size, d.num_workers), "video", failed, desc="videos",
                             progress=progress):
        clips = batch["video"][:, 0]  # the one view: (B, 3, T, S, S)
        embs.append(emb.video(clips.to(device)).float().cpu())
        keep.extend(batch["index"].tolist())
    skipped = [{"id": items[f["index"]].id, "path": f["path"], "reason": f["error"]} for f in failed]
    protocol = {"num_frames": num_frames, "sampling_rate": d.sampling_rate, "clip": "centre (1 clip)",
                "crop": "centre (1 crop)", "crop_size": mcfg.img_size, "short_side": mcfg.img_size,
                "backend": d.backend, "short_clip": d.short_clip,
                "pooling": "mean over frames" if emb.frame_mean else "video encoder"}
    return (torch.cat(embs) if embs else torch.empty(0, 0)), keep, skipped, protocol


# Frame normalisations for windows, by the names of ``mmmae.targets.IMAGE_STATS``. "none" is the
# reference's: VideoMAEv2 extract_tad_feature.py feeds frames in [0, 1] without the training
# mean/std (ToFloatTensorInZeroOne + Resize only; an open question upstream, OpenGVLab/VideoMAEv2#62).
WINDOW_NORMS = ("none", "imagenet", "cc12m")


def parse_windows(spec: str) -> tuple[int, int]:
    """``"LEN:STRIDE"`` (frames) -> (LEN, STRIDE), both positive."""
    parts = spec.split(":")
    try:
        length, stride = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--windows must be LEN:STRIDE in frames (e.g. 16:4), got {spec!r}") from None
    if length < 1 or stride < 1:
        raise ValueError(f"--windows LEN:STRIDE must both be >= 1 frame, got {spec!r}")
    return length, stride


def window_starts(num_frames: int, length: int, stride: int) -> list[int]:
    """First frames of the windows over a video of ``num_frames`` frames: every ``stride`` frames while
    a whole window of ``length`` consecutive frames fits, no padding at the end (VideoMAEv2
    extract_tad_feature.py ``get_start_idx_range``: ``range(0, num_frames - 15, 4)`` for its 16-frame
    windows on THUMOS14, stride 16 on FineAction)."""
    return list(range(0, num_frames - length + 1, stride))


def window_offsets(length: int, clip_len: int, name: str) -> list[int]:
    """Frame offsets inside a window that make the model's clip: every frame when the window is the
    model's clip length (the reference: 16 frames for a 16-frame model), else every
    ``length // clip_len``-th frame; a window that is not a multiple of the clip is an error."""
    if length % clip_len:
        raise ValueError(f"a window of {length} frames does not split into {name!r}'s clip of {clip_len} frames: "
                         f"give LEN = {clip_len} x k")
    return list(range(0, length, length // clip_len))


def _window_frames(frames: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, S, S): [0, 1], the whole frame resized to S x S bilinear
    (extract_tad_feature.py ``Resize((224, 224))``: F.interpolate, align_corners=False), normalised."""
    x = frames.permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def _embed_windows(emb: Embedder, reader: Any, starts: Sequence[int], offsets: Sequence[int], size: int,
                   norm: str, batch_size: int, device: torch.device) -> torch.Tensor:
    """One video's windows -> (len(starts), D). Frames are decoded once and kept only while a later
    window still needs them, so a long video never sits in memory whole."""
    mean, std = image_stats(norm)
    cache: dict[int, torch.Tensor] = {}
    out = []
    for b in range(0, len(starts), batch_size):
        batch = starts[b:b + batch_size]
        wanted = sorted({s + o for s in batch for o in offsets})
        new = [i for i in wanted if i not in cache]
        if new:
            cache.update(zip(new, _window_frames(reader.read(new), size, mean, std)))
        for i in [i for i in cache if i < wanted[0]]:
            del cache[i]
        clips = torch.stack([torch.stack([cache[s + o] for o in offsets], dim=1) for s in batch])  # (B, 3, T, S, S)
        out.append(emb.video(clips.to(device)).float().cpu())
    return torch.cat(out)


def _video_lengths(items: Sequence[InputItem], backend: str) -> tuple[list[tuple[InputItem, int]], list[dict[str, Any]]]:
    """Frame counts of readable videos, and the unreadable ones as skipped entries."""
    lengths, skipped = [], []
    for it in items:
        try:
            with open_video(it.path, backend) as reader:
                lengths.append((it, reader.num_frames))
        except VideoDecodeError as e:
            log.warning("skipping unreadable video %s: %s", it.path, e.reason)
            skipped.append({"id": it.id, "path": it.path, "reason": e.reason})
    return lengths, skipped


def _check_window_fits(lengths: Sequence[tuple[InputItem, int]], length: int) -> None:
    short = [f"video {it.path} has {n} frames" for it, n in lengths if n < length]
    if short:
        raise ValueError(f"the window of {length} frames is longer than the video: " + "; ".join(short[:5])
                         + (f" (and {len(short) - 5} more)" if len(short) > 5 else "")
                         + "; give a shorter --windows LEN or leave those videos out")


@torch.no_grad()
def extract_windows(cfg: DictConfig, checkpoint: str, input_path: str, out_prefix: str, *, length: int, stride: int,
                    layer: int | None = None, window_norm: str = "none", normalize: bool = False,
                    root: str | None = None, batch_size: int | None = None, progress: bool = True,
                    device: torch.device | None = None) -> dict[str, Any]:
    """One feature per sliding window over each whole video, as VideoMAEv2's extract_tad_feature.py
    does for temporal action detection: windows of ``length`` frames every ``stride`` frames
    (:func:`window_starts`), each frame resized to the model's ``img_size`` square, the model's pooled
    features (a classifier's ``forward_features``: mean + fc_norm, as the reference's
    ``use_mean_pooling``; an image model's frame mean), or block ``layer``'s mean-pooled output.

    Writes ``PREFIX.npy`` (rows = windows, video by video, in start order), ``PREFIX.ids.txt``
    (``video#start_frame``) and ``PREFIX.report.json``. Unreadable videos are skipped and listed; a
    window longer than a video is an error naming the video and both lengths.
    """
    if window_norm not in WINDOW_NORMS:
        raise ValueError(f"window normalisation must be one of {WINDOW_NORMS}, got {window_norm!r}")
    if length < 1 or stride < 1:
        raise ValueError(f"window length and stride must be >= 1 frame, got {length}:{stride}")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name, mcfg = cfg.model.name, model_cfg(cfg.model)
    model, load_report = load_model(cfg, checkpoint, device, modalities=("video",), layer=layer)
    emb = Embedder(model, name, layer=layer)
    offsets = window_offsets(length, int(mcfg.num_frames) if emb.is_video_model else length, name)
    items = list_videos(input_path, input_data(cfg, "video").root if root is None else root)
    lengths, skipped = _video_lengths(items, input_data(cfg, "video").backend)
    _check_window_fits(lengths, length)
    bs = batch_size or cfg.data.batch_size
    rows, ids, videos = [], [], []
    for it, n in progress_bar(lengths, len(lengths), "videos", progress):
        starts = window_starts(n, length, stride)
        try:
            with open_video(it.path, input_data(cfg, "video").backend) as reader:
                rows.append(_embed_windows(emb, reader, starts, offsets, mcfg.img_size, window_norm, bs, device))
        except VideoDecodeError as e:  # a file that opens but breaks mid-stream loses all its windows
            log.warning("skipping video %s: %s", it.path, e.reason)
            skipped.append({"id": it.id, "path": it.path, "reason": e.reason})
            continue
        ids.extend(f"{it.id}#{s}" for s in starts)
        videos.append({"id": it.id, "num_frames": n, "num_windows": len(starts)})
    protocol = {"reference": "OpenGVLab/VideoMAEv2 extract_tad_feature.py", "length": length, "stride": stride,
                "starts": "range(0, num_frames - length + 1, stride)", "frames_per_window": len(offsets),
                "frame_step": offsets[1] - offsets[0] if len(offsets) > 1 else 1,
                "resize": f"whole frame to {mcfg.img_size}x{mcfg.img_size}, bilinear, align_corners=False",
                "normalisation": window_norm, "backend": input_data(cfg, "video").backend,
                "pooling": "mean over frames" if emb.frame_mean else "video encoder"}
    report = {"modality": "video", "model": name, "checkpoint": checkpoint, "input": input_path,
              "embedding": emb.describe("video").replace("the centre clip", "each window"), "layer": layer,
              "num_inputs": len(items), "num_embedded": len(videos), "num_skipped": len(skipped), "skipped": skipped,
              "videos": videos, "protocol": protocol, "load": load_report}
    vectors = torch.cat(rows) if rows else torch.empty(0, 0)
    return save_rows(out_prefix, vectors, ids, report, normalize=normalize, what=f"videos of {input_path}",
                     total=len(items))




@torch.no_grad()
def embed_window_query(cfg: DictConfig, checkpoint: str, query: str, *, length: int, layer: int | None = None,
                       window_norm: str = "none", normalize: bool = False, device: torch.device | None = None
                       ) -> torch.Tensor:
    """A query video -> (1, D) as window rows were made: its middle window of ``length`` frames."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name, mcfg = cfg.model.name, model_cfg(cfg.model)
    model, _ = load_model(cfg, checkpoint, device, modalities=("video",), layer=layer)
    emb = Embedder(model, name, layer=layer)
    offsets = window_offsets(length, int(mcfg.num_frames) if emb.is_video_model else length, name)
    backend = input_data(cfg, "video").backend
    lengths, skipped = _video_lengths([InputItem(query, query)], backend)
    if skipped:
        raise ValueError(f"query video {query} cannot be read: {skipped[0]['reason']}")
    _check_window_fits(lengths, length)
    start = (lengths[0][1] - length) // 2
    with open_video(query, backend) as reader:
        vec = _embed_windows(emb, reader, [start], offsets, mcfg.img_size, window_norm, 1, device)
    return F.normalize(vec, dim=-1) if normalize else vec


register_inputs("video", list_videos, embed_videos, suffixes=VIDEO_EXTENSIONS)
