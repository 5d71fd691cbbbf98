"""Clip index samplers: which frame indices make up a clip. Pure functions on ints.

Two ways to take ``num_frames`` (T) frames from a video of ``n`` frames:

- **dense** (Kinetics; I3D-style): T frames ``sampling_rate`` (r) apart in one window;
- **segment** (Something-Something v2; TSN-style): the whole video cut into T equal segments, one
  frame from each, so a clip spans the whole video whatever its length (``sampling_rate`` unused).

Dense clips follow one of two placement rules (``rule``):

- ``"videomae"`` (default): the official code, figure for figure.
  Pretraining (MCG-NJU/VideoMAE kinetics.py ``VideoMAE._sample_train_indices`` and
  ``_video_TSN_decord_batch_loader``; the same in OpenGVLab/VideoMAEv2 dataset/pretrain_datasets.py):
  the window is ``T * r`` frames, the start uniform in ``[0, n - T*r]``; a video shorter than the
  window gives the fixed clip from frame 0. Fine-tuning (kinetics.py ``VideoClsDataset.loadvideo_decord``,
  train mode): a ``T * r`` window ending uniformly in ``[T*r, n - 1]``, T points spread over it by
  ``np.linspace`` and truncated (steps of ``T*r / (T-1)``, not r). Test (``VideoClsDataset``, mode
  ``test``): the frames on the stride grid ``0, r, 2r, ...``; clip c takes T consecutive grid frames
  from grid position ``int(c * (len(grid) - T) / (num_clips - 1))``; a grid shorter than T repeats
  its last frame.
- ``"fit"``: mmmae's earlier rule: any start whose ``(T-1)*r + 1`` frames fit, test clips evenly
  spaced with rounding, videos shorter than a clip filled by ``short``:
  ``"loop"`` (indices wrap around) or ``"pad"`` (the last frame repeats, as SlowFast clamps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "SAMPLINGS",
    "CLIP_RULES",
    "SHORT_MODES",
    "STAGES",
    "clip_span",
    "window_length",
    "videomae_pretrain_indices",
    "videomae_finetune_indices",
    "videomae_test_indices",
    "segment_train_indices",
    "segment_test_indices",
    "train_clip_indices",
    "test_clip_indices",
    "clip_coverage",
    "ClipSampler",
]

SAMPLINGS = ("dense", "segment")
CLIP_RULES = ("videomae", "fit")
SHORT_MODES = ("loop", "pad")
STAGES = ("pretrain", "finetune")


def clip_span(num_frames: int, sampling_rate: int) -> int:
    """Frames of video from a dense clip's first index to its last, inclusive: ``(T-1)*r + 1``."""
    return (num_frames - 1) * sampling_rate + 1


def window_length(num_frames: int, sampling_rate: int) -> int:
    """VideoMAE's window: ``T * r`` frames (``skip_length`` in pretraining, ``converted_len`` in
    fine-tuning), r frames more than :func:`clip_span` minus one."""
    return num_frames * sampling_rate


def _check(num_video_frames: int, num_frames: int, sampling_rate: int) -> None:
    if num_video_frames < 1:
        raise ValueError(f"video has {num_video_frames} frames; need at least 1")
    if num_frames < 1 or sampling_rate < 1:
        raise ValueError(f"num_frames ({num_frames}) and sampling_rate ({sampling_rate}) must be >= 1")


def _check_clips(num_clips: int) -> None:
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")


def _randint(high: int, generator: torch.Generator) -> int:
    """Uniform integer in ``[0, high)``."""
    return int(torch.randint(high, (1,), generator=generator).item())


def _linspace(start: float, stop: float, num: int) -> list[float]:
    """``np.linspace(start, stop, num)`` in the same float arithmetic: ``k * step + start`` with the
    last point set to ``stop`` (numpy's function_base.linspace)."""
    if num <= 0:
        return []
    if num == 1:
        return [float(start)]
    step = (stop - start) / (num - 1)
    return [k * step + start for k in range(num - 1)] + [float(stop)]


def videomae_pretrain_indices(
    num_video_frames: int, num_frames: int, sampling_rate: int, generator: torch.Generator
) -> list[int]:
    """VideoMAE pretraining clip (kinetics.py ``VideoMAE``, one segment, no temporal jitter).

    The start is uniform over ``[0, n - T*r]`` (``average_duration = n - T*r + 1`` starts). From it the
    index advances by r only while the next 1-based offset stays below n (``offset + new_step <
    duration``), so it never steps onto the last frame: a video shorter than the window gives the
    fixed clip ``0, r, 2r, ...`` held at the last grid frame below ``n - 1``. (The reference's branch
    for ``n > T*r`` with no whole window cannot be reached with one segment.)

    Returns:
        T indices in ``[0, n)``.
    """
    _check(num_video_frames, num_frames, sampling_rate)
    n, r = num_video_frames, sampling_rate
    starts = n - window_length(num_frames, r) + 1
    start = _randint(starts, generator) if starts > 0 else 0
    steps = max(0, (n - 2 - start) // r)  # how often the offset may still advance
    return [start + r * min(k, steps) for k in range(num_frames)]


def videomae_finetune_indices(
    num_video_frames: int, num_frames: int, sampling_rate: int, generator: torch.Generator
) -> list[int]:
    """VideoMAE fine-tuning clip (kinetics.py ``VideoClsDataset.loadvideo_decord``, train, one segment).

    Longer than the ``T*r`` window: the window ends at ``end`` uniform in ``[T*r, n - 1]``
    (``np.random.randint(converted_len, seg_len)``), T points ``linspace(end - T*r, end)`` clipped to
    ``end - 1`` and truncated. Otherwise (``n <= T*r``): ``n // r`` points ``linspace(0, n)`` then
    ``n`` for the rest, clipped to ``n - 1``.

    Returns:
        T indices in ``[0, n)``.
    """
    _check(num_video_frames, num_frames, sampling_rate)
    n, window = num_video_frames, window_length(num_frames, sampling_rate)
    if n <= window:
        m = n // sampling_rate
        points = _linspace(0, n, m) + [float(n)] * (num_frames - m)
        return [int(min(max(p, 0), n - 1)) for p in points]
    end = window + _randint(n - window, generator)
    start = end - window
    return [int(min(max(p, start), end - 1)) for p in _linspace(start, end, num_frames)]


def videomae_test_indices(
    num_video_frames: int, num_frames: int, sampling_rate: int, num_clips: int
) -> list[list[int]]:
    """VideoMAE's multi-view test clips (kinetics.py ``VideoClsDataset``, mode ``test``).

    The reference decodes the stride grid ``range(0, n, r)`` (padded with its last frame up to T),
    then clip c is the T grid frames from ``int(c * max((len(grid) - T) / (num_clips - 1), 0))``.
    For 300 frames at 16x4 with 5 clips the starts are frames 0, 56, 116, 176, 236. The reference
    divides by zero for one clip; here one clip is the centre of the grid.

    Returns:
        ``num_clips`` lists of T indices.
    """
    _check(num_video_frames, num_frames, sampling_rate)
    _check_clips(num_clips)
    grid = list(range(0, num_video_frames, sampling_rate))
    grid += [grid[-1]] * max(0, num_frames - len(grid))
    slack = len(grid) - num_frames
    if num_clips == 1:
        starts = [slack // 2]
    else:
        step = max(slack / (num_clips - 1), 0)
        starts = [int(c * step) for c in range(num_clips)]
    return [grid[s : s + num_frames] for s in starts]


def segment_train_indices(num_video_frames: int, num_frames: int, generator: torch.Generator) -> list[int]:
    """Segment-based training clip (ssv2.py ``SSVideoClsDataset.loadvideo_decord``, train).

    ``avg = n // T``; frame x is ``x * avg`` plus a uniform offset in ``[0, avg)``, drawn per segment.
    A video with fewer than T frames gives T copies of frame 0 (the reference's last branch; its
    ``n > T`` branch cannot be reached when ``avg`` is 0).

    Returns:
        T indices in ``[0, n)``.
    """
    _check(num_video_frames, num_frames, 1)
    avg = num_video_frames // num_frames
    if avg == 0:
        return [0] * num_frames
    offsets = torch.randint(avg, (num_frames,), generator=generator).tolist()
    return [x * avg + int(o) for x, o in enumerate(offsets)]


def segment_test_indices(num_video_frames: int, num_frames: int, num_clips: int) -> list[list[int]]:
    """Segment-based test clips (ssv2.py ``SSVideoClsDataset``, mode ``test``).

    With ``tick = n / T``, clip c takes ``int(c * tick / num_clips + tick * x)`` for x < T: VideoMAE's
    two views (``test_num_segment=2``) are the segment starts ``int(tick * x)`` and centres
    ``int(tick / 2 + tick * x)``; the general form for any ``num_clips`` is VideoMAEv2's
    (dataset/datasets.py ``load_video``, ``sparse_sample``).

    Returns:
        ``num_clips`` lists of T indices in ``[0, n)``.
    """
    _check(num_video_frames, num_frames, 1)
    _check_clips(num_clips)
    tick = num_video_frames / num_frames
    return [[int(c * tick / num_clips + tick * x) for x in range(num_frames)] for c in range(num_clips)]


def _check_short(short: str) -> None:
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
    """The ``fit`` rule: a clip at a uniformly random start among all starts whose
    ``(T-1)*r + 1`` frames fit.

    Short videos: ``loop`` starts anywhere in the video and wraps; ``pad`` starts at frame 0 so
    the clip shows as much of the video as it can before repeating the last frame.

    Returns:
        ``num_frames`` indices in ``[0, num_video_frames)``.
    """
    _check(num_video_frames, num_frames, sampling_rate)
    _check_short(short)
    span = clip_span(num_frames, sampling_rate)
    if num_video_frames >= span:
        high = num_video_frames - span + 1
    else:
        high = num_video_frames if short == "loop" else 1
    start = _randint(high, generator)
    return _indices_from(start, num_video_frames, num_frames, sampling_rate, short)


def test_clip_indices(
    num_video_frames: int,
    num_frames: int,
    sampling_rate: int,
    num_clips: int,
    short: str = "loop",
) -> list[list[int]]:
    """The ``fit`` rule's test clips: ``num_clips`` clips evenly spaced over the video.

    Clip ``i`` starts at ``round(i * (L - span) / (num_clips - 1))``: the first clip starts at frame
    0 and the last one ends at the last frame (for 300 frames at 16x4: 0, 60, 120, 179, 239).
    ``num_clips == 1`` takes the centre clip. When the video is shorter than a clip every clip
    starts at 0 (they are then identical).

    Returns:
        ``num_clips`` lists of ``num_frames`` indices.
    """
    _check(num_video_frames, num_frames, sampling_rate)
    _check_short(short)
    _check_clips(num_clips)
    slack = max(num_video_frames - clip_span(num_frames, sampling_rate), 0)
    if num_clips == 1:
        starts = [slack // 2]
    else:
        # Integer arithmetic rounds half up and keeps the last clip flush with the end.
        starts = [(2 * i * slack + (num_clips - 1)) // (2 * (num_clips - 1)) for i in range(num_clips)]
    return [_indices_from(s, num_video_frames, num_frames, sampling_rate, short) for s in starts]


# The name starts with "test": keep pytest from collecting it where a test module imports it.
test_clip_indices.__test__ = False  # type: ignore[attr-defined]


def clip_coverage(indices: list[int], num_video_frames: int) -> float:
    """Share of the video between a clip's first and last frame, inclusive (1.0 = all of it)."""
    return (max(indices) - min(indices) + 1) / num_video_frames


def _one_of(value: str, allowed: tuple[str, ...], name: str) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}; choose one of {allowed}")


@dataclass(frozen=True)
class ClipSampler:
    """Which frames make up a training clip and the test clips; one object shared by the datasets.

    Args:
        num_frames: frames per clip (T).
        sampling_rate: stride of dense clips (unused by segment sampling).
        sampling: ``"dense"`` or ``"segment"``.
        rule: dense placement, ``"videomae"`` or ``"fit"`` (see the module docstring).
        stage: which VideoMAE training rule, ``"pretrain"`` (``VideoMAE`` loader) or ``"finetune"``
            (``VideoClsDataset``); test clips do not depend on it.
        short: the ``fit`` rule's filling of short videos, ``"loop"`` or ``"pad"``.
    """

    num_frames: int
    sampling_rate: int = 4
    sampling: str = "dense"
    rule: str = "videomae"
    stage: str = "pretrain"
    short: str = "loop"

    def __post_init__(self) -> None:
        _one_of(self.sampling, SAMPLINGS, "sampling")
        _one_of(self.rule, CLIP_RULES, "rule")
        _one_of(self.stage, STAGES, "stage")
        _one_of(self.short, SHORT_MODES, "short")
        if self.num_frames < 1 or self.sampling_rate < 1:
            raise ValueError(f"num_frames ({self.num_frames}) and sampling_rate ({self.sampling_rate}) must be >= 1")

    def train(self, num_video_frames: int, generator: torch.Generator) -> list[int]:
        """One training clip: T indices drawn from ``generator``."""
        t, r = self.num_frames, self.sampling_rate
        if self.sampling == "segment":
            return segment_train_indices(num_video_frames, t, generator)
        if self.rule == "fit":
            return train_clip_indices(num_video_frames, t, r, generator, self.short)
        if self.stage == "finetune":
            return videomae_finetune_indices(num_video_frames, t, r, generator)
        return videomae_pretrain_indices(num_video_frames, t, r, generator)

    def test(self, num_video_frames: int, num_clips: int) -> list[list[int]]:
        """The ``num_clips`` fixed test clips."""
        t, r = self.num_frames, self.sampling_rate
        if self.sampling == "segment":
            return segment_test_indices(num_video_frames, t, num_clips)
        if self.rule == "fit":
            return test_clip_indices(num_video_frames, t, r, num_clips, self.short)
        return videomae_test_indices(num_video_frames, t, r, num_clips)

    def describe(self) -> dict[str, object]:
        """The fields, for reports."""
        return {"sampling": self.sampling, "rule": self.rule, "stage": self.stage, "num_frames": self.num_frames,
                "sampling_rate": self.sampling_rate, **({"short": self.short} if self.rule == "fit" else {})}
