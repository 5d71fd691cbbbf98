"""Embeddings of videos, images and captions from a trained model, for retrieval, clustering or probes.

``extract(cfg, checkpoint, modality, input, out_prefix)`` writes ``PREFIX.npy`` (float32, (N, D)),
``PREFIX.ids.txt`` (one id per line, in row order) and ``PREFIX.report.json`` (counts, what each row
is, the inputs that were skipped and why). Everything is deterministic: fixed views, eval mode, fp32.

What a row is, by model and modality (``Embedder`` decides; ``Embedder.describe`` puts it in words):

- ``retrieval``: image -> the joint-space embedding (projected, unit norm); text -> the joint-space
  caption embedding (unit norm); video -> the mean of its frames' image embeddings (with
  ``normalize=True`` unit norm again). All three land in one space: cosine similarity compares
  videos, images and captions directly (text-to-video retrieval with an image-text model, as
  CLIP4Clip's mean pooling does zero-shot).
- ``m3ae``: image -> the pooled encoder feature (``global_pool``: [cls] by default); text -> the
  pooled feature of the caption alone; video -> the mean over frames. Image and text features come
  from one encoder but were never trained to align ("zero-shot-ish").
- video models (``classifier`` with ``num_frames``, ``videomae``, ...): video -> the model's pooled
  features (a classifier's ``forward_features``: mean + fc_norm), or else the encoder's patch tokens
  mean-pooled; image -> the same, the image entering as a static clip; text -> refused.
- other image models (``mae``, ``simmim``, an image ``classifier``): image -> the pooled features as
  above; video -> the mean over frames; text -> refused.

A model with its own ``encode_video`` (a video tower) is used as is for videos. Video inputs use one
fixed view: the centre clip of ``data.num_frames`` frames every ``data.sampling_rate`` (a video model:
its own ``num_frames``), short side resized to the model's ``img_size`` and centre-cropped. Images use
the evaluation transform of the caption data (resize the short side to ``img_size``, centre crop),
texts the config's tokenizer (``text.tokenizer``, ``text.max_len``). ``normalize=True`` L2-normalises
every row (a video's frame mean included).

Inputs: videos from a folder (recursive; ids = paths relative to it) or a list file (``path [label]``
lines, paths relative to ``root``; ids = the paths as written); images likewise (a list file holds one
path per line); texts from a text file (one caption per line; ids = 1-based line numbers) or a COCO
captions json (ids = annotation ids). Unreadable videos and images, and blank captions, are skipped and
listed in the report.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mmmae.config import model_cfg
from mmmae.registry import build_from_cfg
from mmmae.vl.data import _BAD_IMAGE_ERRORS, IMAGE_EXTS, _load_rgb

log = logging.getLogger(__name__)

__all__ = ["MODALITIES", "Embedder", "ImageFiles", "collate_image_files", "embed_image_files", "embed_texts",
           "extract", "list_images", "list_texts", "list_videos", "load_model"]

MODALITIES = ("video", "image", "text")


# ------------------------------------------------------------------------------------------ model

def load_model(cfg: DictConfig, checkpoint: str, device: torch.device, modalities: Sequence[str] = ()
               ) -> tuple[nn.Module, dict[str, list[str]]]:
    """The config's model with the checkpoint's weights, in eval mode on ``device``. ``modalities``
    the caller will embed are checked first (``Embedder.check``), before the checkpoint is read.

    Missing and unexpected keys are returned (and missing ones logged). A ``retrieval`` model whose
    projections are missing (an M3AE checkpoint given with a retrieval config) is an error: its
    embeddings would go through random projections; use the ``m3ae`` config for its features.
    """
    from mmmae.convert import load_checkpoint_file

    model = build_from_cfg(cfg.model.name, model_cfg(cfg.model))
    for modality in modalities:
        Embedder(model, cfg.model.name).check(modality)
    state = load_checkpoint_file(checkpoint)
    own = model.state_dict()
    if not set(state) & set(own):
        raise ValueError(f"checkpoint {checkpoint} shares no weights with model {cfg.model.name!r} "
                         f"(checkpoint keys e.g. {list(state)[:3]}, model keys e.g. {list(own)[:3]})")
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise ValueError(f"checkpoint {checkpoint} does not fit the config's model (sizes differ): "
                         + "; ".join(wrong[:5]))
    res = model.load_state_dict(state, strict=False)
    report = {"missing": list(res.missing_keys), "unexpected": list(res.unexpected_keys)}
    if cfg.model.name == "retrieval" and any(k.startswith(("image_proj", "text_proj")) for k in report["missing"]):
        raise ValueError(f"checkpoint {checkpoint} has no retrieval projections (image_proj / text_proj): it is "
                         f"not a retrieval fine-tune. Evaluate an M3AE checkpoint with its m3ae config "
                         f"(pooled encoder features), or fine-tune with retrieval_coco.yaml first")
    if report["missing"]:
        log.warning("checkpoint %s lacks %d weights of the model (e.g. %s): they keep their initial values",
                    checkpoint, len(report["missing"]), report["missing"][:3])
    return model.to(device).eval(), report


def _pool_tokens(x: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """(B, P+L, D) tokens -> (B, D) mean over the L patch tokens; (B, D) passes through."""
    return x[:, num_prefix:].mean(dim=1) if x.ndim == 3 else x


class Embedder:
    """Maps a model and a modality to the embedding function the module docstring tabulates.

    ``image(x (B, C, H, W))``, ``video(x (B, C, T, H, W))``, ``text(ids (B, S), pad (B, S))`` -> (B, D).
    """

    def __init__(self, model: nn.Module, name: str) -> None:
        self.model, self.name = model, name
        self.encoder = getattr(model, "encoder", None)
        self.num_prefix = int(getattr(self.encoder, "num_prefix_tokens", 0))
        self.is_video_model = bool(getattr(self.encoder, "is_video", False))

    # -- what is possible

    def check(self, modality: str) -> None:
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if modality == "text" and not hasattr(self.model, "encode_text"):
            raise ValueError(f"model {self.name!r} has no text encoder: --modality text needs an image-text model "
                             f"(retrieval or m3ae)")
        if modality in ("image", "video") and not (hasattr(self.model, "encode_image")
                                                  or hasattr(self.model, "encode_video")
                                                  or hasattr(self.model, "forward_features")
                                                  or hasattr(self.encoder, "forward_features")):
            raise ValueError(f"model {self.name!r} has no pixel encoder (no encode_image / forward_features): "
                             f"it cannot embed {modality}s")

    @property
    def frame_mean(self) -> bool:
        """Videos are embedded frame by frame and averaged (an image model without a video tower)."""
        return not (self.is_video_model or hasattr(self.model, "encode_video"))

    def describe(self, modality: str) -> str:
        self.check(modality)
        m = self.model
        if modality == "text":
            if self.name == "retrieval":
                return "retrieval joint-space caption embedding (projected, L2-normalised)"
            return f"{self.name} pooled encoder feature of the caption alone (encode_text)"
        if modality == "video" and hasattr(m, "encode_video"):
            return f"{self.name} video tower (encode_video)"
        if hasattr(m, "encode_image") and not self.is_video_model:
            base = ("retrieval joint-space image embedding (projected, L2-normalised)" if self.name == "retrieval"
                    else f"{self.name} pooled encoder feature (encode_image)")
        elif hasattr(m, "forward_features"):
            base = f"{self.name} pooled features (model.forward_features)"
        else:
            base = f"{self.name} encoder patch tokens, mean-pooled (encoder.forward_features)"
        if modality == "video":
            if self.frame_mean:
                return f"mean over the centre clip's frames of the {base}"
            return f"{base} of the centre clip"
        if self.is_video_model:
            return f"{base} of the image as a static clip"
        return base

    # -- embedding functions

    def image(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if hasattr(m, "encode_image") and not self.is_video_model:
            return m.encode_image(x)
        if hasattr(m, "forward_features"):
            return _pool_tokens(m.forward_features(x), self.num_prefix)
        return _pool_tokens(self.encoder.forward_features(x), self.num_prefix)  # type: ignore[union-attr]

    def video(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, D)."""
        m = self.model
        if hasattr(m, "encode_video"):
            return m.encode_video(x)
        if not self.frame_mean:
            return self.image(x)  # a video encoder takes the clip itself
        b, c, t = x.shape[:3]
        frames = x.transpose(1, 2).reshape(b * t, c, *x.shape[3:])
        return self.image(frames).reshape(b, t, -1).mean(dim=1)

    def text(self, ids: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        return self.model.encode_text(ids, pad)  # type: ignore[operator]


# ------------------------------------------------------------------------------------------ inputs

@dataclass
class InputItem:
    id: str
    path: str = ""  # file (videos, images)
    text: str = ""  # caption (texts)


def _read_list(path: str, root: str) -> list[tuple[str, str]]:
    """A list file -> (id as written, resolved path). A line is a path, or ``path label`` (kinetics
    lists; paths without spaces): the whole line when it names a file, else its first field."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            resolved = os.path.join(root, text)
            rel = text if os.path.isfile(resolved) else text.split(None, 1)[0]
            out.append((rel, os.path.abspath(os.path.join(root, rel))))
    return out


def list_videos(input_path: str, root: str = "") -> list[InputItem]:
    """A folder (every video under it, sorted; ids relative to it) or a ``path label`` list."""
    from mmmae.video.datasets import list_video_folder
    if os.path.isdir(input_path):
        base = os.path.abspath(input_path)
        return [InputItem(Path(os.path.relpath(p, base)).as_posix(), p) for p, _ in list_video_folder(input_path)]
    if os.path.isfile(input_path):
        return [InputItem(i, p) for i, p in _read_list(input_path, root)]
    raise FileNotFoundError(f"--input {input_path!r} is neither a folder of videos nor a list file")


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
        return [InputItem(i, p) for i, p in _read_list(input_path, root)]
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
    """Images by path through ``transform``; an unreadable file gives ``ok=False`` and the reason,
    never a silent replacement, so callers can list it."""

    def __init__(self, paths: Sequence[str], transform: Callable[[Any], torch.Tensor]) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        try:
            pil = _load_rgb(path)
        except _BAD_IMAGE_ERRORS as e:
            log.warning("skipping unreadable image %s (%s: %s)", path, type(e).__name__, e)
            return {"image": None, "index": index, "ok": False, "error": f"{type(e).__name__}: {e}"}
        return {"image": self.transform(pil), "index": index, "ok": True, "error": None}


def collate_image_files(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ok = [s for s in samples if s["ok"]]
    return {"image": torch.stack([s["image"] for s in ok]) if ok else None,
            "index": [s["index"] for s in ok],
            "failed": [{"index": s["index"], "error": s["error"]} for s in samples if not s["ok"]]}


def _bar(it: Any, total: int, desc: str, progress: bool) -> Any:
    if not progress:
        return it
    from tqdm import tqdm
    return tqdm(it, total=total, desc=desc, dynamic_ncols=True)


@torch.no_grad()
def embed_image_files(fn: Callable[[torch.Tensor], torch.Tensor], paths: Sequence[str], transform: Any, *,
                      batch_size: int, num_workers: int, device: torch.device, progress: bool = True,
                      desc: str = "images") -> tuple[torch.Tensor, list[int], list[dict[str, Any]]]:
    """Embed images by path -> (embeddings (N_ok, D) fp32 on CPU, their indices into ``paths``,
    failures ``{"index", "error"}``)."""
    loader = DataLoader(ImageFiles(paths, transform), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate_image_files)
    embs, kept, failed = [], [], []
    for batch in _bar(loader, len(loader), desc, progress):
        failed.extend(batch["failed"])
        if batch["image"] is None:
            continue
        embs.append(fn(batch["image"].to(device)).float().cpu())
        kept.extend(batch["index"])
    return (torch.cat(embs) if embs else torch.empty(0, 0)), kept, failed


@torch.no_grad()
def embed_texts(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ids: torch.Tensor, pad: torch.Tensor, *,
                batch_size: int, device: torch.device, progress: bool = True, desc: str = "texts") -> torch.Tensor:
    """Tokenized captions ids (N, S), pad (N, S) -> embeddings (N, D) fp32 on CPU, in batches."""
    starts = range(0, ids.shape[0], batch_size)
    out = [fn(ids[s:s + batch_size].to(device), pad[s:s + batch_size].to(device)).float().cpu()
           for s in _bar(starts, len(starts), desc, progress)]
    return torch.cat(out) if out else torch.empty(0, 0)


def image_transform(cfg: DictConfig, mcfg: Any) -> Any:
    """The caption data's evaluation transform at the model's ``img_size``."""
    from mmmae.vl.sources import caption_transform
    return caption_transform(cfg, mcfg, "val")


# ------------------------------------------------------------------------------------------ extract

@torch.no_grad()
def extract(cfg: DictConfig, checkpoint: str, modality: str, input_path: str, out_prefix: str, *,
            normalize: bool = False, root: str | None = None, batch_size: int | None = None, progress: bool = True,
            device: torch.device | None = None) -> dict[str, Any]:
    """Embed every input, write ``PREFIX.npy`` / ``PREFIX.ids.txt`` / ``PREFIX.report.json``; returns the report."""
    import numpy as np

    from mmmae.engine.metrics import write_report

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mcfg = model_cfg(cfg.model)
    name = cfg.model.name
    model, load_report = load_model(cfg, checkpoint, device, modalities=(modality,))
    emb = Embedder(model, name)
    root = cfg.data.root if root is None else root
    bs = batch_size or cfg.data.batch_size
    protocol: dict[str, Any] = {}
    skipped: list[dict[str, Any]] = []

    if modality == "text":
        from mmmae.vl.sources import check_text_fits_model
        from mmmae.vl.tokenizers import build_tokenizer
        items = list_texts(input_path)
        tokenizer = build_tokenizer(cfg.text.tokenizer, cfg.text.max_len)
        check_text_fits_model(tokenizer, mcfg)
        keep = [i for i, it in enumerate(items) if it.text]
        skipped = [{"id": items[i].id, "reason": "empty caption"} for i, it in enumerate(items) if not it.text]
        ids, pad = tokenizer([items[i].text for i in keep])
        vectors = embed_texts(emb.text, ids, pad, batch_size=bs, device=device, progress=progress)
        protocol = {"tokenizer": repr(tokenizer), "max_len": cfg.text.max_len}
    elif modality == "image":
        from mmmae.vl.sources import caption_image_norm
        items = list_images(input_path, root)
        vectors, keep, failed = embed_image_files(
            emb.image, [it.path for it in items], image_transform(cfg, mcfg), batch_size=bs,
            num_workers=cfg.data.num_workers, device=device, progress=progress)
        skipped = [{"id": items[f["index"]].id, "path": items[f["index"]].path, "reason": f["error"]} for f in failed]
        protocol = {"transform": "resize short side to img_size (bicubic), centre crop, "
                                 f"{caption_image_norm(cfg)} normalisation", "img_size": mcfg.img_size}
    else:
        items = list_videos(input_path, root)
        vectors, keep, skipped, protocol = _embed_videos(emb, cfg, mcfg, items, bs, device, progress)

    if normalize and vectors.numel():
        vectors = F.normalize(vectors, dim=-1)
    out = Path(out_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    npy, ids_txt, report_path = (out.with_name(out.name + s) for s in (".npy", ".ids.txt", ".report.json"))
    kept_ids = [items[i].id for i in keep]
    bad_ids = [i for i in kept_ids if "\n" in i or "\r" in i]
    if bad_ids:
        raise ValueError(f"ids cannot hold line breaks (one id per line in {ids_txt}): {bad_ids[:3]}")
    report = {
        "modality": modality, "model": name, "checkpoint": checkpoint, "input": input_path,
        "embedding": emb.describe(modality), "normalize": bool(normalize), "unit_norm": _unit_rows(vectors),
        "dim": int(vectors.shape[1]) if vectors.numel() else 0,
        "num_inputs": len(items), "num_embedded": len(keep), "num_skipped": len(skipped), "skipped": skipped,
        "protocol": protocol, "load": load_report,
        "outputs": {"embeddings": str(npy), "ids": str(ids_txt)},
    }
    if keep:
        np.save(npy, vectors.numpy().astype(np.float32, copy=False))
        ids_txt.write_text("".join(f"{i}\n" for i in kept_ids), encoding="utf-8")
    write_report(report, report_path)
    if not keep:
        raise RuntimeError(f"none of the {len(items)} inputs of {input_path} could be embedded; see {report_path}")
    return report


def _unit_rows(x: torch.Tensor) -> bool:
    return bool(x.numel()) and bool(torch.allclose(x.norm(dim=-1), torch.ones(x.shape[0]), atol=1e-4))


def _embed_videos(emb: Embedder, cfg: DictConfig, mcfg: Any, items: list[InputItem], batch_size: int,
                  device: torch.device, progress: bool
                  ) -> tuple[torch.Tensor, list[int], list[dict[str, Any]], dict[str, Any]]:
    from mmmae.video.datasets import VideoTestDataset, collate_test

    # A video encoder takes exactly its own clip length; frame averaging uses the data config's.
    num_frames = int(mcfg.num_frames) if emb.is_video_model else int(cfg.data.num_frames)
    ds = VideoTestDataset([(it.path, -1) for it in items], num_frames=num_frames,
                          sampling_rate=cfg.data.sampling_rate, num_clips=1, num_crops=1, crop_size=mcfg.img_size,
                          backend=cfg.data.backend, short_clip=cfg.data.short_clip)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=cfg.data.num_workers, collate_fn=collate_test)
    embs, keep, skipped = [], [], []
    for batch in _bar(loader, len(loader), "videos", progress):
        skipped.extend({"id": items[f["index"]].id, "path": f["path"], "reason": f["error"]} for f in batch["failed"])
        if batch["video"] is None:
            continue
        clips = batch["video"][:, 0]  # the one view: (B, 3, T, S, S)
        embs.append(emb.video(clips.to(device)).float().cpu())
        keep.extend(batch["index"].tolist())
    protocol = {"num_frames": num_frames, "sampling_rate": cfg.data.sampling_rate, "clip": "centre (1 clip)",
                "crop": "centre (1 crop)", "crop_size": mcfg.img_size, "short_side": mcfg.img_size,
                "backend": cfg.data.backend, "short_clip": cfg.data.short_clip,
                "pooling": "mean over frames" if emb.frame_mean else "video encoder"}
    return (torch.cat(embs) if embs else torch.empty(0, 0)), keep, skipped, protocol
