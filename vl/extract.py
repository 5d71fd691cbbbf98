"""Embeddings of images and captions (``mmmae.embedding``'s image and text inputs).

Images use the evaluation transform of the caption data (resize the short side to ``img_size``, centre
crop) and come from a folder (recursive; ids = paths relative to it) or a list file with one path per
line; texts use the model's tokenizer (``model.tokenizer``, ``model.max_len``) and come from a text file
(one caption per line; ids = 1-based line numbers) or a COCO captions json (ids = annotation ids).
Unreadable images and blank captions are skipped and listed in the report.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from mmmae.config import model_cfg
from mmmae.data.quality import ReadFailures, read_item
from mmmae.embedding import Embedder, InputItem, read_list, register_inputs
from mmmae.evaluation import eval_loader, progress_bar, run_batches
from mmmae.vl.data import _BAD_IMAGE_ERRORS, IMAGE_EXTS, _load_rgb

log = logging.getLogger(__name__)

__all__ = ["ImageFiles", "embed_image_files", "embed_images", "embed_text_items", "embed_texts",
           "image_transform", "list_images", "list_texts"]


def list_images(input_path: str, root: str = "") -> list[InputItem]:
    """A folder (every image under it, sorted; ids relative to it) or a list file (one path per line)."""
    if os.path.isdir(input_path):
        base = os.path.abspath(input_path)
        items = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                if name.lower().rsplit(".", 1)[-1] in IMAGE_EXTS:
                    p = os.path.join(dirpath, name)
                    items.append(InputItem(Path(os.path.relpath(p, base)).as_posix(), p))
        return items
    if os.path.isfile(input_path):
        return [InputItem(i, p) for i, p in read_list(input_path, root)]
    raise FileNotFoundError(f"--input {input_path!r} is neither a folder of images nor a list file")


def list_texts(input_path: str) -> list[InputItem]:
    """A COCO captions json (ids = annotation ids, file order) or a text file (one caption per line,
    ids = 1-based line numbers; blank lines become empty items, which are skipped and reported)."""
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"--input {input_path!r}: no such caption file")
    if input_path.lower().endswith(".json"):
        with open(input_path, encoding="utf-8") as f:
            data = json.load(f)
        if not (isinstance(data, dict) and isinstance(data.get("annotations"), list)):
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{input_path}: expected COCO captions (a dict with 'annotations': [{{id, caption}}]), "
                             f"top level: {keys}")
        return [InputItem(str(a["id"]), text=str(a["caption"]).strip()) for a in data["annotations"]]
    with open(input_path, encoding="utf-8") as f:
        return [InputItem(str(n), text=line.strip()) for n, line in enumerate(f.read().splitlines(), 1)]


# ------------------------------------------------------------------------------------------ images

class ImageFiles(Dataset):
    """Images by path through ``transform``, read by the one reader in evaluation mode: an unreadable
    file is never replaced; its sample says ``valid=False`` with the file and the reason (the collate
    sets it aside into ``failed``)."""

    def __init__(self, paths: Sequence[str], transform: Callable[[Any], torch.Tensor],
                 load: Callable[[str], Any] = _load_rgb) -> None:
        """``load``: path -> PIL image (default: a file; caption shards pass their member reader)."""
        self.paths, self.transform, self.load = list(paths), transform, load
        self.reads = ReadFailures(1.0, "ImageFiles", "image")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        got = read_item(index, len(self.paths), lambda i: self.transform(self.load(self.paths[i])),
                        errors=_BAD_IMAGE_ERRORS, name=lambda i: self.paths[i], reads=self.reads, replace=False)
        return {"image": got.value, "index": index, "path": self.paths[index], **got.fields()}


@torch.no_grad()
def embed_image_files(fn: Callable[[torch.Tensor], torch.Tensor], paths: Sequence[str], transform: Any, *,
                      batch_size: int, num_workers: int, device: torch.device, progress: bool = True,
                      desc: str = "images", load: Callable[[str], Any] = _load_rgb
                      ) -> tuple[torch.Tensor, list[int], list[dict[str, Any]]]:
    """Embed images by path (read with ``load``) -> (embeddings (N_ok, D) fp32 on CPU, their indices
    into ``paths``, failures ``{"index", "error"}``)."""
    loader = eval_loader(ImageFiles(paths, transform, load), batch_size, num_workers)
    embs, kept, failed = [], [], []
    for batch in run_batches(loader, "image", failed, desc=desc, progress=progress):
        embs.append(fn(batch["image"].to(device)).float().cpu())
        kept.extend(batch["index"].tolist())
    return (torch.cat(embs) if embs else torch.empty(0, 0)), kept, failed


@torch.no_grad()
def embed_texts(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ids: torch.Tensor, pad: torch.Tensor, *,
                batch_size: int, device: torch.device, progress: bool = True, desc: str = "texts") -> torch.Tensor:
    """Tokenized captions ids (N, S), pad (N, S) -> embeddings (N, D) fp32 on CPU, in batches."""
    starts = range(0, ids.shape[0], batch_size)
    out = [fn(ids[s:s + batch_size].to(device), pad[s:s + batch_size].to(device)).float().cpu()
           for s in progress_bar(starts, len(starts), desc, progress)]
    return torch.cat(out) if out else torch.empty(0, 0)


def image_transform(cfg: DictConfig, mcfg: Any) -> Any:
    """The caption data's evaluation transform at the model's ``img_size``."""
    from mmmae.vl.sources import caption_transform
    return caption_transform(cfg, mcfg, "val")


@torch.no_grad()
def embed_images(emb: Embedder, cfg: DictConfig, items: list[InputItem], *, batch_size: int, device: torch.device,
                 progress: bool = True) -> tuple[torch.Tensor, list[int], list[dict[str, Any]], dict[str, Any]]:
    """Image items -> (embeddings, kept indices, skipped, protocol) (``mmmae.embedding.embed_items``)."""
    from mmmae.vl.sources import caption_image_norm
    mcfg = model_cfg(cfg.model)
    vectors, keep, failed = embed_image_files(
        emb.image, [it.path for it in items], image_transform(cfg, mcfg), batch_size=batch_size,
        num_workers=cfg.data.num_workers, device=device, progress=progress)
    skipped = [{"id": items[f["index"]].id, "path": items[f["index"]].path, "reason": f["error"]} for f in failed]
    protocol = {"transform": "resize short side to img_size (bicubic), centre crop, "
                             f"{caption_image_norm(cfg)} normalisation", "img_size": mcfg.img_size}
    return vectors, keep, skipped, protocol


@torch.no_grad()
def embed_text_items(emb: Embedder, cfg: DictConfig, items: list[InputItem], *, batch_size: int,
                     device: torch.device, progress: bool = True
                     ) -> tuple[torch.Tensor, list[int], list[dict[str, Any]], dict[str, Any]]:
    """Caption items -> (embeddings, kept indices, skipped (blank captions), protocol)."""
    from mmmae.vl.sources import model_tokenizer
    mcfg = model_cfg(cfg.model)
    tokenizer = model_tokenizer(mcfg)
    keep = [i for i, it in enumerate(items) if it.text]
    skipped = [{"id": items[i].id, "reason": "empty caption"} for i, it in enumerate(items) if not it.text]
    if not keep:
        return torch.empty(0, 0), [], skipped, {}
    ids, pad = tokenizer([items[i].text for i in keep])
    vectors = embed_texts(emb.text, ids, pad, batch_size=batch_size, device=device, progress=progress)
    return vectors, keep, skipped, {"tokenizer": repr(tokenizer), "max_len": mcfg.max_len}


register_inputs("image", list_images, embed_images, suffixes=tuple("." + e for e in IMAGE_EXTS))
register_inputs("text", lambda path, root: list_texts(path), embed_text_items)
