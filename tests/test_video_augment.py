"""Fine-tuning augmentations for clips: RandAugment with one draw per clip, per-frame random erasing."""

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
