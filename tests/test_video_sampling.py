"""VideoMAE's sampling protocols, locked with figures from the reference code (MCG-NJU/VideoMAE kinetics.py,
ssv2.py, datasets.py; OpenGVLab/VideoMAEv2 dataset/pretrain_datasets.py; facebookresearch/mae_st
util/kinetics.py). Each reference rule is written again here, independently, as the reference states it.

Synthetic clips paint frame i a flat grey of level 4 + 4 i (up to 63 frames), so a decoded frame's mean names its index.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from mmmae.config import effective_lr, load_config, model_cfg
from mmmae.video.datasets import VideoClipDataset
from mmmae.video.sampling import (
    ClipSampler,
    clip_coverage,
    segment_test_indices,
    segment_train_indices,
    test_clip_indices,
    train_clip_indices,
    videomae_finetune_indices,
    videomae_pretrain_indices,
    videomae_test_indices,
)
from mmmae.video.sources import clip_sampler, video_items
from mmmae.video.transforms import ShortSideResize, SpatialCrops, resize_clip


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _write_grey_video(path: Path, n: int) -> None:
    """``n`` flat grey frames (level 4 + 4 i), mpeg4 in an mp4 container whatever the file's name."""
    if n > 63:
        raise ValueError(f"{n} frames do not fit in 8-bit grey levels 4 + 4 i")
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.bit_rate = 4_000_000
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 4 + 4 * i, np.uint8), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _grey_ids(video: torch.Tensor) -> list[int]:
    """Float (3, T, H, W) in [0, 255] -> the T painted frame indices."""
    return ((video.mean(dim=(0, 2, 3)) - 4) / 4).round().int().tolist()


# --- 6. Kinetics test views (kinetics.py VideoClsDataset, mode 'test') -----------------------------------

def _reference_test_starts(n: int, clip_len: int, rate: int, segments: int) -> list[int]:
    """First frame of each test clip: ``all_index = range(0, n, rate)`` padded with its last entry, then
    ``temporal_start = int(chunk_nb * max((len - clip_len) / (test_num_segment - 1), 0))``."""
    all_index = list(range(0, n, rate))
    while len(all_index) < clip_len:
        all_index.append(all_index[-1])
    step = max(1.0 * (len(all_index) - clip_len) / (segments - 1), 0)
    return [all_index[int(chunk * step)] for chunk in range(segments)]


def test_kinetics_test_starts_lie_on_videomae_stride_grid() -> None:
    clips = videomae_test_indices(300, 16, 4, 5)
    starts = [c[0] for c in clips]
    assert starts == [0, 56, 116, 176, 236]
    assert starts == _reference_test_starts(300, 16, 4, 5)
    assert all(c == list(range(c[0], c[0] + 64, 4)) for c in clips)  # 16 consecutive grid frames
    # The earlier rule ('fit') rounds evenly spaced starts instead: up to 5 frames off.
    assert [c[0] for c in test_clip_indices(300, 16, 4, 5)] == [0, 60, 120, 179, 239]
    assert ClipSampler(16, 4).test(300, 5) == clips
    for n in (17, 64, 65, 123, 250, 311):
        assert [c[0] for c in videomae_test_indices(n, 16, 4, 5)] == _reference_test_starts(n, 16, 4, 5)


def test_kinetics_short_video_repeats_the_last_grid_frame() -> None:
    # 40 frames at stride 4: grid 0..36 (10 frames), padded with 36 up to 16; every clip the same.
    clips = videomae_test_indices(40, 16, 4, 5)
    assert clips == [[0, 4, 8, 12, 16, 20, 24, 28, 32, 36] + [36] * 6] * 5
    # One clip (the reference divides by zero there): the centre of the grid.
    assert videomae_test_indices(300, 16, 4, 1)[0][0] == 4 * ((75 - 16) // 2)
    with pytest.raises(ValueError, match="num_clips"):
        videomae_test_indices(300, 16, 4, 0)


def test_three_crops_follow_videomae_spatial_step() -> None:
    # 256 x 340 frames, short side to 224: 224 x 297 (int(224 * 340 / 256)); crops start at
    # int(k * (297 - 224) / 2) for k = 0, 1, 2 (kinetics.py test mode, spatial_step).
    h, w = ShortSideResize(224).output_size(256, 340)
    assert (h, w) == (224, 297)
    step = 1.0 * (w - 224) / 2
    assert SpatialCrops(224, 3).offsets(h, w) == [(0, int(k * step)) for k in range(3)] == [(0, 0), (0, 36), (0, 73)]


def _cv2_linear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """cv2.resize(..., INTER_LINEAR) as OpenCV's resize computes its taps: ``s = (d + 0.5) * in / out - 0.5``,
    ``s0 = floor(s)``; ``s0 < 0`` -> (0, weight 0); ``s0 >= in - 1`` -> (in - 1, weight 0)."""

    def taps(n_in: int, n_out: int) -> list[tuple[int, int, float]]:
        out = []
        for d in range(n_out):
            s = (d + 0.5) * n_in / n_out - 0.5
            s0 = math.floor(s)
            f = s - s0
            if s0 < 0:
                s0, f = 0, 0.0
            if s0 >= n_in - 1:
                s0, f = n_in - 1, 0.0
            out.append((s0, min(s0 + 1, n_in - 1), f))
        return out

    rows = np.array([[(1 - f) * img[a, x] + f * img[b, x] for x in range(img.shape[1])]
                     for a, b, f in taps(img.shape[0], out_h)])
    return np.array([[(1 - f) * rows[y, a] + f * rows[y, b] for a, b, f in taps(img.shape[1], out_w)]
                     for y in range(out_h)])


def test_resize_without_antialias_is_opencv_bilinear() -> None:
    # Enlarging 2x2 -> 4x4: row [0, 100] becomes [0, 25, 75, 100] (taps at -0.25 clamped, 0.25, 0.75, 1.25 clamped).
    small = np.array([[0.0, 100.0], [200.0, 255.0]])
    up = resize_clip(torch.tensor(small, dtype=torch.float32).expand(3, 1, 2, 2), (4, 4), antialias=False)[0, 0]
    assert up[0].tolist() == pytest.approx([0, 25, 75, 100])
    assert up.numpy() == pytest.approx(_cv2_linear(small, 4, 4), abs=1e-4)
    # Shrinking by 8/3 and 6/4 (VideoMAE's test resize shrinks Kinetics' 256-320 px frames to 224): still two taps.
    ramp = np.arange(48, dtype=np.float64).reshape(6, 8) * 5.0
    x = torch.tensor(ramp, dtype=torch.float32).expand(3, 2, 6, 8)
    down = resize_clip(x, (4, 3), antialias=False)[0, 0].numpy()
    ref = _cv2_linear(ramp, 4, 3)
    assert down == pytest.approx(ref, abs=1e-4)
    # On a linear ramp two taps are exact: output (0, 0) samples row 0.5 * 6 / 4 - 0.5, column 0.5 * 8 / 3 - 0.5.
    assert ref[0, 0] == pytest.approx(5.0 * (8 * 0.25 + (0.5 * 8 / 3 - 0.5)))
    # The antialiased (PIL-style) filter averages more pixels and differs.
    assert not np.allclose(resize_clip(x, (4, 3), antialias=True)[0, 0].numpy(), ref, atol=0.5)
    # uint8 frames are resized the same way and rounded.
    u8 = torch.tensor(ramp, dtype=torch.uint8)[None, :, :, None].expand(2, 6, 8, 3).contiguous()
    assert np.abs(resize_clip(u8, (4, 3), antialias=False)[0, :, :, 0].double().numpy() - ref).max() <= 0.5


# --- 7. Something-Something v2: segment sampling (ssv2.py SSVideoClsDataset) ---------------------------

def test_ssv2_test_views_are_segment_starts_and_centres() -> None:
    n, t = 61, 16
    tick = n / float(t)
    starts = [int(tick * x) for x in range(t)]
    centres = [int(tick / 2.0 + tick * x) for x in range(t)]
    clips = segment_test_indices(n, t, 2)
    assert clips == [starts, centres]
    assert starts == [0, 3, 7, 11, 15, 19, 22, 26, 30, 34, 38, 41, 45, 49, 53, 57]
    assert ClipSampler(t, 2, sampling="segment").test(n, 2) == clips
    # A segment clip spans ~95% of the video; a dense 16 x 2 clip (mmmae's earlier SSv2 sampling) ~51%.
    assert clip_coverage(clips[0], n) == pytest.approx(58 / 61) and clip_coverage(clips[0], n) > 0.95
    dense = test_clip_indices(n, t, 2, 2)[0]
    assert clip_coverage(dense, n) == pytest.approx(31 / 61)
    assert clip_coverage(videomae_test_indices(n, t, 2, 2)[0], n) == pytest.approx(31 / 61)


def test_ssv2_training_takes_one_random_frame_per_segment() -> None:
    # average_duration = 61 // 16 = 3: frame x in [3x, 3x + 2], each offset drawn per segment.
    draws = [segment_train_indices(61, 16, _gen(s)) for s in range(60)]
    for x in range(16):
        assert {d[x] for d in draws} == {3 * x, 3 * x + 1, 3 * x + 2}
    assert len({tuple(d) for d in draws}) == 60
    assert segment_train_indices(10, 16, _gen(0)) == [0] * 16  # fewer frames than segments: frame 0
    assert ClipSampler(16, 2, sampling="segment").train(61, _gen(3)) == segment_train_indices(61, 16, _gen(3))


# --- 8. Pretraining clips (kinetics.py VideoMAE._sample_train_indices, _video_TSN_decord_batch_loader) -----

def _reference_pretrain_frames(n: int, new_length: int, new_step: int, offset0: int) -> list[int]:
    """The loader's loop from a 0-based start: the 1-based offset advances while ``offset + new_step < n``."""
    frames, offset = [], offset0 + 1
    for _ in range(new_length):
        frames.append(offset - 1)
        if offset + new_step < n:
            offset += new_step
    return frames


def test_pretraining_starts_keep_the_whole_window_inside() -> None:
    # 100 frames, 16 x 4: skip_length 64, average_duration 100 - 64 + 1 = 37 starts, so the largest is 36.
    starts = {videomae_pretrain_indices(100, 16, 4, _gen(s))[0] for s in range(600)}
    assert starts == set(range(37)) and max(starts) == 36
    # The earlier rule ('fit') lets the 61-frame span end at the last frame: 40 starts, 3 of them (7.5%)
    # never drawn by VideoMAE.
    fit = {train_clip_indices(100, 16, 4, _gen(s))[0] for s in range(600)}
    assert fit == set(range(40)) and len(fit - starts) / len(fit) == pytest.approx(0.075)
    for s in range(50):
        idx = videomae_pretrain_indices(100, 16, 4, _gen(s))
        assert idx == _reference_pretrain_frames(100, 16, 4, idx[0])


def test_pretraining_short_video_gives_the_fixed_clip() -> None:
    # Shorter than 64 frames: offsets = 0 (no randomness); the loop never steps onto the last frame.
    assert videomae_pretrain_indices(40, 16, 4, _gen(0)) == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36] + [36] * 6
    assert videomae_pretrain_indices(61, 16, 4, _gen(0)) == list(range(0, 57, 4)) + [56]  # frame 60 unused
    for n in range(1, 64):
        clips = {tuple(videomae_pretrain_indices(n, 16, 4, _gen(s))) for s in range(3)}
        assert clips == {tuple(_reference_pretrain_frames(n, 16, 4, 0))}


def test_finetuning_clip_spreads_sixteen_points_over_the_window() -> None:
    # VideoClsDataset train: end in [64, n - 1]; np.linspace(end - 64, end, 16) clipped to end - 1, truncated.
    # 65 frames leave one window (end 64): points k * 64 / 15.
    expected = [min(int(k * 64 / 15), 63) for k in range(16)]
    assert expected == [0, 4, 8, 12, 17, 21, 25, 29, 34, 38, 42, 46, 51, 55, 59, 63]
    assert videomae_finetune_indices(65, 16, 4, _gen(0)) == expected
    assert list(np.clip(np.linspace(0, 64, 16), 0, 63).astype(np.int64)) == expected
    # Short (n <= 64): n // 4 points over [0, n], then n, clipped to n - 1.
    assert videomae_finetune_indices(40, 16, 4, _gen(0)) == [0, 4, 8, 13, 17, 22, 26, 31, 35, 39] + [39] * 6
    starts = {videomae_finetune_indices(100, 16, 4, _gen(s))[0] for s in range(600)}
    assert starts == set(range(36))  # end in [64, 99]
    assert ClipSampler(16, 4, stage="finetune").train(100, _gen(5)) == videomae_finetune_indices(100, 16, 4, _gen(5))


# --- 9. Repeated sampling: shared window (VideoMAEv2) vs independent windows (MAE-ST) ---------------------

def _frames_as_float(clip: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return clip.permute(3, 0, 1, 2).float()


def test_repeated_views_share_their_window_unless_independent(tmp_path: Path) -> None:
    path = tmp_path / "grey.mp4"
    _write_grey_video(path, 40)
    sampler = ClipSampler(4, 2)
    shared = VideoClipDataset([(str(path), 0)], transform=_frames_as_float, num_samples=4, sampler=sampler)
    indep = VideoClipDataset([(str(path), 0)], transform=_frames_as_float, num_samples=4, sampler=sampler,
                             repeat_mode="independent")
    differ = 0
    for epoch in range(4):
        shared.set_epoch(epoch)
        indep.set_epoch(epoch)
        views = [_grey_ids(s["video"]) for s in shared[0]]
        assert all(v == views[0] for v in views)  # VideoMAEv2: one frame_id_list, the transform per view
        assert views[0] == list(range(views[0][0], views[0][0] + 8, 2)) and 0 <= views[0][0] <= 40 - 8
        ids = [_grey_ids(s["video"]) for s in indep[0]]
        differ += len({tuple(v) for v in ids}) > 1  # MAE-ST: get_start_end_idx once per repeat
    assert differ == 4
    with pytest.raises(ValueError, match="repeat_mode"):
        VideoClipDataset([(str(path), 0)], repeat_mode="shared")


# --- configuration: defaults per source, recipes, bad input ---------------------------------------------

def test_sampling_defaults_per_source_and_bad_values() -> None:
    ssv2 = load_config("finetune_ssv2.yaml")
    assert clip_sampler(ssv2, "ssv2", "finetune").sampling == "segment"
    auto = load_config("finetune_ssv2.yaml", ["data.sampling=auto"])
    assert clip_sampler(auto, "ssv2", "finetune").sampling == "segment"
    assert clip_sampler(auto, "ssv2", "pretrain").sampling == "dense"  # VideoMAE pretrains SSv2 densely
    kinetics = load_config("finetune_kinetics.yaml")
    assert clip_sampler(kinetics, "video_list", "finetune") == ClipSampler(16, 4, stage="finetune")
    assert kinetics.data.repeat_mode == "shared_window" and load_config("video_mae.yaml").data.clip_rule == "videomae"
    for key, bad in (("data.sampling", "tsn"), ("data.clip_rule", "uniform"), ("data.short_clip", "wrap")):
        with pytest.raises(ValueError, match=rf"{key}='{bad}'"):
            clip_sampler(load_config("finetune_kinetics.yaml", [f"{key}={bad}"]), "video_list", "finetune")


def test_ssv2_recipe_matches_videomae_script() -> None:
    # scripts/ssv2/videomae_vit_base_patch16_224_tubemasking_ratio_0.9_epoch_2400/finetune.sh
    cfg = load_config("finetune_ssv2.yaml")
    d, m = cfg.data, model_cfg(cfg.model)
    assert (d.dataset, cfg.model.num_frames, d.num_clips, d.num_crops, d.hflip) == ("ssv2", 16, 2, 3, False)
    assert (d.batch_size, d.num_samples, cfg.train.epochs, m.num_classes, m.img_size) == (6, 2, 30, 174, 224)
    assert (cfg.optim.layer_decay, m.drop_path_rate, cfg.optim.warmup_epochs) == (0.75, 0.1, 5)
    assert (cfg.train.mixup, cfg.train.cutmix, m.label_smoothing, d.erase_prob) == (0.8, 1.0, 0.1, 0.25)
    assert d.rand_augment == "rand-m7-n4-mstd0.5-inc1" and list(cfg.optim.betas) == [0.9, 0.999]
    # run_class_finetuning.py: lr = 5e-4 * batch_size * world_size / 256 (the repeats are not counted).
    assert effective_lr(cfg, 64) == pytest.approx(5e-4 * 6 * 64 / 256)


def _ssv2_files(root: Path, lengths: dict[str, int]) -> tuple[Path, Path]:
    labels = {"Pushing something from left to right": "0", "Pushing something from right to left": "1",
              "Putting something on a surface": "2"}
    templates = list(labels)
    (root / "labels.json").write_text(json.dumps(labels))
    entries = [{"id": vid, "template": templates[k % 3].replace("something", "[something]"), "placeholders": ["x"]}
               for k, vid in enumerate(lengths)]
    (root / "validation.json").write_text(json.dumps(entries))
    return root / "validation.json", root / "labels.json"


def test_ssv2_missing_videos_are_named(tmp_path: Path) -> None:
    val, labels = _ssv2_files(tmp_path, {"101": 40, "102": 40})
    _write_grey_video(tmp_path / "101.webm", 20)
    cfg = load_config("finetune_ssv2.yaml", [f"data.root={tmp_path}", f"data.val_list={val}",
                                             f"data.class_list={labels}"])
    with pytest.raises(FileNotFoundError, match=r"1 of 2 videos are missing.*102\.webm"):
        video_items(cfg, "val", "ssv2")


def test_ssv2_evaluation_reads_the_json_with_segment_views(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from mmmae.registry import build_from_cfg
    from mmmae.data.registry import build_dataset
    from mmmae.evaluation import classify

    lengths = {"201": 40, "202": 61, "203": 33}
    val, labels = _ssv2_files(tmp_path, lengths)
    for vid, n in lengths.items():
        _write_grey_video(tmp_path / f"{vid}.webm", n)
    cfg = load_config("finetune_ssv2_tiny.yaml", [
        "data.dataset=ssv2", f"data.root={tmp_path}", f"data.val_list={val}", f"data.class_list={labels}",
        "data.sampling=auto", "model.num_classes=3"])
    ds = build_dataset(cfg, "val", model_cfg(cfg.model))
    assert ds.sampler.sampling == "segment" and len(ds) == 3
    # 61 frames, 4 segments (tick 15.25): clip 0 = starts int(15.25 x), clip 1 = centres int(7.625 + 15.25 x).
    views = ds[1]["video"]  # (2 clips x 3 crops, 3, T, S, S), normalised
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1, 1)
    pixels = [(views[v] * std + mean) * 255 for v in (0, 3)]
    assert [_grey_ids(p) for p in pixels] == [[0, 15, 30, 45], [7, 22, 38, 53]] == segment_test_indices(61, 4, 2)
    ckpt = tmp_path / "model.safetensors"
    model = build_from_cfg(cfg.model.name, model_cfg(cfg.model))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    report = classify(cfg, str(ckpt), progress=False, device=torch.device("cpu"))
    assert report["protocol"]["sampling"] == "segment" and report["protocol"]["dataset"] == "ssv2"
    assert (report["protocol"]["num_clips"], report["protocol"]["num_crops"]) == (2, 3)
    assert report["num_items"] == report["num_evaluated"] == 3 and report["load"]["missing"] == []
    names = {Path(v["path"]).name: v for v in report["predictions"]}
    assert names["202.webm"]["label_name"] == "Pushing something from right to left"
