"""Video decoding behind one interface, with three backends: torchcodec, decord and PyAV.

Frame ``i`` means the i-th frame in presentation order, counted from the start of the video
stream, in every backend. A reader returns uint8 RGB frames ``(T, H, W, 3)`` turned upright as the
container's rotation metadata says (the way a player shows them), so the backends agree on
orientation, and it never pads or repeats frames: an index outside ``[0, num_frames)`` raises
``IndexError`` and a frame the file cannot deliver raises ``VideoDecodeError``.

``backend="auto"`` (the default) takes the first of torchcodec, decord, PyAV that works on this
machine (torchcodec needs FFmpeg's shared libraries 4-9 at run time; see :func:`resolve_backend`).

Backend facts this module relies on (checked on the sample clips in ``shared/data/videos``):

- decord 0.6.0 counts frames by demuxing every packet of the stream when it opens a file (it
  builds its keyframe index that way), so containers without a frame count in the header (mkv)
  still get an exact count; it applies the display-matrix rotation itself (``transpose`` filter),
  and it raises ``DECORDError`` (a plain ``Exception``) or ``RuntimeError`` on bad input.
- PyAV exposes the rotation per frame (``frame.rotation``, av >= 13, counter-clockwise degrees)
  but does not apply it; this module rotates with ``torch.rot90``. Its ``rgb24`` conversion gives
  the same pixels as decord's on the sample clips (mean absolute difference 0).
- torchcodec (>= 0.17, ``seek_mode="exact"``) scans every packet at open too, applies the
  rotation itself and converts to RGB with the same pixels as PyAV on the sample clips (mean
  absolute difference 0 on CPU). Its frame lookup maps indices to presentation timestamps, which
  fails on the sample mpeg4 AVI (packed B-frames come out of the decoder with timestamps out of
  order: a batched read returned other frames and the last frame raised), so containers without
  presentation timestamps are decoded forward through its packet-level API (``Demuxer``,
  ``VideoPacketDecoder``, ``ColorConverter``) instead. With ``device="cuda"`` it decodes on the GPU
  (NVDEC) and returns frames on that device.
- AVI (and other containers that only carry decode-order timestamps) report frame timestamps
  that are not in presentation order after B-frame reordering, so PyAV seeking that maps
  timestamps to indices is only used for containers that store presentation timestamps
  (mp4/mov, mkv/webm); the rest are decoded sequentially from the start, which is always exact.
"""

from __future__ import annotations

import abc
import bisect
import io
import logging
import math
import os
from typing import Any, Callable, Iterator, Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "VideoDecodeError",
    "VideoReader",
    "DecordReader",
    "PyAVReader",
    "TorchCodecReader",
    "open_video",
    "resolve_backend",
    "check_decode_device",
    "DECODE_DEVICES",
    "AUTO_ORDER",
    "available_backends",
    "BACKENDS",
]


class VideoDecodeError(RuntimeError):
    """A video file cannot be opened or decoded; the message names the file."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot decode video {path!r}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        # Exceptions pickle through their args; ours has two, so DataLoader workers can re-raise it.
        return (type(self), (self.path, self.reason))


def _check_indices(path: str, indices: Sequence[int], num_frames: int) -> list[int]:
    """Validate frame indices before any decoding; returns them as plain ints."""
    if len(indices) == 0:
        raise ValueError(f"no frame indices given for {path!r}")
    out = []
    for idx in indices:
        i = int(idx)
        if i != idx:
            raise TypeError(f"frame index {idx!r} for {path!r} is not an integer")
        # Negative indices are refused rather than counted from the end: a sampler that yields one
        # has a bug, and wrapping it around would hide that.
        if i < 0 or i >= num_frames:
            raise IndexError(f"frame index {i} out of range for {path!r} with {num_frames} frames")
        out.append(i)
    return out


def _gather(path: str, frames: dict[int, torch.Tensor], indices: list[int]) -> torch.Tensor:
    """Stack decoded frames in the requested order (duplicates allowed) into (T, H, W, 3)."""
    missing = sorted({i for i in indices if i not in frames})
    if missing:
        raise VideoDecodeError(path, f"frames {missing[:8]} could not be decoded")
    try:
        return torch.stack([frames[i] for i in indices])
    except RuntimeError as e:  # frames of different sizes (resolution change mid-stream)
        raise VideoDecodeError(path, f"frames differ in size: {e}") from e


class VideoReader(abc.ABC):
    """An open video: frame count, average frame rate, and random access by frame index.

    Readers are not thread-safe and should not be shared across processes: open one per
    ``__getitem__`` (opening is cheap next to decoding a clip).
    """

    backend: str = ""

    def __init__(self, path: str, data: bytes | None = None) -> None:
        self.path = path
        # The file's bytes when it does not lie on disk by itself (a member of a tar shard); the
        # path then only names it (errors, the container kind from its extension).
        self._data = data
        # Set by each backend when it opens the file.
        self._num_frames = 0
        self._fps = 0.0

    def _source(self) -> str | io.BytesIO:
        """What the decoding library opens: the path, or a fresh in-memory file over the bytes."""
        return self.path if self._data is None else io.BytesIO(self._data)

    @property
    def num_frames(self) -> int:
        """Number of frames in the video stream (exact, not estimated from duration x fps)."""
        return self._num_frames

    @property
    def fps(self) -> float:
        """Average frame rate; informational only (sampling works on frame indices, so a
        variable-frame-rate video is sampled by frames, not seconds)."""
        return self._fps

    @abc.abstractmethod
    def read(self, indices: Sequence[int]) -> torch.Tensor:
        """Decode frames by index (any order, duplicates allowed).

        Returns:
            uint8 ``(T, H, W, 3)`` RGB, ``T = len(indices)``, displayed orientation.
        Raises:
            IndexError: an index outside ``[0, num_frames)``.
            VideoDecodeError: the file fails to deliver one of the frames.
        """

    def close(self) -> None:
        """Release the decoder; the reader cannot be used afterwards."""

    def __len__(self) -> int:
        return self.num_frames

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, num_frames={self.num_frames}, fps={self.fps:.3f})"


# Containers whose packets carry presentation timestamps, so a decoded frame's pts identifies its
# index after a seek. Others (avi, raw streams) carry decode-order stamps: decode from the start.
_PTS_FORMATS = ("mov", "mp4", "matroska", "webm")
# decord does not report the container format; these extensions name the same containers.
_PTS_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm")
# mov/mp4 sample tables count packets exactly, so fewer packets than the header lists is a cut file.
_MP4_EXTENSIONS = (".mp4", ".m4v", ".mov")


class DecordReader(VideoReader):
    """decord backend: its own frame index (demuxed at open) and accurate seeking.

    decord's seeking maps frame indices to timestamps; in containers that store decode-order
    timestamps (AVI) with B-frames and more than one keyframe it silently returns the wrong
    frames (checked with an mpeg4 AVI: asking for frame 20 gave frame 13). For those files this
    reader decodes forward from frame 0 instead, which decord does without seeking.
    """

    backend = "decord"

    def __init__(self, path: str, num_threads: int = 1, data: bytes | None = None) -> None:
        super().__init__(path, data)
        self._num_threads = num_threads
        self._reader: Any = None
        try:
            self._reader = self._open()
            self._num_frames = len(self._reader)
            fps = float(self._reader.get_avg_fps())
        except Exception as e:  # DECORDError is a bare Exception subclass
            raise VideoDecodeError(path, _short(e)) from e
        if self._num_frames <= 0:
            raise VideoDecodeError(path, "no video frames")
        self._fps = fps if math.isfinite(fps) and fps > 0 else 0.0
        ext = os.path.splitext(path)[1].lower()
        # Containers without display timestamps (AVI) confuse decord's frame-to-time mapping: with
        # several keyframes a seek lands on the wrong frame, and even with one keyframe a forward
        # skip to the last frames returned another frame (seen on the sample .avi). Decode forward.
        self._sequential = ext not in _PTS_EXTENSIONS
        self._stale = False

    def _open(self) -> Any:
        import decord  # imported here: decord has no wheels on some platforms, PyAV may be used alone

        return decord.VideoReader(self._source(), ctx=decord.cpu(0), num_threads=self._num_threads)

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        idx = _check_indices(self.path, indices, self._num_frames)
        wanted = sorted(set(idx))
        try:
            if self._stale:
                # decord's decoder thread stays in an error state after a failed read, and in
                # sequential mode it must start again from frame 0: open a fresh reader.
                self._reader = self._open()
            self._stale = self._sequential
            if self._sequential:
                frames = self._read_forward(wanted)
            else:
                # Ascending unique order: decord then only skips forward, no backward seeks.
                batch = self._to_tensor(self._reader.get_batch(wanted), len(wanted))
                frames = {w: batch[k] for k, w in enumerate(wanted)}
        except VideoDecodeError:
            self._stale = True
            raise
        except Exception as e:
            self._stale = True
            raise VideoDecodeError(self.path, _short(e)) from e
        return _gather(self.path, frames, idx)

    def _read_forward(self, wanted: list[int], chunk: int = 32) -> dict[int, torch.Tensor]:
        """Decode frames 0..max(wanted) in consecutive chunks (decord does not seek between
        consecutive indices), keeping only the wanted ones so memory stays at one chunk."""
        want = set(wanted)
        frames: dict[int, torch.Tensor] = {}
        for start in range(0, wanted[-1] + 1, chunk):
            # Chunks holding no wanted frame are still decoded and converted: decord's only
            # ways to skip ahead go through the seek this mode avoids.
            ask = list(range(start, min(start + chunk, wanted[-1] + 1)))
            batch = self._to_tensor(self._reader.get_batch(ask), len(ask))
            frames.update({i: batch[i - start].clone() for i in ask if i in want})
        return frames

    def _to_tensor(self, batch: Any, expected: int) -> torch.Tensor:
        # decord's global bridge may have been switched to torch by other code; accept both.
        arr = batch.asnumpy() if hasattr(batch, "asnumpy") else batch
        out = torch.as_tensor(arr)
        if out.dtype != torch.uint8 or out.ndim != 4 or out.shape[0] != expected or out.shape[-1] != 3:
            raise VideoDecodeError(self.path, f"decord returned {tuple(out.shape)} {out.dtype}")
        return out

    def close(self) -> None:
        self._reader = None


class PyAVReader(VideoReader):
    """PyAV backend: one demux pass at open builds the frame index (count, pts, keyframes).

    Reading seeks to the last keyframe at or before each needed frame (when the container's
    timestamps allow it) and decodes forward, keeping only the frames asked for. Every decoded
    frame is identified by its pts; if anything does not line up (missing or duplicate pts, a
    seek landing past the target), the read starts over with plain sequential decoding.
    """

    backend = "pyav"

    def __init__(self, path: str, num_threads: int = 1, data: bytes | None = None) -> None:
        super().__init__(path, data)
        import av

        self._av = av
        self._num_threads = num_threads
        self._container: Any = None
        try:
            self._container = av.open(self._source())
            self._build_index()
        except VideoDecodeError:
            self.close()
            raise
        except Exception as e:
            self.close()
            raise VideoDecodeError(path, _short(e)) from e

    def _video_stream(self, container: Any) -> Any:
        if not container.streams.video:
            raise VideoDecodeError(self.path, "no video stream")
        stream = container.streams.video[0]
        # Frame threading changes latency, not output; 0 lets FFmpeg pick the thread count.
        stream.thread_type = "AUTO"
        stream.thread_count = self._num_threads
        return stream

    def _build_index(self) -> None:
        """Demux the video stream once: exact frame count, pts table and keyframe positions."""
        container = self._container
        stream = self._video_stream(container)
        pts: list[int | None] = []
        keys: list[bool] = []
        stored = 0
        for packet in container.demux(stream):
            if packet.size == 0 and packet.pts is None:
                continue  # PyAV's closing flush packet
            stored += 1
            # Discard-flagged packets (mp4 edit lists) are dropped by the decoder: not frames.
            if packet.size == 0 or packet.is_discard:
                continue
            pts.append(packet.pts)
            keys.append(bool(packet.is_keyframe))
        if not pts:
            raise VideoDecodeError(self.path, "no video frames")
        fmt = container.format.name
        if "mp4" in fmt.split(",") and stream.frames and stored < stream.frames:
            # A cut-off download: recent FFmpeg ends demuxing quietly at the cut, where decord's
            # older FFmpeg fails at open. Refuse it here too, so both backends agree. (Only the
            # mov/mp4 sample table counts packets exactly; an AVI header counts time ticks.)
            raise VideoDecodeError(self.path, f"truncated: header lists {stream.frames} frames, file holds {stored}")
        self._num_frames = len(pts)
        if stream.frames and stream.frames != self._num_frames:
            logger.debug("%s: header says %d frames, demuxing found %d", self.path, stream.frames, self._num_frames)

        have_pts = all(p is not None for p in pts) and len(set(pts)) == len(pts)
        self._seekable = have_pts and any(f in fmt.split(",") for f in _PTS_FORMATS)
        if self._seekable:
            self._pts_sorted: list[int] = sorted(pts)  # type: ignore[arg-type]
            self._pts_to_index = {p: i for i, p in enumerate(self._pts_sorted)}
            self._key_indices = sorted(self._pts_to_index[p] for p, k in zip(pts, keys) if k)

        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        if fps <= 0 and stream.duration and stream.time_base:
            fps = self._num_frames / float(stream.duration * stream.time_base)
        self._fps = fps if math.isfinite(fps) and fps > 0 else 0.0

    def _to_tensor(self, frame: Any) -> torch.Tensor:
        """One decoded frame -> uint8 (H, W, 3), turned upright like decord does."""
        img = torch.from_numpy(frame.to_ndarray(format="rgb24"))
        # frame.rotation is counter-clockwise degrees (av_display_rotation_get); decord applies
        # the clockwise angle -rotation with FFmpeg's transpose filter, i.e. the same picture as
        # rot90 by rotation / 90 counter-clockwise quarter turns.
        rotation = getattr(frame, "rotation", None)
        if rotation is None:  # av < 13: fall back to the legacy "rotate" tag (clockwise degrees)
            rotation = -float(self._container.streams.video[0].metadata.get("rotate", 0) or 0)
        k = int(round(float(rotation) / 90.0)) % 4
        return torch.rot90(img, k, dims=(0, 1)).contiguous() if k else img

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        idx = _check_indices(self.path, indices, self._num_frames)
        if self._container is None:
            raise VideoDecodeError(self.path, "reader is closed")
        wanted = sorted(set(idx))
        frames: dict[int, torch.Tensor] = {}
        try:
            if self._seekable:
                try:
                    self._read_seeking(wanted, frames)
                except _SeekMismatch as e:
                    logger.debug("%s: seek read inconsistent (%s); decoding from the start", self.path, e)
                    frames.clear()
                    self._read_sequential(wanted, frames)
            else:
                self._read_sequential(wanted, frames)
        except VideoDecodeError:
            raise
        except Exception as e:
            raise VideoDecodeError(self.path, _short(e)) from e
        return _gather(self.path, frames, idx)

    def _decode_iter(self, container: Any) -> Iterator[Any]:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            if packet.is_discard:
                continue
            yield from packet.decode()

    def _read_sequential(self, wanted: list[int], frames: dict[int, torch.Tensor]) -> None:
        """Decode from the first frame, counting frames; exact for every container."""
        self._reopen()
        want = set(wanted)
        last = wanted[-1]
        count = 0
        for frame in self._decode_iter(self._container):
            # Where the container has presentation timestamps, check that frame `count` carries
            # the count-th smallest pts: a frame the decoder silently dropped would otherwise
            # shift every later index by one.
            if self._seekable and frame.pts is not None and frame.pts != self._pts_sorted[count]:
                raise VideoDecodeError(
                    self.path, f"decoded frame {count} has pts {frame.pts}, expected {self._pts_sorted[count]}"
                )
            if count in want:
                frames[count] = self._to_tensor(frame)
            if count == last:
                return
            count += 1
        raise VideoDecodeError(self.path, f"stream ended after {count} frames, frame {last} was requested")

    def _read_seeking(self, wanted: list[int], frames: dict[int, torch.Tensor]) -> None:
        """Seek to the keyframe before each run of wanted frames, decode forward, match by pts."""
        container = self._container
        stream = container.streams.video[0]
        pos = 0
        decoder: Iterator[Any] | None = None
        current = -1  # index of the last frame the live decoder produced
        floor = 0  # frames below the keyframe last seeked to are not trusted
        while pos < len(wanted):
            target = wanted[pos]
            k = bisect.bisect_right(self._key_indices, target) - 1
            key = self._key_indices[k] if k >= 0 else 0
            if decoder is None or key > current:
                # A keyframe past the current position (or nothing decoding yet): seeking there is
                # cheaper than decoding through. backward=True lands on the keyframe at or before
                # the pts; frames before `key` (open-GOP leading frames) are ignored below.
                container.seek(self._pts_sorted[key], stream=stream, backward=True, any_frame=False)
                decoder = self._decode_iter(container)
                floor = key
                current = -1
            for frame in decoder:
                index = self._pts_to_index.get(frame.pts)
                if index is None:
                    raise _SeekMismatch(f"decoded pts {frame.pts} is not in the index")
                if index < floor:
                    continue
                if index <= current:
                    raise _SeekMismatch(f"frame {index} came after frame {current}")
                current = index
                if index > target:
                    raise _SeekMismatch(f"seek passed frame {target} (landed at {index})")
                if index == target:
                    frames[index] = self._to_tensor(frame)
                    pos += 1
                    break
            else:
                # Let the sequential pass decide whether the frame truly does not exist.
                raise _SeekMismatch(f"stream ended before frame {target}")

    def _reopen(self) -> None:
        # Re-opening is a few milliseconds and always starts exactly at the first packet, which a
        # seek to 0 does not guarantee for every container.
        if self._container is not None:
            self._container.close()
        self._container = self._av.open(self._source())
        self._video_stream(self._container)

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None


class TorchCodecReader(VideoReader):
    """torchcodec backend: exact index at open, one batched call for all requested frames.

    Containers with presentation timestamps (mp4/mov, mkv/webm) are read with
    ``VideoDecoder.get_frames_at``: torchcodec sorts the indices, seeks to the keyframe before each
    and decodes forward, in C++. Other containers (AVI) are decoded forward from the first packet
    through the packet-level API, counting frames as they come out, as the other backends do.
    """

    backend = "torchcodec"

    def __init__(self, path: str, num_threads: int = 1, device: str = "cpu", data: bytes | None = None) -> None:
        super().__init__(path, data)
        from torchcodec.decoders import VideoDecoder  # imported here: torchcodec is optional

        self._num_threads = num_threads
        self._device = device
        self._sequential = os.path.splitext(path)[1].lower() not in _PTS_EXTENSIONS
        try:
            self._decoder: Any = VideoDecoder(path if data is None else data, dimension_order="NHWC",
                                              seek_mode="exact", num_ffmpeg_threads=num_threads, device=device)
            meta = self._decoder.metadata
        except Exception as e:  # torchcodec raises RuntimeError / ValueError from its C++ core
            raise VideoDecodeError(path, _short(e)) from e
        # Exact mode counts the stream's packets; the header's count is only a claim.
        n = meta.num_frames_from_content if meta.num_frames_from_content is not None else meta.num_frames
        self._num_frames = int(n or 0)
        if self._num_frames <= 0:
            raise VideoDecodeError(path, "no video frames")
        header = meta.num_frames_from_header
        if os.path.splitext(path)[1].lower() in _MP4_EXTENSIONS and header and self._num_frames < header:
            # The cut-off download PyAVReader refuses (see there): refused here too, so backends agree.
            raise VideoDecodeError(path, f"truncated: header lists {header} frames, file holds {self._num_frames}")
        # The header's rate first, as PyAV's average_rate (mkv: 30.0 where the content-derived
        # average, frames over the span of timestamps, is 30.00097); the derived one when it is absent.
        fps = meta.average_fps_from_header or meta.average_fps
        self._fps = float(fps) if fps and math.isfinite(fps) and fps > 0 else 0.0

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        idx = _check_indices(self.path, indices, self._num_frames)
        if self._decoder is None:
            raise VideoDecodeError(self.path, "reader is closed")
        wanted = sorted(set(idx))
        try:
            if self._sequential:
                batch = self._read_forward(wanted)
            else:
                batch = self._decoder.get_frames_at(wanted).data  # (U, H, W, 3), in `wanted` order
        except VideoDecodeError:
            raise
        except Exception as e:
            raise VideoDecodeError(self.path, _short(e)) from e
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[0] != len(wanted) or batch.shape[-1] != 3:
            raise VideoDecodeError(self.path, f"torchcodec returned {tuple(batch.shape)} {batch.dtype}")
        pos = {w: k for k, w in enumerate(wanted)}
        # One gather on the decode device (no per-frame copies, no trip to the CPU for CUDA frames).
        order = torch.tensor([pos[i] for i in idx], device=batch.device)
        return batch.index_select(0, order).contiguous()

    def _read_forward(self, wanted: list[int]) -> torch.Tensor:
        """Decode from the first packet, counting frames in output (presentation) order, and
        colour-convert only the wanted ones. Returns (U, H, W, 3) for ``wanted`` (ascending)."""
        from torchcodec.decoders import ColorConverter, Demuxer, VideoStream

        demuxer = Demuxer(self.path if self._data is None else self._data)
        video = next((s for s in demuxer.streams if isinstance(s, VideoStream)), None)
        if video is None:
            raise VideoDecodeError(self.path, "no video stream")
        decoder = video.make_decoder(self._device, num_ffmpeg_threads=self._num_threads)
        convert = ColorConverter(self._device)
        want = set(wanted)
        last = wanted[-1]
        frames: list[torch.Tensor] = []
        count = 0

        def take(raw_frames: list[Any]) -> bool:
            nonlocal count
            for raw in raw_frames:
                if count in want:
                    frames.append(convert.convert(raw).data.permute(1, 2, 0))  # (3, H, W) -> (H, W, 3)
                if count == last:
                    return True
                count += 1
            return False

        for packet in demuxer:
            if packet.stream_index == video.index and take(decoder.decode(packet)):
                break
        else:
            if not take(decoder.drain()):
                raise VideoDecodeError(self.path, f"stream ended after {count} frames, frame {last} was requested")
        try:
            return torch.stack(frames)
        except RuntimeError as e:  # frames of different sizes (resolution change mid-stream)
            raise VideoDecodeError(self.path, f"frames differ in size: {e}") from e

    def close(self) -> None:
        self._decoder = None


class _SeekMismatch(Exception):
    """Seek-based reading could not identify frames; the caller falls back to sequential."""


def _short(e: BaseException, limit: int = 300) -> str:
    """Exception text for a VideoDecodeError reason; decord's messages carry long C++ traces."""
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= limit else text[:limit] + "..."


BACKENDS: dict[str, Callable[..., VideoReader]] = {
    "torchcodec": TorchCodecReader,
    "decord": DecordReader,
    "pyav": PyAVReader,
}
# "auto" takes the first of these that works here: torchcodec decodes in C++ with one batched call
# per read (and on the GPU), decord is the VideoMAE references' reader, PyAV needs nothing but av.
AUTO_ORDER = ("torchcodec", "decord", "pyav")
DECODE_DEVICES = ("cpu", "cuda")


def _usable(name: str) -> bool:
    try:
        if name == "torchcodec":
            import torchcodec

            # `import torchcodec` succeeds without FFmpeg's shared libraries (its image decoders do not
            # need them); the version it found is None then, and every video decode would fail.
            return getattr(torchcodec, "ffmpeg_major_version", None) is not None
        __import__({"decord": "decord", "pyav": "av"}[name])
    except ImportError:
        return False
    return True


def available_backends() -> list[str]:
    """Backends that can decode on this machine, in the order ``"auto"`` tries them."""
    return [name for name in AUTO_ORDER if _usable(name)]


def resolve_backend(backend: str = "auto") -> str:
    """``"auto"`` -> the first usable of torchcodec, decord, PyAV; a named backend is returned as is.

    Raises:
        ValueError: an unknown name, or ``"auto"`` with no usable backend.
    """
    if backend == "auto":
        names = available_backends()
        if not names:
            raise ValueError("no video backend is usable: install torchcodec (with FFmpeg 4-9), decord or av")
        return names[0]
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; choose 'auto' or one of {sorted(BACKENDS)}")
    return backend


def check_decode_device(device: str, backend: str) -> None:
    """Refuse a decode device the backend (already resolved) or this machine cannot use.

    Raises:
        ValueError: not ``cpu`` / ``cuda`` / ``cuda:N``; CUDA with a CPU-only backend; CUDA without a GPU.
    """
    kind = str(device).split(":", 1)[0]
    if kind not in DECODE_DEVICES:
        raise ValueError(f"unknown decode device {device!r}; choose one of {DECODE_DEVICES} (or 'cuda:N')")
    if kind == "cuda":
        if backend != "torchcodec":
            raise ValueError(f"decoding on {device!r} needs the torchcodec backend, not {backend!r}")
        if not torch.cuda.is_available():
            raise ValueError(f"decode device {device!r} asked for, but torch sees no CUDA device")


def open_video(path: str, backend: str = "auto", *, num_threads: int = 1, device: str = "cpu",
               data: bytes | None = None) -> VideoReader:
    """Open a video for random frame access.

    Args:
        path: video file.
        backend: ``"auto"``, ``"torchcodec"``, ``"decord"`` or ``"pyav"``.
        num_threads: decoder threads per reader; 1 suits DataLoader workers (one video each),
            0 lets FFmpeg choose (all cores), for a single reader.
        device: ``"cpu"``, or ``"cuda"`` / ``"cuda:N"`` for GPU decoding (torchcodec only; the
            frames come back on that device).
        data: the file's bytes, read from memory instead of ``path`` (a tar shard's member); ``path``
            still names the video in errors and its extension the container kind.
    Raises:
        ValueError: unknown backend or device, or a CUDA device for a CPU-only backend.
        VideoDecodeError: the file is missing, not a video, or its header/index is unreadable.
    """
    name = resolve_backend(backend)
    check_decode_device(device, name)
    path = os.fspath(path)
    if data is not None:
        if not data:
            raise VideoDecodeError(path, "empty file")
    elif not os.path.isfile(path):
        # Checked here so every backend gives the same, plain reason (decord would say "Error reading").
        raise VideoDecodeError(path, "no such file")
    if name == "torchcodec":
        return TorchCodecReader(path, num_threads=num_threads, device=str(device), data=data)
    return BACKENDS[name](path, num_threads=num_threads, data=data)
