"""The study (tools/study.py): pretraining beats scratch on held-out Fashion-MNIST by more than the seed
spread (the quick variant, in-process), and the moving Fashion-MNIST clips it builds its video task from."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import tool_module


def test_quick_study_pretraining_beats_scratch_on_held_out_data(tmp_path: Path, fashion_mnist: Path,
                                                                 dist_group: None) -> None:
    out = tmp_path / "study"
    assert tool_module("study").main(["--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["plan"]["name"] == "quick" and len(results["plan"]["seeds"]) >= 2
    points = [p for p in results["points"] if p["group"] == "labels" and p["protocol"] == "finetune"]
    for fraction in results["plan"]["image"]["fractions"]:
        pre = [p["test_acc"] for p in points if p["labels"] == fraction and p["init"] != "scratch"]
        scratch = [p["test_acc"] for p in points if p["labels"] == fraction and p["init"] == "scratch"]
        assert len(pre) == len(scratch) == len(results["plan"]["seeds"])
        spread = max(max(pre) - min(pre), max(scratch) - min(scratch))
        margin = sum(pre) / len(pre) - sum(scratch) / len(scratch)
        assert margin > spread, (fraction, pre, scratch)
    assert all(c["beats_scratch"] for c in results["checks"]), results["checks"]
    # The pretraining ran through the engine and saw only the train file; the test items are t10k's.
    for run in results["runs"]:
        assert Path(run["weights"]).is_file()
        assert (Path(run["run_dir"]) / "config.yaml").read_text().count("fashion_mnist") == 1
    report = (out / "report.md").read_text()
    assert "| MAE 0.75, fine-tune |" in report and "tools/study.py --quick" in report
    from PIL import Image
    with Image.open(out / "labels.png") as im:
        assert im.size[0] > 300 and im.size[1] > 200


def _clips_cfg(**kw: object):  # noqa: ANN202
    from omegaconf import OmegaConf
    from mmmae.video.moving_mnist import MovingFashionMNISTCfg
    return OmegaConf.merge(OmegaConf.structured(MovingFashionMNISTCfg), {"train_clips": 48, "val_clips": 16, **kw})


def test_clockwise_means_clockwise_on_screen() -> None:
    """A bright dot right of the item's centre, turned by a positive angle, moves up (counter-clockwise
    as seen, with y pointing down); a negative angle moves it down (clockwise)."""
    from mmmae.video.moving_mnist import render_clips
    item = torch.zeros(1, 1, 9, 9)
    item[0, 0, 4, 7] = 1.0  # right of the centre (4, 4)
    centres = torch.full((1, 1, 3, 2), 10.0)
    angles = torch.tensor([[[0.0, math.pi / 2, -math.pi / 2]]])
    frames = render_clips(item, centres, angles, 21)[0]
    peaks = [divmod(int(f.argmax()), 21) for f in frames]  # (row, col)
    assert peaks[0][0] == 10 and peaks[0][1] > 10  # right
    assert peaks[1][0] < 10 and peaks[1][1] == 10  # up: counter-clockwise on screen
    assert peaks[2][0] > 10 and peaks[2][1] == 10  # down: clockwise


def test_moving_fashion_mnist_clips(fashion_mnist: Path) -> None:
    from mmmae.image.datasets import FashionMNIST
    from mmmae.video.moving_mnist import MovingFashionMNIST
    cfg = _clips_cfg(root=str(fashion_mnist))
    train, val = MovingFashionMNIST(cfg, "train", 6, 32), MovingFashionMNIST(cfg, "val", 6, 32)
    assert len(train) == 48 and len(val) == 16
    s = train[3]
    assert s["video"].shape == (3, 6, 32, 32) and 0 <= s["label"] < 10
    # The label is 2 x group + clockwise; both items of a clip come from that group.
    from mmmae.video.moving_mnist import GROUPS
    group_of = torch.tensor([next(g for g, members in enumerate(GROUPS) if c in members) for c in range(10)])
    classes = torch.from_numpy(FashionMNIST(str(fashion_mnist), "train").labels.astype("int64"))[train.items]
    assert (group_of[classes] == (train.labels // 2)[:, None]).all()
    assert set(train.labels.tolist()) <= set(range(10)) and len(set(train.labels.tolist())) > 5
    # Objects move: consecutive frames differ; the canvas keeps the whole object (no clipped mass).
    clips = train.clips.float()
    assert (clips[:, 1:] - clips[:, :-1]).abs().mean() > 1.0
    mass = clips.sum(dim=(2, 3))
    assert (mass.std(dim=1) / mass.mean(dim=1)).max() < 0.35
    # The same seed gives the same clips; another seed others; limit keeps the first clips.
    again = MovingFashionMNIST(_clips_cfg(root=str(fashion_mnist), train_clips=48, limit=5), "train", 6, 32)
    assert torch.equal(again.clips, train.clips[:5]) and torch.equal(again.labels, train.labels[:5])
    other = MovingFashionMNIST(_clips_cfg(root=str(fashion_mnist), seed=1), "train", 6, 32)
    assert not torch.equal(other.clips, train.clips)
    # val clips are made of t10k items (a different file), train clips of train items.
    assert not torch.equal(val.clips[:4], train.clips[:4])


def test_moving_fashion_mnist_is_a_registered_video_source(fashion_mnist: Path, tmp_path: Path) -> None:
    from mmmae.config import ConfigError, load_config, model_cfg
    from mmmae.data.registry import build_dataset
    cfg_file = tmp_path / "vmae.yaml"
    cfg_file.write_text("base: video_mae_tiny.yaml\ndata:\n  dataset: moving_fashion_mnist\n  train_clips: 24\n"
                        f"  root: {fashion_mnist}\n")
    cfg = load_config(cfg_file)
    ds = build_dataset(cfg, "train", model_cfg(cfg.model))
    assert len(ds) == 24 and ds[0]["video"].shape == (3, cfg.model.num_frames, cfg.model.img_size, cfg.model.img_size)
    with pytest.raises(ConfigError, match="sampling_rate"):
        load_config(cfg_file, ["data.sampling_rate=2"])
    with pytest.raises(ConfigError, match="moving_fashion_mnist"):
        load_config("image_mae_tiny.yaml", ["data.dataset=moving_fashion_mnist"])
