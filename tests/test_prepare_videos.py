"""tools/prepare_videos.py on the real sample clips: readable H.264 outputs with short side 320 and a
keyframe every 16 frames (read back from the packets with PyAV), every frame kept in order, the
corrupt clip reported and left out of the new list, shards, and a rerun that skips finished files."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import av
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, VIDEOS, run_tool
from mmmae.video.datasets import read_annotation_list, read_class_list
from mmmae.video.decoding import open_video

pytestmark = pytest.mark.skipif(not VIDEOS.is_dir(), reason="shared/data/videos not found")

SOURCES = {"applying_eye_makeup.mp4": "applying_eye_makeup.avi", "arm_wrestling.mp4": "arm_wrestling.mp4",
           "cleaning_pool.mp4": "cleaning_pool.mp4", "flipping_pancake.mp4": "flipping_pancake.mkv",
           "rotated_90.mp4": "rotated_90.mov"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    run_tool("prepare_videos.py", ["--input", str(VIDEOS), "--out", str(out), "--workers", "2", "--shards",
                                   "--shard-size", "2", "--no-progress"])
    return out


def keyframe_positions(path: Path) -> tuple[list[int], int]:
    """Presentation-order indices of the keyframe packets, and the frame count."""
    with av.open(str(path)) as c:
        assert not c.streams.audio  # audio dropped
        packets = [(p.pts, p.is_keyframe) for p in c.demux(video=0) if p.size]
    order = {pts: i for i, pts in enumerate(sorted(pts for pts, _ in packets))}
    return sorted(order[pts] for pts, key in packets if key), len(packets)


def test_report_lists_the_corrupt_clip_and_the_list_leaves_it_out(prepared: Path) -> None:
    report = json.loads((prepared / "prepare_report.json").read_text())
    assert report["total"] == 6 and report["converted"] == 5 and report["skipped_existing"] == 0
    assert [Path(f["path"]).name for f in report["failed"]] == ["corrupted.mp4"] and report["failed"][0]["error"]
    assert report["settings"] == {"short_side": 320, "gop": 16, "crf": 23, "preset": "veryfast"}
    items = read_annotation_list(prepared / "videos.txt", prepared)
    assert [Path(p).name for p, _ in items] == sorted(SOURCES) and {y for _, y in items} == {-1}
    assert (prepared / "videos.txt").read_text().splitlines()[0] == "applying_eye_makeup.mp4 -1"  # relative
    assert not list(prepared.rglob("*.tmp")) and not (prepared / "corrupted.mp4").exists()


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_outputs_short_side_gop_and_frames(prepared: Path, name: str) -> None:
    out = prepared / name
    keys, n = keyframe_positions(out)
    with open_video(str(VIDEOS / SOURCES[name]), "pyav") as src, open_video(str(out), "pyav") as dst:
        assert dst.num_frames == n == src.num_frames  # every frame kept
        assert keys == list(range(0, n, 16))  # a keyframe exactly every --gop frames
        idx = sorted({0, 1, n // 2, n - 1})
        a, b = dst.read(idx), src.read(idx)
    with open_video(str(out), "torchcodec") as fast:  # the default backend reads the outputs alike
        assert fast.num_frames == n and torch.equal(fast.read(idx), a)
    assert min(a.shape[1:3]) == 320 and a.shape[1] % 2 == 0 and a.shape[2] % 2 == 0
    # Aspect kept (FFmpeg scale=-2:320 rounding): 340 x 256 -> 426 x 320, 426 x 240 -> 568 x 320,
    # the rotated 320 x 568 portrait stays portrait.
    expected = {"applying_eye_makeup.mp4": (320, 426), "flipping_pancake.mp4": (320, 568),
                "rotated_90.mp4": (568, 320)}.get(name, (320, 426))
    assert tuple(a.shape[1:3]) == expected
    # Same frames in the same order: the source resized to the output size differs by the encoding
    # loss only (measured mean abs diff 2.1-2.7 at crf 23; neighbouring frames differ by 16-58).
    ref = F.interpolate(b.permute(0, 3, 1, 2).float(), size=expected, mode="bicubic", align_corners=False)
    err = (a.permute(0, 3, 1, 2).float() - ref.clamp(0, 255)).abs().mean(dim=(1, 2, 3))
    assert torch.all(err < 5), err


def test_rotated_clip_is_written_upright_without_rotation(prepared: Path) -> None:
    with av.open(str(prepared / "rotated_90.mp4")) as c:
        frame = next(c.decode(video=0))
    assert (frame.width, frame.height) == (320, 568) and not frame.rotation


def test_shards_hold_the_videos_and_labels(prepared: Path) -> None:
    names = (prepared / "shards.txt").read_text().split()
    assert names == [f"shards/videos-{k:06d}.tar" for k in range(3)]  # 5 videos, 2 per shard
    members = []
    for name in names:
        with tarfile.open(prepared / name) as tar:
            for m in tar.getmembers():
                data = tar.extractfile(m).read()
                members.append((m.name, data))
    assert [n for n, _ in members] == [f"{k:09d}.{ext}" for k in range(5) for ext in ("mp4", "json")]
    metas = [json.loads(d) for n, d in members if n.endswith(".json")]
    assert [m["path"] for m in metas] == sorted(SOURCES) and {m["label"] for m in metas} == {-1}
    assert members[0][1] == (prepared / "applying_eye_makeup.mp4").read_bytes()


def test_rerun_skips_finished_outputs_and_refuses_other_settings(prepared: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in prepared.glob("*.mp4")}
    run_tool("prepare_videos.py", ["--input", str(VIDEOS), "--out", str(prepared), "--no-progress"])
    report = json.loads((prepared / "prepare_report.json").read_text())
    assert report["converted"] == 0 and report["skipped_existing"] == 5 and len(report["failed"]) == 1
    assert {p.name: p.stat().st_mtime_ns for p in prepared.glob("*.mp4")} == before
    res = run_tool("prepare_videos.py", ["--input", str(VIDEOS), "--out", str(prepared), "--gop", "8"], check=False)
    assert res.returncode != 0 and "'gop': (16, 8)" in res.stderr


def test_list_input_keeps_labels_with_paths_relative_to_out(tmp_path: Path) -> None:
    classes = VIDEOS / "kinetics400_classes.txt"
    listing = tmp_path / "train.txt"
    listing.write_text("arm_wrestling.mp4 arm wrestling\nflipping_pancake.mkv flipping pancake\ncorrupted.mp4 -1\n")
    out = tmp_path / "out"
    run_tool("prepare_videos.py", ["--input", str(listing), "--root", str(VIDEOS), "--class-list", str(classes),
                                   "--out", str(out), "--short-side", "160", "--gop", "8", "--no-progress"])
    names = read_class_list(classes)
    assert (out / "train.txt").read_text().splitlines() == [
        f"arm_wrestling.mp4 {names.index('arm wrestling')}", f"flipping_pancake.mp4 {names.index('flipping pancake')}"]
    keys, n = keyframe_positions(out / "flipping_pancake.mp4")
    assert n == 310 and keys == list(range(0, 310, 8))
    with open_video(str(out / "arm_wrestling.mp4")) as r:
        assert tuple(r.read([0]).shape) == (1, 160, 212, 3)  # 340 * 160 / 256 = 212.5 -> 212 (even)


def test_bad_arguments_name_the_value(tmp_path: Path) -> None:
    res = run_tool("prepare_videos.py", ["--input", str(VIDEOS), "--out", str(tmp_path), "--short-side", "321"],
                   check=False)
    assert res.returncode != 0 and "--short-side=321: must be an even number" in res.stderr


def test_shards_are_a_training_source_with_the_files_frames(prepared: Path) -> None:
    from mmmae.config import load_config, model_cfg
    from mmmae.data.registry import build_dataset
    from mmmae.video.shards import ShardIndex

    def dataset(overrides: list[str]) -> object:
        cfg = load_config(ROOT / "configs" / "video_mae_tiny.yaml", [f"data.root={prepared}", *overrides])
        return build_dataset(cfg, "train", model_cfg(cfg.model))

    shards = dataset(["data.dataset=video_shards", f"data.train_list={prepared / 'shards.txt'}"])
    files = dataset([f"data.train_list={prepared / 'videos.txt'}", "data.class_list="])
    assert [p.rsplit("/", 1)[1] for p, _ in shards.items] == [f"{k:09d}.mp4" for k in range(5)]
    assert shards.items[0][0].startswith(str(prepared / "shards" / "videos-000000.tar") + "/")
    assert [y for _, y in shards.items] == [y for _, y in files.items] == [-1] * 5
    for i in range(5):  # same seed, same clips: the shard member decodes to the file's frames
        assert all(torch.equal(a["video"], b["video"]) for a, b in zip(shards[i], files[i]))
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        ShardIndex([str(prepared / "missing.tar")])


def test_shards_are_an_evaluation_source(prepared: Path, tmp_path: Path) -> None:
    """The one evaluation runner reads video shards as it reads a list: every member scored, in order."""
    from safetensors.torch import save_file

    from mmmae.config import load_config, model_cfg
    from mmmae.evaluation import classify
    from mmmae.registry import build_from_cfg

    cfg = load_config("finetune_kinetics_tiny.yaml", ["data.dataset=video_shards", f"data.root={prepared}",
                                                      f"data.val_list={prepared / 'shards.txt'}", "data.class_list=",
                                                      "data.num_workers=0"])
    ckpt = tmp_path / "clf.safetensors"
    save_file(build_from_cfg("classifier", model_cfg(cfg.model)).state_dict(), str(ckpt))
    report = classify(cfg, str(ckpt), progress=False, device=torch.device("cpu"))
    assert (report["num_items"], report["num_evaluated"], report["num_unreadable"]) == (5, 5, 0)
    assert [p["path"].rsplit("/", 1)[1] for p in report["predictions"]] == [f"{k:09d}.mp4" for k in range(5)]
    assert report["protocol"]["dataset"] == "video_shards"
