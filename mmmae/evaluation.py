"""The one evaluation runner: a model from any checkpoint, the config's evaluation data through its
source spec, one loop that leaves unreadable inputs out and lists them.

``classify(cfg, checkpoint)`` scores a classifier on ``data.dataset``'s ``val`` split, images or videos
alike: the split is built by the registered source (``mmmae.data.registry.build_dataset``: an image
folder, Fashion-MNIST's test set, a Kinetics list, SSv2's json, a video folder), batched by the one
collate (``mmmae.data.collate.collate_dicts``), which sets unreadable samples aside. An item that
holds several views (VideoMAE's test protocol: clips x crops per video) is scored as the mean of its
views' softmax. Retrieval (``mmmae.vl.evaluation``) and embedding extraction (``mmmae.embedding``)
use the same loader, loop and weights loading (:func:`eval_loader`, :func:`run_batches`,
:func:`load_for_eval`).

An evaluation dataset may say how it reads its items: a ``protocol`` dict attribute (e.g. the video
test views' sampling rule), copied into the report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mmmae.config import model_cfg
from mmmae.data.collate import collate_dicts
from mmmae.data.registry import build_dataset
from mmmae.metrics import aggregate_views, classification_metrics
from mmmae.registry import build_from_cfg, get_spec

__all__ = ["classify", "eval_loader", "load_for_eval", "progress_bar", "run_batches"]

# Dims of one view of each pixel input: (C, H, W) and (C, T, H, W); a sample with one more holds views.
VIEW_DIMS = {"image": 3, "video": 4}


def load_for_eval(cfg: DictConfig, checkpoint: str, device: torch.device, *, strict: bool = True
                  ) -> tuple[nn.Module, Any]:
    """The config's model with ``checkpoint``'s weights (any layout :mod:`mmmae.weights` reads), in eval
    mode on ``device``; returns it and the :class:`mmmae.weights.LoadReport`. ``strict``: weights that do
    not fit the model (a classifier's head missing, say) are an error naming the keys."""
    from mmmae.weights import load

    model = build_from_cfg(cfg.model.name, model_cfg(cfg.model))
    report = load(model, checkpoint, strict=strict)
    return model.to(device).eval(), report


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    """In order, through the one collate (unreadable samples set aside into ``failed``)."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_dicts)


def progress_bar(it: Any, total: int, desc: str, progress: bool) -> Any:
    if not progress:
        return it
    from tqdm import tqdm
    return tqdm(it, total=total, desc=desc, dynamic_ncols=True)


def run_batches(loader: DataLoader, key: str, failed: list[dict[str, Any]], *, desc: str, progress: bool
                ) -> Iterator[dict[str, Any]]:
    """The loader's batches that hold readable samples (``batch[key]`` not None); every unreadable
    sample's entry (``{"path", "index", "label", "error"}``) goes to ``failed``."""
    for batch in progress_bar(loader, len(loader), desc, progress):
        failed.extend(batch.get("failed", []))
        if batch.get(key) is not None:
            yield batch


def _scores(model: nn.Module, key: str, x: torch.Tensor, device: torch.device, chunk: int) -> torch.Tensor:
    """Class scores (B, K): softmax of each view, averaged per item (one view: its softmax)."""
    views = x.ndim == VIEW_DIMS[key] + 2
    b, v = x.shape[0], x.shape[1] if views else 1
    flat = x.flatten(0, 1) if views else x
    logits = torch.cat([model({key: flat[i:i + chunk].to(device)})["logits"].float().cpu()
                        for i in range(0, len(flat), chunk)])
    return aggregate_views(logits.view(b, v, -1))


@torch.no_grad()
def classify(cfg: DictConfig, checkpoint: str, *, views_per_forward: int = 16, progress: bool = True,
             device: torch.device | None = None) -> dict[str, Any]:
    """Score the config's classifier on its source's ``val`` split; returns the JSON-ready report:
    ``metrics`` (top-1, top-5, mean class accuracy, percent, over the labelled items), the counts,
    ``unreadable`` (each input
    that could not be read, never replaced), ``predictions`` (per item), ``protocol``, the load report."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name, mcfg = cfg.model.name, model_cfg(cfg.model)
    key = get_spec(name).input_keys(mcfg)[0]
    if key not in VIEW_DIMS:
        raise ValueError(f"model {name!r} reads {key} input; classify scores image or video classifiers")
    model, load_report = load_for_eval(cfg, checkpoint, device)
    dataset = build_dataset(cfg, "val", mcfg)
    # A video item holds num_clips x num_crops views: one item per batch, views_per_forward per forward.
    loader = eval_loader(dataset, cfg.data.batch_size if key == "image" else 1, cfg.data.num_workers)
    names = class_names(cfg)
    scores, labels, predictions, failed = [], [], [], []
    for batch in run_batches(loader, key, failed, desc=f"eval {name}", progress=progress):
        s = _scores(model, key, batch[key], device, views_per_forward)
        scores.append(s)
        labels.append(batch["label"])
        where = batch.get("path") or batch["index"].tolist()
        for item, label, row in zip(where, batch["label"].tolist(), s):
            pred = int(row.argmax())
            entry = {"path" if isinstance(item, str) else "index": item, "label": label, "pred": pred,
                     "score": float(row[pred])}
            if names and 0 <= label < len(names) and pred < len(names):
                entry.update(label_name=names[label], pred_name=names[pred])
            predictions.append(entry)
    # Unlabelled items (label -1: a video folder, an unlabelled image folder) get predictions, no score.
    s, y = (torch.cat(scores), torch.cat(labels)) if scores else (torch.empty(0, 0), torch.empty(0, dtype=torch.long))
    labelled = y >= 0
    if labelled.any():
        metrics = classification_metrics(s[labelled], y[labelled], topk=(1, 5))
    else:
        metrics = {"top1": float("nan"), "top5": float("nan"), "mean_class_acc": float("nan")}
    protocol = {"dataset": cfg.data.dataset, "split": "val", "input": key, "img_size": mcfg.img_size,
                "linear_probe": bool(mcfg.linear_probe), **dict(getattr(dataset, "protocol", {}))}
    return {"metrics": metrics, "num_items": len(dataset), "num_evaluated": len(predictions),
            "num_labelled": int(labelled.sum()),
            "num_unreadable": len(failed), "unreadable": failed, "predictions": predictions,
            "protocol": protocol, "checkpoint": checkpoint, "load": load_report.to_dict()}


def class_names(cfg: DictConfig) -> list[str] | None:
    """Names by label index from ``data.class_list`` when the source has one: a file with one name per
    line, or SSv2's ``labels.json`` (name -> index string)."""
    path = cfg.data.get("class_list") or ""
    if not path:
        return None
    path = Path(path)
    if path.suffix.lower() == ".json":
        by_name = json.loads(path.read_text(encoding="utf-8"))
        names = [""] * len(by_name)
        for n, idx in by_name.items():
            if 0 <= int(idx) < len(names):
                names[int(idx)] = n
        return names
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
