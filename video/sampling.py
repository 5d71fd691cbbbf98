"""Clip index samplers: which frame indices make up a clip. Pure functions on ints.

A clip of ``num_frames`` frames taken every ``sampling_rate`` frames covers
``span = (num_frames - 1) * sampling_rate + 1`` frames of the video. When the video has fewer
frames than that, ``short`` decides what fills the clip:

- ``"loop"``: indices wrap around modulo the video length (the video plays again);
- ``"pad"``: indices past the end repeat the last frame (SlowFast clamps the same way).
"""

from __future__ import annotations

import torch

__all__ = ["clip_span", "train_clip_indices", "test_clip_indices", "SHORT_MODES"]

SHORT_MODES = ("loop", "pad")


def clip_span(num_frames: int, sampling_rate: int) -> int:
    """Frames of video covered by a clip, first to last index inclusive."""
    return (num_frames - 1) * sampling_rate + 1


def _check(num_video_frames: int, num_frames: int, sampling_rate: int, short: str) -> None:
    if num_video_frames < 1:
        raise ValueError(f"video has {num_video_frames} frames; need at least 1")
    if num_frames < 1 or sampling_rate < 1:
        raise ValueError(f"num_frames ({num_frames}) and sampling_rate ({sampling_rate}) must be >= 1")
    if short not in SHORT_MODES:
        raise ValueError(f"short={short!r}; choose one of {SHORT_MODES}")


def _indices_from(start: int, num_video_frames: int, num_frames: int, sampling_rate: int, short: str) -> list[int]:
    raw = [start + k * sampling_rate for k in range(num_frames)]
    if short == "loop":
        return [i % num_video_frames for i in raw]
    return [min(i, num_video_frames - 1) for i in raw]


def train_clip_indices(
    num_video_frames: int,
    num_frames: int,
    sampling_rate: int,
    generator: torch.Generator,
    short: str = "loop",
) -> list[int]:
    """A clip at a uniformly random start (every start whose clip fits is equally likely).

    Short videos: ``loop`` starts anywhere in the video and wraps; ``pad`` starts at frame 0 so
    the clip shows as much of the video as it can before repeating the last frame.

    Returns:
        ``num_frames`` indices in ``[0, num_video_frames)``.
    """
    _check(num_video_frames, num_frames, sampling_rate, short)
    span = clip_span(num_frames, sampling_rate)
    if num_video_frames >= span:
        high = num_video_frames - span + 1
    else:
        high = num_video_frames if short == "loop" else 1
    start = int(torch.randint(high, (1,), generator=generator).item())
    return _indices_from(start, num_video_frames, num_frames, sampling_rate, short)


def test_clip_indices(
    num_video_frames: int,
    num_frames: int,
    sampling_rate: int,
    num_clips: int,
    short: str = "loop",
) -> list[list[int]]:
    """``num_clips`` clips evenly spaced over the video (VideoMAE / SlowFast multi-view testing).

    Clip ``i`` starts at ``round(i * (L - span) / (num_clips - 1))``: the first clip starts at frame
    0 and the last one ends at the last frame. ``num_clips == 1`` takes the centre clip. When the
    video is shorter than a clip every clip starts at 0 (they are then identical).

    Returns:
        ``num_clips`` lists of ``num_frames`` indices.
    """
    _check(num_video_frames, num_frames, sampling_rate, short)
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    slack = max(num_video_frames - clip_span(num_frames, sampling_rate), 0)
    if num_clips == 1:
        starts = [slack // 2]
    else:
        # Integer arithmetic rounds half up and keeps the last clip flush with the end.
        starts = [(2 * i * slack + (num_clips - 1)) // (2 * (num_clips - 1)) for i in range(num_clips)]
    return [_indices_from(s, num_video_frames, num_frames, sampling_rate, short) for s in starts]


# The name starts with "test": keep pytest from collecting it where a test module imports it.
test_clip_indices.__test__ = False  # type: ignore[attr-defined]
