"""torchcodec backend against PyAV on the real sample clips, backend resolution, decode devices,
and decode-once repeated sampling (one read of the union of K clips = K separate reads).

The edge cases every backend shares (corrupt, truncated and missing files, frame-exact access on
synthetic VFR / B-frame AVI clips, mkv without a frame count, out-of-range indices, the dataset's
skip count) run for torchcodec too, through ``BACKENDS`` in test_video_data.py.
"""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import ROOT, VIDEOS
from mmmae.config import load_config, model_cfg
from mmmae.data.registry import build_dataset
from mmmae.data.sampler import mix_seed
from mmmae.video.datasets import VideoClipDataset
from mmmae.video.decoding import (
    AUTO_ORDER,
    VideoDecodeError,
    available_backends,
    check_decode_device,
    open_video,
    resolve_backend,
)
from mmmae.video.sampling import ClipSampler
from mmmae.video.transforms import Normalize

# Every readable sample clip: H.264 mp4, a rotated mov, an mkv without a frame count, an mpeg4 AVI
# with packed B-frames (timestamps out of order after decoding).
READABLE = ["arm_wrestling.mp4", "cleaning_pool.mp4", "rotated_90.mov", "flipping_pancake.mkv",
            "applying_eye_makeup.avi"]
# Frame counts found by demuxing every packet (PyAV / decord agree; the mkv header states none).
FRAMES = {"arm_wrestling.mp4": 280, "cleaning_pool.mp4": 300, "rotated_90.mov": 3, "flipping_pancake.mkv": 310,
          "applying_eye_makeup.avi": 164}

pytestmark = pytest.mark.skipif(not VIDEOS.is_dir(), reason="shared/data/videos not found")


def v(name: str) -> str:
    return str(VIDEOS / name)


def test_torchcodec_is_installed_with_ffmpeg() -> None:
    # The dev install brings torchcodec and `make install` FFmpeg's libraries: a missing one must fail here,
    # not skip every torchcodec test (BACKENDS in test_video_data.py names it unconditionally).
    import torchcodec

    assert torchcodec.ffmpeg_major_version is not None and 4 <= torchcodec.ffmpeg_major_version <= 9
    assert available_backends() == list(AUTO_ORDER) == ["torchcodec", "decord", "pyav"]
    assert resolve_backend("auto") == "torchcodec" and resolve_backend("pyav") == "pyav"


@pytest.mark.parametrize("name", READABLE)
def test_same_frames_as_pyav_on_every_sample_clip(name: str) -> None:
    with open_video(v(name), "torchcodec") as t, open_video(v(name), "pyav") as p:
        assert t.num_frames == p.num_frames == FRAMES[name]
        assert t.fps == pytest.approx(p.fps)
        n = t.num_frames
        every = list(range(n))
        # Out of order, duplicates, the last frame, backward jumps across keyframes.
        scattered = [n - 1, 3 % n, 100 % n, 2 % n, 100 % n, n // 2, 0]
        for indices in (every, scattered):
            a, b = t.read(indices), p.read(indices)
            assert a.dtype == b.dtype == torch.uint8 and a.shape == b.shape and a.shape[0] == len(indices)
            # Both convert yuv420p -> rgb24 with FFmpeg's swscale: identical pixels (mean abs diff 0).
            assert torch.equal(a, b)


def test_rotation_is_applied_like_pyav() -> None:
    frames = open_video(v("rotated_90.mov"), "torchcodec").read([0, 1, 2])
    assert frames.shape == (3, 568, 320, 3)  # stored 568 x 320 landscape, shown portrait
    assert torch.equal(frames, open_video(v("rotated_90.mov"), "pyav").read([0, 1, 2]))


def test_avi_is_decoded_forward_not_by_timestamp() -> None:
    # torchcodec's own timestamp lookup (VideoDecoder.get_frames_at) does not deliver this file's
    # frames: the packed B-frames come out of the decoder with timestamps out of order, and asking
    # for all 164 raises at the last one (torchcodec 0.17). The reader decodes forward instead.
    from torchcodec.decoders import VideoDecoder

    path = v("applying_eye_makeup.avi")
    expected = open_video(path, "pyav").read(list(range(164)))
    try:
        direct = VideoDecoder(path, dimension_order="NHWC").get_frames_at(list(range(164))).data
    except RuntimeError:
        direct = None
    assert direct is None or not torch.equal(direct, expected)
    with open_video(path, "torchcodec") as r:
        assert torch.equal(r.read(list(range(164))), expected)


def test_corrupt_file_skipped_and_counted_by_the_dataset(caplog: pytest.LogCaptureFixture) -> None:
    with open_video(v("corrupted.mp4"), "torchcodec") as r:
        with pytest.raises(VideoDecodeError, match="corrupted.mp4") as info:
            r.read(list(range(r.num_frames)))  # packet 30 of 50 is broken
    assert info.value.path == v("corrupted.mp4")
    ds = VideoClipDataset([(v("corrupted.mp4"), 1), (v("arm_wrestling.mp4"), 6)], num_frames=4, sampling_rate=16,
                          backend="torchcodec")
    with caplog.at_level(logging.WARNING, logger="mmmae.video.datasets"):
        out = ds[0]
    assert out[0]["skipped"] == 1 and out[0]["label"] == 6 and ds.failures == 1
    assert "corrupted.mp4" in caplog.text


def test_backend_and_device_errors_name_the_value() -> None:
    with pytest.raises(ValueError, match="'ffmpeg'.*auto"):
        resolve_backend("ffmpeg")
    with pytest.raises(ValueError, match="'tpu'"):
        check_decode_device("tpu", "torchcodec")
    with pytest.raises(ValueError, match="torchcodec backend, not 'decord'"):
        check_decode_device("cuda", "decord")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            VideoClipDataset([(v("arm_wrestling.mp4"), 0)], decode_device="cuda")


def test_cuda_decoding_needs_the_loading_process() -> None:
    overrides = [f"data.root={VIDEOS}", f"data.class_list={VIDEOS / 'kinetics400_classes.txt'}",
                 "data.decode_device=cuda", "data.num_workers=2"]
    cfg = load_config(ROOT / "configs" / "video_mae_tiny.yaml", overrides)
    assert cfg.data.backend == "auto"
    with pytest.raises(ValueError, match="data.num_workers=0"):
        build_dataset(cfg, "train", model_cfg(cfg.model))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU decoding needs a CUDA device")
@pytest.mark.parametrize("name", ["arm_wrestling.mp4", "flipping_pancake.mkv", "applying_eye_makeup.avi"])
def test_cuda_decoding_matches_cpu(name: str) -> None:
    # NVDEC decodes the same YUV planes; the RGB conversion runs on the GPU with its own rounding,
    # so pixels may differ by a level or two. The bound is a tolerance, not a measured figure.
    n = FRAMES[name]
    indices = [n - 1, 5, n // 2, 0]
    with open_video(v(name), "torchcodec", device="cuda") as g:
        gpu = g.read(indices)
    assert gpu.device.type == "cuda" and gpu.shape[0] == 4
    cpu = open_video(v(name), "pyav").read(indices)
    assert (gpu.cpu().int() - cpu.int()).abs().float().mean() < 2.0


@pytest.mark.parametrize("backend", ["torchcodec", "pyav", "decord"])
@pytest.mark.parametrize("name", ["arm_wrestling.mp4", "applying_eye_makeup.avi"])
def test_decode_once_equals_independent_decodes(backend: str, name: str) -> None:
    # Four independently drawn windows (MAE-ST repeat_aug) read in one call give the frames that four
    # separate readers give for the four clips.
    sampler = ClipSampler(8, 4)
    ds = VideoClipDataset([(v(name), 3)], transform=Normalize(), backend=backend, num_samples=4, sampler=sampler,
                          repeat_mode="independent", seed=7)
    ds.set_epoch(2)
    samples = ds[0]
    gen = torch.Generator().manual_seed(mix_seed(7, 2, 0, "clip"))  # the clip generator of (seed, epoch, index)
    clips = [sampler.train(FRAMES[name], gen) for _ in range(4)]
    assert len({tuple(c) for c in clips}) > 1  # the windows really differ
    for sample, clip in zip(samples, clips):
        with open_video(v(name), backend) as r:
            assert torch.equal(sample["video"], Normalize()(r.read(clip)))


@pytest.mark.parametrize("backend", ["torchcodec", "pyav", "decord"])
@pytest.mark.parametrize("name", ["applying_eye_makeup.avi", "flipping_pancake.mkv", "rotated_90.mov"])
def test_every_backend_reads_the_same_frames_from_memory(backend: str, name: str) -> None:
    # Tar shard members are decoded from their bytes; the path only names them.
    data = (VIDEOS / name).read_bytes()
    n = FRAMES[name]
    indices = [n - 1, 0, 2, 1]
    with open_video(v(name), backend) as disk, open_video(f"shard.tar/{name}", backend, data=data) as mem:
        assert mem.num_frames == disk.num_frames == n
        assert torch.equal(mem.read(indices), disk.read(indices)) and torch.equal(mem.read([1]), disk.read([1]))
    with pytest.raises(VideoDecodeError, match="shard.tar/x.mp4"):
        open_video("shard.tar/x.mp4", backend, data=data[: len(data) // 50]).read([n - 1])
