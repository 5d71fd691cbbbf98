"""Image classification evaluation (fine-tuned or linear-probe classifiers): top-1/top-5/mean class."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from mmmae.config import model_cfg
from mmmae.data.collate import collate_dicts
from mmmae.data.registry import build_dataset
from mmmae.metrics import classification_metrics
from mmmae.registry import build_from_cfg
from mmmae.weights import load


@torch.no_grad()
def evaluate_image_classifier(cfg: DictConfig, checkpoint: str, *, progress: bool = True,
                              device: torch.device | None = None) -> dict[str, Any]:
    """Score ``data.dataset``'s ``val`` split (e.g. Fashion-MNIST's test set, or an ImageFolder at
    ``data.val_list``) with the eval transform; returns a JSON-ready report."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mcfg = model_cfg(cfg.model)
    model = build_from_cfg(cfg.model.name, mcfg)
    # Any layout mmmae.weights reads (a run, MAE fine-tuned / linear-probe files, timm, Hugging Face ViT),
    # strictly: an evaluation of weights that do not fit the classifier is an error, not a random head.
    res = load(model, checkpoint)
    model.to(device).eval()
    dataset = build_dataset(cfg, "val", mcfg)
    loader = DataLoader(dataset, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
                        collate_fn=collate_dicts)
    it: Any = loader
    if progress:
        from tqdm import tqdm
        it = tqdm(loader, desc="eval", dynamic_ncols=True)
    scores, labels, unreadable = [], [], []
    for batch in it:
        # Unreadable images are left out and listed, never replaced by another image.
        valid = batch["valid"] if "valid" in batch else torch.ones(len(batch["label"]), dtype=torch.bool)
        unreadable += [f for f in batch.get("unreadable", []) if f]
        if not valid.any():
            continue
        logits = model({"image": batch["image"][valid].to(device)})["logits"].float().cpu()
        scores.append(logits.softmax(-1))
        labels.append(batch["label"][valid])
    s, y = torch.cat(scores), torch.cat(labels)
    return {"metrics": classification_metrics(s, y, topk=(1, 5)), "num_images": len(y),
            "num_unreadable": len(unreadable), "unreadable": unreadable,
            "checkpoint": checkpoint, "load": res.to_dict(),
            "protocol": {"split": "val", "dataset": cfg.data.dataset, "img_size": mcfg.img_size,
                         "linear_probe": bool(getattr(mcfg, "linear_probe", False))}}
