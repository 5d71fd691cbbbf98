"""Fine-tuning augmentations for clips: RandAugment with one draw per clip, per-frame random erasing;
device-side augmentation (data.gpu_augment)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from conftest import VIDEOS
from mmmae.video.transforms import RandAugmentVideo, RandomErasingVideo, finetune_transform


def _static_clip(t: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    frame = torch.randint(0, 256, (48, 64, 3), generator=g, dtype=torch.uint8)
    return frame[None].expand(t, -1, -1, -1).contiguous()


def test_rand_augment_applies_the_same_operations_to_every_frame() -> None:
    clip = _static_clip()
    ra = RandAugmentVideo("rand-m9-n3-mstd0.5-inc1")
    outs = [ra(clip, torch.Generator().manual_seed(s)) for s in range(6)]
    for out in outs:
        assert out.dtype == torch.uint8 and out.shape == clip.shape
        assert all(torch.equal(out[0], out[i]) for i in range(1, len(out)))  # a static clip stays static
    assert any(not torch.equal(o, clip) for o in outs)  # it does augment
    again = ra(clip, torch.Generator().manual_seed(3))
    assert torch.equal(again, outs[3])  # a function of the clip's generator


def test_random_erasing_is_per_frame_seeded_and_leaves_global_rngs_alone() -> None:
    clip = torch.randn(3, 4, 32, 32)
    erase = RandomErasingVideo(probability=1.0)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    a = erase(clip.clone(), torch.Generator().manual_seed(1))
    b = erase(clip.clone(), torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == clip.shape
    changed = (a != clip).flatten(2).any(dim=-1).any(dim=0)  # which frames were erased
    assert bool(changed.all())  # probability 1: every frame has a box
    boxes = [(a[:, t] != clip[:, t]).any(dim=0).nonzero().float().mean(0) for t in range(4)]
    assert len({tuple(bx.round().tolist()) for bx in boxes}) > 1  # frames get their own boxes
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])


@pytest.mark.skipif(not VIDEOS.is_dir(), reason="shared sample videos not found")
def test_finetune_recipe_on_a_real_clip() -> None:
    from mmmae.video.decoding import open_video
    with open_video(str(VIDEOS / "arm_wrestling.mp4")) as r:
        clip = r.read(list(range(0, 32, 4)))
    tf = finetune_transform(64, scale=(0.08, 1.0), hflip=True, rand_augment="rand-m7-n4-mstd0.5-inc1",
                            erase_prob=0.25)
    out = tf(clip, torch.Generator().manual_seed(0))
    assert out.shape == (3, 8, 64, 64) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out, tf(clip, torch.Generator().manual_seed(0)))


# ------------------------------------------------------------------ device-side augmentation


@pytest.mark.parametrize("config, extra", [
    ("video_mae_tiny.yaml", []),  # pretraining: VideoMAE's multi-scale crop, antialiased resize
    ("finetune_kinetics_tiny.yaml", ["data.erase_prob=0", "data.hflip=true",
                                     "data.rand_augment=rand-m7-n4-mstd0.5-inc1"]),  # RRC + flip + RandAugment
])
def test_gpu_augment_gives_the_cpu_paths_clips(config: str, extra: list[str]) -> None:
    """data.gpu_augment splits the training transform: workers draw the same numbers from the same
    per-sample generator and cut the box; the device half resizes, flips and normalises. Run on the
    CPU, the batches equal the CPU path's (so both draw from one distribution), views and flips included."""
    from mmmae.config import load_config, model_cfg
    from mmmae.data.collate import collate_dicts
    from mmmae.data.registry import build_dataset, get_source

    cpu = load_config(config, [f"data.root={VIDEOS}", "data.num_samples=2", *extra])
    dev = load_config(config, [f"data.root={VIDEOS}", "data.num_samples=2", "data.gpu_augment=true", *extra])
    a, b = (build_dataset(c, "train", model_cfg(c.model)) for c in (cpu, dev))
    raw = collate_dicts([b[i] for i in range(3)])
    assert isinstance(raw["video"], list) and raw["video"][0].dtype == torch.uint8  # crops of several sizes
    assert len({tuple(c.shape) for c in raw["video"]}) > 1 and len(raw["video_flip"]) == 6
    augment = get_source(dev.data.dataset).device_transform(dev, model_cfg(dev.model), torch.device("cpu"))
    got, want = augment(raw), collate_dicts([a[i] for i in range(3)])
    assert "video_flip" not in got and got["video"].shape == want["video"].shape == (6, 3, 4, 32, 32)
    assert torch.equal(got["video"], want["video"])


def test_gpu_augment_trains_and_refuses_what_it_does_not_run(tmp_path, dist_group) -> None:  # noqa: ANN001
    from mmmae.config import load_config
    from mmmae.engine.trainer import train

    common = [f"data.root={VIDEOS}", "train.progress=false", "train.vis_every=0", "train.ckpt_every=100",
              "train.log_every=1", "train.max_steps=2", "data.num_workers=0", "train.precision=fp32"]
    summary = train(load_config("video_mae_tiny.yaml", [*common, "data.gpu_augment=true", f"output_dir={tmp_path / 'a'}"]))
    assert summary["step"] == 2 and np.isfinite(summary["last"]["loss"])
    with pytest.raises(ValueError, match="data.erase_prob=0.25"):
        train(load_config("finetune_kinetics_tiny.yaml", [*common, "data.gpu_augment=true", "data.erase_prob=0.25",
                                                          f"output_dir={tmp_path / 'b'}"]))
