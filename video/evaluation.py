"""Kinetics-protocol evaluation of a video classifier: multi-view test, per-video softmax averaging."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from mmmae.config import model_cfg
from mmmae.convert import load_checkpoint_file
from mmmae.metrics import aggregate_views, classification_metrics
from mmmae.registry import build_from_cfg
from mmmae.video.datasets import VideoTestDataset, collate_test, read_annotation_list

log = logging.getLogger(__name__)


def load_classifier(cfg: DictConfig, checkpoint: str, device: torch.device) -> tuple[torch.nn.Module, dict[str, list[str]]]:
    """The config's model with a fine-tuned checkpoint's weights; returns the load report."""
    model = build_from_cfg(cfg.model.name, model_cfg(cfg.model))
    state = load_checkpoint_file(checkpoint)
    res = model.load_state_dict(state, strict=False)
    report = {"missing": list(res.missing_keys), "unexpected": list(res.unexpected_keys)}
    if report["missing"]:
        log.warning("checkpoint %s lacks %d weights of the model (e.g. %s): they keep their initial values",
                    checkpoint, len(report["missing"]), report["missing"][:3])
    return model.to(device).eval(), report


def test_views_dataset(cfg: DictConfig, list_key: str = "val_list") -> VideoTestDataset:
    """``num_clips`` x ``num_crops`` views of each video of ``data.val_list`` (paths under ``data.root``)."""
    lst = cfg.data[list_key]
    if not lst:
        raise ValueError(f"data.{list_key} is not set: give the evaluation list (path label per line, or CSV)")
    if not Path(lst).is_file():
        raise FileNotFoundError(f"data.{list_key} not found: {lst}")
    items = read_annotation_list(lst, cfg.data.root, cfg.data.class_list or None)
    mcfg = model_cfg(cfg.model)
    return VideoTestDataset(items, num_frames=mcfg.num_frames, sampling_rate=cfg.data.sampling_rate,
                            num_clips=cfg.data.num_clips, num_crops=cfg.data.num_crops, crop_size=mcfg.img_size,
                            backend=cfg.data.backend, short_clip=cfg.data.short_clip)


@torch.no_grad()
def evaluate_kinetics(cfg: DictConfig, checkpoint: str, *, views_per_forward: int = 16, progress: bool = True,
                      device: torch.device | None = None) -> dict[str, Any]:
    """Run the multi-view test and return the JSON-ready report."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, load_report = load_classifier(cfg, checkpoint, device)
    dataset = test_views_dataset(cfg)
    loader = DataLoader(dataset, batch_size=1, num_workers=cfg.data.num_workers, collate_fn=collate_test)
    class_names = _class_names(cfg)
    all_scores, all_labels, videos, failed = [], [], [], []
    it: Any = loader
    if progress:
        from tqdm import tqdm
        it = tqdm(loader, desc="eval_kinetics", dynamic_ncols=True)
    for batch in it:
        failed.extend(batch["failed"])
        if batch["video"] is None:
            continue
        b, v = batch["video"].shape[:2]
        views = batch["video"].flatten(0, 1)  # (B*V, 3, T, S, S)
        logits = torch.cat([model({"video": views[i:i + views_per_forward].to(device)})["logits"].float().cpu()
                            for i in range(0, len(views), views_per_forward)])
        scores = aggregate_views(logits.view(b, v, -1))
        all_scores.append(scores)
        all_labels.append(batch["label"])
        for path, label, s in zip(batch["path"], batch["label"].tolist(), scores):
            pred = int(s.argmax())
            videos.append({"path": path, "label": label, "pred": pred, "score": float(s[pred]),
                           **({"label_name": class_names[label], "pred_name": class_names[pred]}
                              if class_names and 0 <= label < len(class_names) and pred < len(class_names) else {})})
    if all_scores:
        scores, labels = torch.cat(all_scores), torch.cat(all_labels)
        metrics = classification_metrics(scores, labels, topk=(1, 5))
    else:
        metrics = {"top1": float("nan"), "top5": float("nan"), "mean_class_acc": float("nan")}
    mcfg = model_cfg(cfg.model)
    return {
        "metrics": metrics,
        "num_videos": len(dataset), "num_evaluated": len(videos), "num_unreadable": len(failed),
        "unreadable": failed,
        "protocol": {"num_clips": cfg.data.num_clips, "num_crops": cfg.data.num_crops, "num_frames": mcfg.num_frames,
                     "sampling_rate": cfg.data.sampling_rate, "crop_size": mcfg.img_size,
                     "short_side": mcfg.img_size, "aggregation": "mean of per-view softmax"},
        "checkpoint": checkpoint, "load": load_report, "videos": videos,
    }


def _class_names(cfg: DictConfig) -> list[str] | None:
    if not cfg.data.class_list:
        return None
    return [line.strip() for line in Path(cfg.data.class_list).read_text().splitlines() if line.strip()]
