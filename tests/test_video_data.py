"""Video data path on real clips (shared/data/videos) and small synthetic ones.

Synthetic clips paint frame i a flat grey of level 8 + 6 i, so a decoded frame's mean names its
index: that checks frame-exact random access (B-frames, short GOPs, variable frame rate) without
trusting either backend as the reference.
"""

from __future__ import annotations

import fractions
import json
import logging
import os
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mmmae.data.collate import collate_dicts
from mmmae.video.datasets import (
    VideoClipDataset,
    VideoTestDataset,
    list_video_folder,
    read_annotation_list,
    read_class_list,
    read_ssv2_annotations,
)
from mmmae.video.decoding import VideoDecodeError, open_video
from mmmae.video.sampling import clip_span, test_clip_indices, train_clip_indices, videomae_test_indices
from mmmae.video.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    MultiScaleCrop,
    Normalize,
    RandomResizedCropVideo,
    ShortSideResize,
    SpatialCrops,
    resize_clip,
)

VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"  # ../shared/data from the repo root
CLASSES = VIDEOS / "kinetics400_classes.txt"
BACKENDS = ("decord", "pyav", "torchcodec")

pytestmark = pytest.mark.skipif(not VIDEOS.is_dir(), reason="shared/data/videos not found")


def v(name: str) -> str:
    return str(VIDEOS / name)


def grey_ids(frames: torch.Tensor) -> list[int]:
    """Frame indices painted by ``_write_grey_video``: (T, H, W, 3) uint8 -> T ints."""
    return ((frames.float().mean(dim=(1, 2, 3)) - 8) / 6).round().int().tolist()


def _write_grey_video(path: str, codec: str, n: int = 40, vfr: bool = False, gop: int = 6, bframes: int = 2) -> None:
    container = av.open(path, "w")
    stream = container.add_stream(codec, rate=25)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    stream.codec_context.gop_size = gop
    stream.codec_context.max_b_frames = bframes
    stream.bit_rate = 4_000_000
    tb = fractions.Fraction(1, 1000)
    if vfr:
        stream.time_base = tb
    t = 0
    for i in range(n):
        frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 8 + 6 * i, np.uint8), format="rgb24")
        if vfr:
            # Every third frame lasts three times as long: a variable frame rate.
            frame.pts, frame.time_base = t, tb
            t += 120 if i % 3 == 0 else 40
        else:
            frame.pts = i
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("synthetic_videos")
    paths = {
        "vfr_mp4": str(root / "vfr.mp4"),
        "vfr_mkv": str(root / "vfr.mkv"),
        "bframes_avi": str(root / "bframes.avi"),
    }
    _write_grey_video(paths["vfr_mp4"], "libx264", vfr=True)
    _write_grey_video(paths["vfr_mkv"], "libx264", vfr=True)
    _write_grey_video(paths["bframes_avi"], "mpeg4")
    # A download cut in half, with its index at the front (faststart), so the header still lists
    # every frame.
    whole = str(root / "faststart.mp4")
    with av.open(v("arm_wrestling.mp4")) as src, av.open(whole, "w", options={"movflags": "faststart"}) as dst:
        out = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(video=0):
            if packet.dts is not None:
                packet.stream = out
                dst.mux(packet)
    data = Path(whole).read_bytes()
    paths["truncated_mp4"] = str(root / "truncated.mp4")
    Path(paths["truncated_mp4"]).write_bytes(data[: len(data) // 2])
    return paths




@pytest.mark.parametrize("name", ["arm_wrestling.mp4", "applying_eye_makeup.avi", "flipping_pancake.mkv"])
def test_backends_return_the_same_frames(name: str) -> None:
    with open_video(v(name), "decord") as d, open_video(v(name), "pyav") as p:
        assert d.num_frames == p.num_frames
        assert d.fps == pytest.approx(p.fps)
        n = d.num_frames
        # Out of order, with a duplicate, the last frame, and a backward jump across keyframes.
        indices = [n - 1, 3, 100, 2, 100, n // 2, 0]
        a, b = d.read(indices), p.read(indices)
    assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8 and a.shape[0] == len(indices)
    assert (a.int() - b.int()).abs().float().mean() < 3
    assert torch.equal(a[2], a[4])  # duplicate index, same frame


def test_mkv_without_frame_count() -> None:
    with av.open(v("flipping_pancake.mkv")) as c:
        assert c.streams.video[0].frames == 0  # the header really does not state it
    for backend in BACKENDS:
        with open_video(v("flipping_pancake.mkv"), backend) as r:
            assert r.num_frames == 310
            assert r.fps == pytest.approx(30.0)
            assert r.read([309]).shape == (1, 240, 426, 3)
            with pytest.raises(IndexError, match="flipping_pancake"):
                r.read([310])


@pytest.mark.parametrize("backend", BACKENDS)
def test_indices_out_of_range_are_errors(backend: str) -> None:
    with open_video(v("arm_wrestling.mp4"), backend) as r:
        with pytest.raises(IndexError):
            r.read([0, r.num_frames])
        with pytest.raises(IndexError):
            r.read([-1])
        with pytest.raises(ValueError):
            r.read([])


def test_rotation_metadata_gives_upright_frames() -> None:
    with av.open(v("rotated_90.mov")) as c:
        raw_frame = next(c.decode(video=0))
        raw = torch.from_numpy(raw_frame.to_ndarray(format="rgb24"))
        rotation = raw_frame.rotation
    assert raw.shape == (320, 568, 3) and rotation == -90  # stored landscape, shown turned 90 deg
    frames = {b: open_video(v("rotated_90.mov"), b).read([0, 1, 2]) for b in BACKENDS}
    for x in frames.values():
        assert x.shape == (3, 568, 320, 3)  # displayed portrait: height > width
    assert torch.equal(frames["decord"], frames["pyav"])
    # -90 (counter-clockwise) means a quarter turn clockwise, as players (ffmpeg autorotate) show it.
    assert torch.equal(frames["pyav"][0], torch.rot90(raw, -1, dims=(0, 1)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_and_missing_files_raise_video_decode_error(
    backend: str, synthetic: dict[str, str], tmp_path: Path
) -> None:
    # corrupted.mp4 opens (its header is fine) but packet 30 of 50 is broken.
    with open_video(v("corrupted.mp4"), backend) as r:
        assert r.read([0, 5]).shape == (2, 720, 1280, 3)
        with pytest.raises(VideoDecodeError, match="corrupted.mp4"):
            r.read(list(range(r.num_frames)))
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    for bad in (str(tmp_path / "missing.mp4"), str(noise), synthetic["truncated_mp4"]):
        with pytest.raises(VideoDecodeError, match=os.path.basename(bad)) as info:
            open_video(bad, backend).read([0])
        assert isinstance(info.value, RuntimeError) and info.value.path == bad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["vfr_mp4", "vfr_mkv", "bframes_avi"])
def test_random_access_is_frame_exact(synthetic: dict[str, str], kind: str, backend: str) -> None:
    # decord used to return frame 13 for index 20 on the B-frame AVI; the reader decodes such
    # files forward instead of seeking.
    with open_video(synthetic[kind], backend) as r:
        assert r.num_frames == 40
        assert grey_ids(r.read(list(range(40)))) == list(range(40))
        indices = [39, 5, 17, 16, 2, 30, 31, 5]
        assert grey_ids(r.read(indices)) == indices
        assert grey_ids(r.read([20])) == [20]  # a second read on the same reader


def test_variable_frame_rate_is_indexed_by_frame(synthetic: dict[str, str]) -> None:
    with av.open(synthetic["vfr_mp4"]) as c:
        pts = sorted(p.pts for p in c.demux(video=0) if p.size)
    steps = {b - a for a, b in zip(pts, pts[1:])}
    assert len(steps) > 1  # the timestamps really are uneven
    fps = {b: open_video(synthetic["vfr_mp4"], b).fps for b in BACKENDS}
    assert fps["decord"] == pytest.approx(fps["pyav"]) and 0 < fps["pyav"] < 25




def test_train_clip_indices_long_video() -> None:
    starts = set()
    for seed in range(200):
        idx = train_clip_indices(40, 8, 4, torch.Generator().manual_seed(seed))
        assert len(idx) == 8 and all(b - a == 4 for a, b in zip(idx, idx[1:]))
        assert 0 <= idx[0] and idx[-1] < 40
        starts.add(idx[0])
    # Every start whose clip fits is drawn: 0 .. 40 - span (span 29 -> 11).
    assert starts == set(range(40 - clip_span(8, 4) + 1))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert train_clip_indices(100, 8, 4, g1) == train_clip_indices(100, 8, 4, g2)


def test_train_clip_indices_short_video() -> None:
    g = torch.Generator().manual_seed(0)
    assert train_clip_indices(10, 8, 2, g, short="pad") == [0, 2, 4, 6, 8, 9, 9, 9]
    for seed in range(20):
        idx = train_clip_indices(10, 8, 2, torch.Generator().manual_seed(seed), short="loop")
        assert all(0 <= i < 10 for i in idx)
        assert all((b - a) % 10 == 2 for a, b in zip(idx, idx[1:]))
    assert train_clip_indices(1, 4, 3, g) == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        train_clip_indices(0, 4, 2, g)
    with pytest.raises(ValueError):
        train_clip_indices(10, 4, 2, g, short="wrap")


def test_test_clip_indices_evenly_spaced() -> None:
    clips = test_clip_indices(100, 8, 2, 3)  # span 15, slack 85
    assert [c[0] for c in clips] == [0, 43, 85] and clips[-1][-1] == 99
    assert test_clip_indices(100, 8, 2, 1)[0][0] == 42  # the centre clip
    assert [c[0] for c in test_clip_indices(300, 16, 4, 5)] == [0, 60, 120, 179, 239]
    short = test_clip_indices(10, 8, 2, 3, short="pad")
    assert short == [[0, 2, 4, 6, 8, 9, 9, 9]] * 3




def _clip(t: int = 4, h: int = 90, w: int = 120, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (t, h, w, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_multiscale_crop_matches_videomae_rules() -> None:
    msc = MultiScaleCrop(64)
    # Short side 73: sides int(73 * s) = 73, 63, 54, 48; 63 is within 3 px of 64 and snaps to it.
    # (height, width) pairs whose scale steps differ by at most 1, height-major.
    pairs = msc.crop_candidates(73, 120)
    assert pairs == [(73, 73), (73, 64), (64, 73), (64, 64), (64, 54), (54, 64), (54, 54), (54, 48), (48, 54), (48, 48)]
    offsets = MultiScaleCrop.fixed_offsets(90, 120, 64, 64)
    assert len(offsets) == 13 and (0, 0) in offsets and (24, 56) in offsets and (12, 28) in offsets
    clip = _clip()
    out = msc(clip, torch.Generator().manual_seed(3))
    assert out.shape == (4, 64, 64, 3) and out.dtype == torch.uint8
    assert torch.equal(out, msc(clip, torch.Generator().manual_seed(3)))
    draws = {msc.sample(90, 120, torch.Generator().manual_seed(s)) for s in range(30)}
    assert len(draws) > 5
    same = clip[:1].expand(4, -1, -1, -1)  # identical frames get identical crops
    y = msc(same, torch.Generator().manual_seed(5))
    assert all(torch.equal(y[0], y[k]) for k in range(4))
    fl = msc(torch.rand(3, 4, 90, 120), torch.Generator().manual_seed(3))
    assert fl.shape == (3, 4, 64, 64) and fl.is_floating_point()


def test_random_resized_crop_and_flip() -> None:
    clip = _clip()
    rrc = RandomResizedCropVideo(48)
    a = rrc(clip, torch.Generator().manual_seed(1))
    assert a.shape == (4, 48, 48, 3)
    assert torch.equal(a, rrc(clip, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, rrc(clip, torch.Generator().manual_seed(2)))
    flips = RandomResizedCropVideo(48, hflip=True)
    flipped = 0
    for s in range(8):
        plain = rrc(clip, torch.Generator().manual_seed(s))
        maybe = flips(clip, torch.Generator().manual_seed(s))
        assert torch.equal(maybe, plain) or torch.equal(maybe, plain.flip(2))
        flipped += int(not torch.equal(maybe, plain))
    assert 0 < flipped < 8
    top, left, h, w = rrc.sample(90, 120, torch.Generator().manual_seed(0))
    assert 0 <= top <= 90 - h and 0 <= left <= 120 - w


def test_short_side_resize_and_spatial_crops() -> None:
    land = ShortSideResize(64)(_clip(h=90, w=120))
    assert land.shape == (4, 64, 85, 3)
    port = ShortSideResize(64)(torch.rand(3, 4, 120, 90))
    assert port.shape == (3, 4, 85, 64)
    views = SpatialCrops(64, 3)(land)
    assert views.shape == (3, 4, 64, 64, 3)
    assert torch.equal(views[0], land[:, :, :64]) and torch.equal(views[2], land[:, :, -64:])
    assert torch.equal(views[1], land[:, :, 10:74])
    pviews = SpatialCrops(64, 3)(port)
    assert pviews.shape == (3, 3, 4, 64, 64)
    assert torch.equal(pviews[0], port[:, :, :64]) and torch.equal(pviews[2], port[:, :, -64:])
    assert SpatialCrops(64, 1)(land).shape == (1, 4, 64, 64, 3)


def test_normalize_and_resize_layouts() -> None:
    clip = _clip(h=8, w=8)
    x = Normalize()(clip)
    assert x.shape == (3, 4, 8, 8) and x.dtype == torch.float32
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
    ref = (clip.permute(3, 0, 1, 2).float() / 255 - mean) / std
    assert torch.allclose(x, ref, atol=1e-5)
    # Resizing either layout gives the same picture.
    u = resize_clip(clip, (5, 6))
    f = resize_clip(clip.permute(3, 0, 1, 2).float(), (5, 6))
    assert u.shape == (4, 5, 6, 3) and f.shape == (3, 4, 5, 6)
    assert (u.permute(3, 0, 1, 2).float() - f).abs().max() <= 0.5 + 1e-4




def test_space_separated_list(tmp_path: Path) -> None:
    ann = tmp_path / "train.txt"
    ann.write_text(
        "arm_wrestling.mp4 6\n\n# comment\ncleaning_pool.mp4 cleaning_pool\nflipping_pancake.mkv flipping pancake\n"
    )
    items = read_annotation_list(ann, VIDEOS, class_list=CLASSES)
    names = read_class_list(CLASSES)
    assert items == [
        (v("arm_wrestling.mp4"), 6),
        (v("cleaning_pool.mp4"), names.index("cleaning pool")),
        (v("flipping_pancake.mkv"), names.index("flipping pancake")),
    ]
    assert names[6] == "arm wrestling"
    bad = tmp_path / "bad.txt"
    bad.write_text("my video.mp4 3 extra\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        read_annotation_list(bad, VIDEOS)


def test_csv_with_and_without_header(tmp_path: Path) -> None:
    with_header = tmp_path / "with_header.csv"
    with_header.write_text('path,label\narm_wrestling.mp4,arm wrestling\n"clips/a, b.mp4","cleaning pool"\n')
    items = read_annotation_list(with_header, VIDEOS, class_list=CLASSES)
    assert items[0] == (v("arm_wrestling.mp4"), 6)
    assert items[1][0] == os.path.join(str(VIDEOS), "clips", "a, b.mp4") and len(items) == 2
    no_header = tmp_path / "no_header.csv"
    no_header.write_text("arm_wrestling.mp4,6\ncleaning_pool.mp4,7\n")
    assert [y for _, y in read_annotation_list(no_header, VIDEOS)] == [6, 7]
    # A first row whose label is a known class is data, not a header.
    named = tmp_path / "named.csv"
    named.write_text("arm_wrestling.mp4,arm wrestling\n")
    assert read_annotation_list(named, VIDEOS, class_list=CLASSES) == [(v("arm_wrestling.mp4"), 6)]


def test_unknown_class_name_names_line_file_and_neighbours(tmp_path: Path) -> None:
    ann = tmp_path / "typo.csv"
    ann.write_text("path,label\narm_wrestling.mp4,arm wrestlin\n")
    with pytest.raises(ValueError, match=r"typo\.csv:2.*'arm wrestlin'.*arm wrestling"):
        read_annotation_list(ann, VIDEOS, class_list=CLASSES)


def test_video_folder_and_ssv2(tmp_path: Path) -> None:
    folder = list_video_folder(VIDEOS)
    assert len(folder) == 6 and all(y == -1 for _, y in folder)
    assert v("rotated_90.mov") in [p for p, _ in folder]

    labels = {"Putting something on a surface": "0", "Pushing something from left to right": "1"}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    entries = [
        {"id": "11", "template": "Pushing [something] from left to right", "placeholders": ["cup"]},
        {"id": "12", "template": "Putting [something] on a surface", "placeholders": ["pen"]},
    ]
    (tmp_path / "train.json").write_text(json.dumps(entries))
    (tmp_path / "test.json").write_text(json.dumps([{"id": "13"}]))
    items = read_ssv2_annotations(tmp_path / "train.json", tmp_path / "labels.json", tmp_path / "videos")
    assert items == [(str(tmp_path / "videos" / "11.webm"), 1), (str(tmp_path / "videos" / "12.webm"), 0)]
    assert read_ssv2_annotations(tmp_path / "test.json", tmp_path / "labels.json", tmp_path)[0][1] == -1
    (tmp_path / "bad.json").write_text(json.dumps([{"id": "14", "template": "Putting [something] on a surfac"}]))
    with pytest.raises(ValueError, match="Putting something on a surface"):
        read_ssv2_annotations(tmp_path / "bad.json", tmp_path / "labels.json", tmp_path)




def _small_transform() -> Compose:
    return Compose([MultiScaleCrop(64), Normalize()])


def test_clip_dataset_is_deterministic_and_repeats_samples() -> None:
    ds = VideoClipDataset(
        [(v("arm_wrestling.mp4"), 6)],
        num_frames=4,
        sampling_rate=2,
        transform=_small_transform(),
        num_samples=3,
        seed=5,
    )
    first = ds[0]
    assert len(first) == 3
    for s in first:
        assert s["video"].shape == (3, 4, 64, 64) and s["label"] == 6 and s["index"] == 0 and s["skipped"] == 0
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(first, ds[0]))
    assert not torch.equal(first[0]["video"], first[1]["video"])  # same frames, crops of their own
    ds.set_epoch(1)
    assert not torch.equal(first[0]["video"], ds[0][0]["video"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_dataset_skips_and_counts_corrupt_video(backend: str, caplog: pytest.LogCaptureFixture) -> None:
    # A 49-frame span covers the whole 50-frame file, so every clip reaches its broken packet.
    ds = VideoClipDataset(
        [(v("corrupted.mp4"), 1), (v("arm_wrestling.mp4"), 6)],
        num_frames=4,
        sampling_rate=16,
        transform=_small_transform(),
        backend=backend,
        num_samples=2,
    )
    with caplog.at_level(logging.WARNING, logger="mmmae.video.datasets"):
        out = ds[0]
    assert [s["skipped"] for s in out] == [1, 0]
    assert all(s["label"] == 6 and s["index"] == 0 for s in out)
    assert "corrupted.mp4" in caplog.text
    batch = collate_dicts([out, ds[1]])  # the trainer's collate
    assert batch["video"].shape == (4, 3, 4, 64, 64)
    assert batch["label"].tolist() == [6, 6, 6, 6] and batch["index"].tolist() == [0, 0, 1, 1]
    assert batch["skipped_videos"] == 1 and "skipped_images" not in batch
    assert ds.failures == 1 and ds.attempts == 3


def test_skip_count_survives_worker_processes() -> None:
    ds = VideoClipDataset(
        [
            (v("corrupted.mp4"), 1),
            (v("rotated_90.mov"), 2),
            (v("applying_eye_makeup.avi"), 3),
            (v("arm_wrestling.mp4"), 6),
        ],
        num_frames=4,
        sampling_rate=16,
        transform=Compose([RandomResizedCropVideo(32), Normalize()]),
    )
    ds.set_epoch(3)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_dicts)
    batches = list(loader)
    assert sum(b["skipped_videos"] for b in batches) == 1
    assert [b["index"].tolist() for b in batches] == [[0, 1], [2, 3]]
    # Worker processes draw exactly what the main process draws for (seed, epoch, index).
    in_main = collate_dicts([ds[i] for i in range(4)])
    assert torch.equal(torch.cat([b["video"] for b in batches]), in_main["video"])


def test_max_bad_fraction_stops_training() -> None:
    ds = VideoClipDataset(
        [(v("corrupted.mp4"), 1), (v("rotated_90.mov"), 2)],
        num_frames=4,
        sampling_rate=16,
        transform=Compose([RandomResizedCropVideo(32), Normalize()]),
        max_bad_fraction=0.1,
    )
    with pytest.raises(RuntimeError, match="corrupted.mp4"):
        for _ in range(30):  # half of all reads fail; judged once 20 reads are in
            ds[0]
    assert ds.attempts >= 20
    only_bad = VideoClipDataset([(v("corrupted.mp4"), 1)], num_frames=4, sampling_rate=16)
    with pytest.raises(RuntimeError, match="every video"):
        only_bad[0]


def test_test_dataset_views_and_unreadable_flag() -> None:
    ds = VideoTestDataset(
        [(v("arm_wrestling.mp4"), 6), (v("corrupted.mp4"), 1)],
        num_frames=4,
        sampling_rate=16,
        num_clips=2,
        num_crops=3,
        crop_size=64,
    )
    good, bad = ds[0], ds[1]
    assert good["valid"] and good["video"].shape == (6, 3, 4, 64, 64) and good["label"] == 6
    assert good["unreadable"] is None and good["error"] is None
    assert bad["valid"] is False and bad["video"] is None and bad["unreadable"] == bad["path"] == v("corrupted.mp4")
    assert bad["error"] and bad["label"] == 1 and bad["index"] == 1
    # View 1 is clip 0's centre crop: recompute it by hand (VideoMAE's cv2 resize: no antialias).
    clip0 = videomae_test_indices(280, 4, 16, 2)[0]
    frames = ShortSideResize(64, antialias=False)(open_video(v("arm_wrestling.mp4")).read(clip0))
    centre = SpatialCrops(64, 1)(frames)[0]
    assert torch.allclose(good["video"][1], Normalize()(centre), atol=1e-5)
    batch = collate_dicts([good, bad])
    assert batch["video"].shape == (1, 6, 3, 4, 64, 64) and batch["label"].tolist() == [6]
    assert batch["path"] == [v("arm_wrestling.mp4")] and batch["unreadable"] == [v("corrupted.mp4")]
    assert batch["failed"] == [{"path": v("corrupted.mp4"), "index": 1, "label": 1, "error": bad["error"]}]
