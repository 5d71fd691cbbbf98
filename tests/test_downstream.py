"""Downstream pipelines end to end on the real sample data: video fine-tuning -> Kinetics multi-view
evaluation; image and video linear probes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import VIDEOS, run_tool

pytestmark = pytest.mark.skipif(not VIDEOS.is_dir(), reason="shared sample videos not found")


@pytest.fixture(scope="module")
def videomae_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("videomae") / "pre"
    run_tool("train.py", ["--config", "video_mae_tiny.yaml", f"output_dir={run}", "train.progress=false",
                          f"data.root={VIDEOS}", f"data.class_list={VIDEOS / 'kinetics400_classes.txt'}"])
    return run / "model.safetensors"


def _video_args(run: Path) -> list[str]:
    return [f"output_dir={run}", "train.progress=false", f"data.root={VIDEOS}",
            f"data.class_list={VIDEOS / 'kinetics400_classes.txt'}"]


@pytest.mark.slow
def test_finetune_then_kinetics_protocol(tmp_path: Path, videomae_tiny: Path) -> None:
    run = tmp_path / "ft"
    run_tool("train.py", ["--config", "finetune_kinetics_tiny.yaml", *_video_args(run), f"init_from={videomae_tiny}"],
             procs=2)
    init = json.loads((run / "init_report.json").read_text())
    assert init["missing"] == []  # every encoder weight came from the pretraining run
    assert set(init["unexpected"]) <= {"norm.weight", "norm.bias"}  # mean pooling + fc_norm replace it
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and all(r["ce_loss"] is not None for r in rows)
    # Mixup's soft targets with label smoothing: the loss starts near log(400).
    assert 5.0 < rows[0]["ce_loss"] < 6.5
    ft_state = load_file(str(run / "model.safetensors"))
    pre_state = load_file(str(videomae_tiny))
    assert "head.weight" in ft_state and ft_state["head.weight"].shape[0] == 400
    # Fine-tuning moves the encoder too (unlike the linear probe below).
    assert not torch.equal(ft_state["encoder.blocks.0.mlp.fc1.weight"], pre_state["encoder.blocks.0.mlp.fc1.weight"])

    report_path = tmp_path / "report.json"
    run_tool("eval_kinetics.py", ["--config", "finetune_kinetics_tiny.yaml", "--checkpoint",
                                  str(run / "model.safetensors"), "--out", str(report_path), f"data.root={VIDEOS}",
                                  f"data.class_list={VIDEOS / 'kinetics400_classes.txt'}"])
    report = json.loads(report_path.read_text())
    m = report["metrics"]
    assert set(m) == {"top1", "top5", "mean_class_acc"} and all(0 <= v <= 100 for v in m.values())
    assert report["protocol"]["num_clips"] == 2 and report["protocol"]["num_crops"] == 3
    assert report["num_items"] == 4 and report["num_evaluated"] == 3 and report["num_unreadable"] == 1
    assert report["unreadable"][0]["path"].endswith("corrupted.mp4") and report["unreadable"][0]["error"]
    names = {Path(v["path"]).name: v for v in report["predictions"]}
    assert names["arm_wrestling.mp4"]["label_name"] == "arm wrestling"
    # top-1 is recomputed from the per-video predictions the report lists.
    assert m["top1"] == pytest.approx(100 * sum(v["pred"] == v["label"] for v in report["predictions"]) / 3)


@pytest.mark.slow
def test_video_linear_probe_keeps_the_encoder_frozen(tmp_path: Path, videomae_tiny: Path) -> None:
    run = tmp_path / "lp"
    run_tool("train.py", ["--config", "finetune_kinetics_tiny.yaml", *_video_args(run), f"init_from={videomae_tiny}",
                          "model.linear_probe=true", "train.mixup=0", "train.cutmix=0", "train.precision=fp32"])
    after = load_file(str(run / "model.safetensors"))
    before = load_file(str(videomae_tiny))
    shared = [k for k in before if k.startswith("encoder.") and k in after]
    assert len(shared) > 10
    for k in shared:
        assert torch.equal(after[k], before[k]), f"{k} changed under the linear probe"
    assert "head.fc.weight" in after and "head.bn.running_mean" in after


@pytest.mark.slow
def test_image_linear_probe_on_fashion_mnist(tmp_path: Path, fashion_mnist: Path) -> None:
    pre, lp = tmp_path / "pre", tmp_path / "lp"
    run_tool("train.py", ["--config", "image_mae_tiny.yaml", f"output_dir={pre}", "train.progress=false",
                          "train.max_steps=20"])
    run_tool("train.py", ["--config", "linprobe_fashion_mnist_tiny.yaml", f"output_dir={lp}", "train.progress=false",
                          f"init_from={pre / 'model.safetensors'}", "train.max_steps=60"])
    report_path = tmp_path / "probe.json"
    run_tool("eval_classification.py", ["--config", "linprobe_fashion_mnist_tiny.yaml", "--checkpoint",
                                        str(lp / "model.safetensors"), "--out", str(report_path), "data.limit=500"])
    report = json.loads(report_path.read_text())
    assert report["num_evaluated"] == 500 and report["protocol"]["linear_probe"] is True
    assert report["load"]["missing"] == [] and report["load"]["unexpected"] == []
    # Ten balanced classes: a probe that learned nothing sits at 10%.
    assert report["metrics"]["top1"] > 12.0, report["metrics"]


def test_video_folder_evaluation_goes_through_the_source(tmp_path: Path) -> None:
    """The one runner evaluates any video source's val split: a folder of unlabelled videos gets a
    prediction per readable video, no score, and the corrupt file listed (never replaced)."""
    import math

    from safetensors.torch import save_file

    from mmmae.config import load_config, model_cfg
    from mmmae.evaluation import classify
    from mmmae.registry import build_from_cfg

    cfg = load_config("finetune_kinetics_tiny.yaml", ["data.dataset=video_folder", f"data.root={VIDEOS}",
                                                      "data.num_workers=0", "data.class_list="])
    ckpt = tmp_path / "clf.safetensors"
    save_file(build_from_cfg("classifier", model_cfg(cfg.model)).state_dict(), str(ckpt))
    report = classify(cfg, str(ckpt), progress=False, device=torch.device("cpu"))
    assert (report["num_items"], report["num_evaluated"], report["num_labelled"]) == (6, 5, 0)  # 6 videos there
    assert [Path(u["path"]).name for u in report["unreadable"]] == ["corrupted.mp4"]
    assert sorted(Path(p["path"]).name for p in report["predictions"]) == [
        "applying_eye_makeup.avi", "arm_wrestling.mp4", "cleaning_pool.mp4", "flipping_pancake.mkv", "rotated_90.mov"]
    assert all(p["label"] == -1 and 0 <= p["pred"] < cfg.model.num_classes for p in report["predictions"])
    assert math.isnan(report["metrics"]["top1"])
    assert report["protocol"]["dataset"] == "video_folder" and report["protocol"]["num_clips"] == cfg.data.num_clips
