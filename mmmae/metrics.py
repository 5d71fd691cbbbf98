"""Evaluation metrics: multi-view video classification and image-text retrieval recall.

Pure tensor functions, independent of models and tools, so the evaluation tools and the tests share
one definition.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch


def aggregate_views(view_logits: torch.Tensor) -> torch.Tensor:
    """Kinetics multi-view protocol: softmax each view, average per video.

    view_logits (N, V, K) for N videos x V views (clips x crops) -> scores (N, K).
    """
    return view_logits.float().softmax(dim=-1).mean(dim=1)


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None,
                           topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy (percent) and mean per-class accuracy (percent, over classes present in labels).

    scores (N, K), labels (N,) -> {"top1": ..., "top5": ..., "mean_class_acc": ...}.
    """
    n, k = scores.shape
    out: dict[str, float] = {}
    order = scores.argsort(dim=1, descending=True)
    for t in topk:
        hit = (order[:, : min(t, k)] == labels[:, None]).any(dim=1)
        out[f"top{t}"] = 100.0 * hit.float().mean().item() if n else float("nan")
    pred = order[:, 0]
    classes = labels.unique()
    per_class = [(pred[labels == c] == c).float().mean().item() for c in classes]
    out["mean_class_acc"] = 100.0 * sum(per_class) / len(per_class) if per_class else float("nan")
    return out


@torch.no_grad()
def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, txt2img: torch.Tensor,
                      block: int = 1024) -> dict[str, float]:
    """COCO-protocol recall from L2-normalised embeddings, with similarities computed in blocks.

    image_emb (Ni, D), text_emb (Nt, D), txt2img (Nt,) = the image index of each caption.
    Image-to-text: an image's rank is the best rank of any of its captions. Text-to-image: a
    caption's rank is the rank of its image. Ranks count strictly greater similarities (ties go in the
    query's favour). Returns i2t_r1/r5/r10, t2i_r1/r5/r10 (percent), rsum, their mean ``r_mean``, and
    the median ranks ``i2t_medr``, ``t2i_medr`` (1-based, floor of the median as VSE++ reports them).
    """
    ni, nt = image_emb.shape[0], text_emb.shape[0]
    if txt2img.shape != (nt,):
        raise ValueError(f"txt2img must have one entry per caption ({nt}), got {tuple(txt2img.shape)}")
    img, txt = image_emb.float(), text_emb.float()
    i2t_rank = torch.empty(ni, dtype=torch.long)
    for s in range(0, ni, block):
        sim = img[s:s + block] @ txt.T  # (b, Nt)
        own = txt2img[None, :] == torch.arange(s, min(s + block, ni))[:, None]  # (b, Nt)
        if not bool(own.any(dim=1).all()):
            missing = (torch.arange(s, min(s + block, ni))[~own.any(dim=1)]).tolist()
            raise ValueError(f"images without any caption: {missing[:10]}")
        best = sim.masked_fill(~own, float("-inf")).max(dim=1).values  # best score among own captions
        i2t_rank[s:s + block] = (sim > best[:, None]).sum(dim=1)
    t2i_rank = torch.empty(nt, dtype=torch.long)
    for s in range(0, nt, block):
        sim = txt[s:s + block] @ img.T  # (b, Ni)
        gt = sim.gather(1, txt2img[s:s + block, None])
        t2i_rank[s:s + block] = (sim > gt).sum(dim=1)
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * (ranks < k).float().mean().item()
        # VSE++ / SCAN convention: floor(median of 0-based ranks) + 1.
        out[f"{name}_medr"] = float(math.floor(torch.quantile(ranks.float(), 0.5).item()) + 1)
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    out["r_mean"] = out["rsum"] / 6
    return out


def _json_clean(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_clean(v) for v in x]
    return x


def write_report(report: dict[str, Any], path: str | Path) -> None:
    """Write a JSON report (non-finite numbers become null, so the file stays valid JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_json_clean(report), indent=1))
    tmp.replace(path)
