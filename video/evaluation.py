"""Multi-view evaluation of a video classifier (VideoMAE's test protocol), per-video softmax averaging.

The test views come from the configured data source (``data.dataset``: a ``video_list``, or ``ssv2``'s
json files), so they follow the source's sampling: dense clips on VideoMAE's stride grid for
Kinetics (5 clips x 3 crops), segment clips for Something-Something v2 (2 x 3).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from mmmae.config import model_cfg
from mmmae.data.registry import build_dataset
from mmmae.metrics import aggregate_views, classification_metrics
from mmmae.registry import build_from_cfg
from mmmae.video.datasets import VideoTestDataset, collate_test

log = logging.getLogger(__name__)


def load_classifier(cfg: DictConfig, checkpoint: str, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The config's model with a fine-tuned checkpoint's weights (any layout :mod:`mmmae.weights`
    reads: a run, a DeepSpeed folder, VideoMAE / VideoMAEv2 / OmniMAE fine-tuned files, a Hugging Face
    VideoMAEForVideoClassification directory), loaded strictly: a checkpoint that lacks a weight of the
    classifier (its head, say) or does not fit it is an error naming the keys. Returns the load report."""
    from mmmae.weights import load

    model = build_from_cfg(cfg.model.name, model_cfg(cfg.model))
    report = load(model, checkpoint).to_dict()
    return model.to(device).eval(), report


def test_views_dataset(cfg: DictConfig) -> VideoTestDataset:
    """``data.num_clips`` x ``data.num_crops`` views of each video of the source's ``val`` split
    (``data.val_list``: a ``path label`` list, or SSv2's ``validation.json``)."""
    if not cfg.data.val_list:
        raise ValueError(f"data.val_list is not set: give the evaluation list of data.dataset={cfg.data.dataset!r} "
                         "(path label lines or CSV; validation.json for ssv2)")
    dataset = build_dataset(cfg, "val", model_cfg(cfg.model))
    if not isinstance(dataset, VideoTestDataset):
        raise ValueError(f"data.dataset={cfg.data.dataset!r} does not give video test views "
                         f"(its val split is a {type(dataset).__name__}); use a video source such as video_list or ssv2")
    return dataset


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
        "protocol": {"dataset": cfg.data.dataset, "num_clips": cfg.data.num_clips, "num_crops": cfg.data.num_crops,
                     "num_frames": mcfg.num_frames, "sampling_rate": cfg.data.sampling_rate,
                     "sampling": dataset.sampler.sampling, "clip_rule": dataset.sampler.rule,
                     "crop_size": mcfg.img_size, "short_side": mcfg.img_size, "resize": "bilinear, no antialias",
                     "aggregation": "mean of per-view softmax"},
        "checkpoint": checkpoint, "load": load_report, "videos": videos,
    }


def _class_names(cfg: DictConfig) -> list[str] | None:
    """Names by label index: one per line, or SSv2's ``labels.json`` (name -> index string)."""
    if not cfg.data.class_list:
        return None
    path = Path(cfg.data.class_list)
    if path.suffix.lower() == ".json":
        by_name = json.loads(path.read_text(encoding="utf-8"))
        names = [""] * len(by_name)
        for name, idx in by_name.items():
            if 0 <= int(idx) < len(names):
                names[int(idx)] = name
        return names
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
