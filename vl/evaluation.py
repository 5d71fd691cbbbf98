"""COCO-protocol image-text retrieval: embed a caption split's images and captions, report recall@K.

The split is ``data.val_captions`` / ``data.val_images`` in any format ``mmmae.vl.data`` reads: an
official COCO captions json (the file is the split), the Karpathy file ``dataset_coco.json`` (split
``test`` by default: the 5k-image COCO test set, 25k captions), csv/jsonl pairs, or WebDataset-style
tar shards (each sample an image and its caption, read member by member). Every image
keeps its first ``max_captions_per_image`` captions (5: the usual protocol; a few COCO images have
6-7). Images go through the caption data's evaluation transform (resize the short side to
``img_size``, centre crop), captions through the config's tokenizer.

Which embedding, by ``model.name``:

- ``retrieval``: the fine-tuned joint space (projected, L2-normalised image and caption embeddings);
- ``m3ae`` (or any model with a ``text_embedding``): the pooled encoder features of an image alone and a caption alone, L2-normalised here. Zero-shot-ish: M3AE never trained them to align.

Recall (percent) follows ``mmmae.metrics.retrieval_metrics``: image-to-text hits when any of the
image's captions ranks in the top K; text-to-image when the caption's image does. An image that cannot
be read is listed in the report and left out with its captions (the counts say how many were scored),
never replaced or silently dropped.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from mmmae.config import model_cfg
from mmmae.metrics import retrieval_metrics
from mmmae.vl.data import CaptionShards, RetrievalSplit, _load_rgb, load_caption_source
from mmmae.embedding import Embedder, load_model
from mmmae.vl.extract import embed_image_files, embed_texts, image_transform

log = logging.getLogger(__name__)

__all__ = ["METRIC_KEYS", "evaluate_retrieval", "load_retrieval_split", "compute_embeddings"]

METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "i2t_medr", "t2i_medr")


def load_retrieval_split(cfg: DictConfig, split: str = "test", max_captions_per_image: int | None = 5
                         ) -> tuple[RetrievalSplit, str, Callable[[str], Any]]:
    """``data.val_captions`` / ``data.val_images`` -> (the retrieval split, the source kind, how its
    images are read: files, or the members of tar shards, each sample an image and its caption)."""
    if not cfg.data.val_captions:
        raise ValueError("data.val_captions is not set: give the evaluation captions (a COCO captions json, the "
                         "Karpathy dataset_coco.json, csv/jsonl pairs, or tar shards) and data.val_images")
    source = load_caption_source(cfg.data.val_captions, cfg.data.val_images, split)
    if source.kind == "shards":
        shards = CaptionShards(source.shards, transform=lambda pil: pil, replace=False)
        return RetrievalSplit.from_records(shards.records(), max_captions_per_image), source.kind, shards.open_image
    return RetrievalSplit.from_records(source.records, max_captions_per_image), source.kind, _load_rgb


@torch.no_grad()
def compute_embeddings(cfg: DictConfig, embedder: Embedder, rs: RetrievalSplit, *, batch_size: int,
                       device: torch.device, progress: bool = True, load: Callable[[str], Any] = _load_rgb
                       ) -> tuple[torch.Tensor, list[int], list[dict[str, Any]], torch.Tensor, str]:
    """Image embeddings of the readable images (Ni_ok, D), their indices, the failures, caption
    embeddings (Nt, D) (all L2-normalised), and the tokenizer's description."""
    from mmmae.vl.sources import model_tokenizer

    mcfg = model_cfg(cfg.model)
    tokenizer = model_tokenizer(mcfg)
    img, kept, failed = embed_image_files(embedder.image, rs.image_paths, image_transform(cfg, mcfg),
                                          batch_size=batch_size, num_workers=cfg.data.num_workers, device=device,
                                          progress=progress, desc="retrieval images", load=load)
    ids, pad = rs.tokenize(tokenizer)
    txt = embed_texts(embedder.text, ids, pad, batch_size=batch_size, device=device, progress=progress,
                      desc="retrieval captions")
    if img.numel():
        img = F.normalize(img, dim=-1)
    return img, kept, failed, F.normalize(txt, dim=-1), repr(tokenizer)


def _captions_per_image(counts: list[int]) -> int | dict[str, float]:
    if counts and len(set(counts)) == 1:
        return counts[0]
    return {"min": min(counts, default=0), "max": max(counts, default=0),
            "mean": sum(counts) / len(counts) if counts else 0.0}


@torch.no_grad()
def evaluate_retrieval(cfg: DictConfig, checkpoint: str, *, split: str = "test", max_captions_per_image: int = 5,
                       batch_size: int | None = None, progress: bool = True,
                       device: torch.device | None = None) -> dict[str, Any]:
    """Run the protocol and return the JSON-ready report (``metrics``, ``protocol``, unreadable images)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = cfg.model.name
    mcfg = model_cfg(cfg.model)
    rs, kind, load = load_retrieval_split(cfg, split, max_captions_per_image or None)
    model, load_report = load_model(cfg, checkpoint, device, modalities=("image", "text"))
    embedder = Embedder(model, name)
    img, kept, failed, txt, tok = compute_embeddings(cfg, embedder, rs, batch_size=batch_size or cfg.data.batch_size,
                                                     device=device, progress=progress, load=load)
    unreadable = [{"index": f["index"], "path": rs.image_paths[f["index"]], "image_id": rs.image_ids[f["index"]],
                   "num_captions": len(rs.img2txt[f["index"]]), "error": f["error"]} for f in failed]
    if unreadable:
        log.warning("%d of %d images could not be read; they and their captions are left out of the scores "
                    "(listed in the report), e.g. %s", len(unreadable), rs.num_images, unreadable[0]["path"])
    # Scored gallery: readable images, in split order, and the captions that belong to them.
    new_index = {old: new for new, old in enumerate(kept)}
    cap_keep = [t for t, i in enumerate(rs.txt2img.tolist()) if i in new_index]
    txt2img = torch.tensor([new_index[int(rs.txt2img[t])] for t in cap_keep], dtype=torch.long)
    if not kept:
        raise RuntimeError(f"none of the {rs.num_images} images of {cfg.data.val_captions} could be read")
    metrics = retrieval_metrics(img, txt[cap_keep], txt2img)
    metrics = {k: metrics[k] for k in METRIC_KEYS} | {"r_mean": metrics["r_mean"]}
    return {
        "metrics": metrics,
        "protocol": {
            "captions": cfg.data.val_captions, "images": cfg.data.val_images, "format": kind,
            "split": split if kind == "karpathy" else "whole file",
            "num_images": rs.num_images, "num_captions": rs.num_captions,
            "num_images_scored": len(kept), "num_captions_scored": len(cap_keep),
            "captions_per_image": _captions_per_image([len(c) for c in rs.img2txt]),
            "max_captions_per_image": max_captions_per_image or None,
            "img_size": mcfg.img_size, "transform": "resize short side to img_size (bicubic), centre crop",
            "tokenizer": tok, "max_len": mcfg.max_len,
            "embedding": {"image": embedder.describe("image"), "text": embedder.describe("text")},
            "similarity": "cosine (L2-normalised embeddings)",
            "recall": "percent; i2t hits when any of the image's captions is in the top K",
        },
        "model": name, "checkpoint": checkpoint, "load": load_report,
        "num_unreadable": len(unreadable), "unreadable": unreadable,
    }
