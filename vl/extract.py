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
fixed view: the centre clip of 16 frames (``VIDEO_FRAMES``) every ``data.sampling_rate`` (a video model:
its own ``num_frames``), short side resized to the model's ``img_size`` and centre-cropped. Images use
the evaluation transform of the caption data (resize the short side to ``img_size``, centre crop),
texts the model's tokenizer (``model.tokenizer``, ``model.max_len``). ``normalize=True`` L2-normalises
every row (a video's frame mean included).

Inputs: videos from a folder (recursive; ids = paths relative to it) or a list file (``path [label]``
lines, paths relative to ``root``; ids = the paths as written); images likewise (a list file holds one
path per line); texts from a text file (one caption per line; ids = 1-based line numbers) or a COCO
captions json (ids = annotation ids). Unreadable videos and images, and blank captions, are skipped and
listed in the report.

``layer=K`` (images, videos): block K's output (0-based, negative from the end; no final norm,
timm's ``forward_intermediates``) mean-pooled over the patch tokens, instead of the table above.

``extract_windows`` (videos): one row per sliding window over each whole video, as VideoMAEv2's
extract_tad_feature.py for temporal action detection (:func:`window_starts`; ids ``video#start_frame``).
``embed_query`` embeds one caption, image or video the way an index's rows were (``tools/search.py``).
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
from mmmae.data.registry import input_data
from mmmae.registry import build_from_cfg
from mmmae.vl.data import _BAD_IMAGE_ERRORS, IMAGE_EXTS, _load_rgb

log = logging.getLogger(__name__)

__all__ = ["MODALITIES", "WINDOW_NORMS", "Embedder", "ImageFiles", "collate_image_files", "embed_image_files",
           "embed_items", "embed_query", "embed_texts", "extract", "extract_windows", "list_images", "list_inputs",
           "list_texts", "list_videos", "load_model", "parse_windows", "query_modality", "save_rows", "window_offsets",
           "window_starts"]

MODALITIES = ("video", "image", "text")


# ------------------------------------------------------------------------------------------ model

def load_model(cfg: DictConfig, checkpoint: str, device: torch.device, modalities: Sequence[str] = (), *,
               layer: int | None = None, strict: bool = False) -> tuple[nn.Module, dict[str, list[str]]]:
    """The config's model with the checkpoint's weights, in eval mode on ``device``. ``modalities``
    the caller will embed (and ``layer``) are checked first (``Embedder.check``), before the
    checkpoint is read.

    Missing and unexpected keys are returned (and missing ones logged); with ``strict`` either is an
    error naming the checkpoint and the method (a reconstruction needs every decoder weight). A
    ``retrieval`` model whose projections are missing (an M3AE checkpoint given with a retrieval
    config) is an error: its embeddings would go through random projections; use the ``m3ae`` config
    for its features.
    """
    from mmmae.weights import load

    name = cfg.model.name
    model = build_from_cfg(name, model_cfg(cfg.model))
    for modality in modalities:
        Embedder(model, name, layer=layer).check(modality)
    # Any layout mmmae.weights reads; non-strict unless asked, but weights of another size never load.
    rep = load(model, checkpoint, strict=False)
    if not rep.loaded:
        raise ValueError(f"checkpoint {checkpoint} ({rep.layout}) shares no weights with model {name!r} "
                         f"({rep.problems(3)})")
    if rep.wrong_shape:
        raise ValueError(f"checkpoint {checkpoint} does not fit the config's model {name!r} (sizes differ): "
                         + "; ".join(f"{k}: {v}" for k, v in list(rep.wrong_shape.items())[:5]))
    report = {"missing": rep.missing, "unexpected": list(rep.unexpected), "layout": rep.layout}
    if strict and (report["missing"] or report["unexpected"]):
        raise ValueError(f"checkpoint {checkpoint} is not a {name!r} checkpoint of this config: it lacks "
                         f"{len(report['missing'])} of the model's weights (e.g. {report['missing'][:3]}) and has "
                         f"{len(report['unexpected'])} the model does not (e.g. {report['unexpected'][:3]}); "
                         f"give the config the checkpoint was trained with")
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

    def __init__(self, model: nn.Module, name: str, layer: int | None = None) -> None:
        self.model, self.name, self.layer = model, name, layer
        self.encoder = getattr(model, "encoder", None)
        self.num_prefix = int(getattr(self.encoder, "num_prefix_tokens", 0))
        self.is_video_model = bool(getattr(self.encoder, "is_video", False))

    # -- what is possible

    def check(self, modality: str) -> None:
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if self.layer is not None:
            self._check_layer(modality)
        if modality == "text" and not hasattr(self.model, "encode_text"):
            raise ValueError(f"model {self.name!r} has no text encoder: --modality text needs an image-text model "
                             f"(retrieval or m3ae)")
        if modality in ("image", "video") and not (hasattr(self.model, "encode_image")
                                                  or hasattr(self.model, "encode_video")
                                                  or hasattr(self.model, "forward_features")
                                                  or hasattr(self.encoder, "forward_features")):
            raise ValueError(f"model {self.name!r} has no pixel encoder (no encode_image / forward_features): "
                             f"it cannot embed {modality}s")

    def _check_layer(self, modality: str) -> None:
        if modality == "text":
            raise ValueError(f"--layer {self.layer} takes a block of the pixel encoder; captions are embedded "
                             f"by encode_text only (drop --layer for text)")
        blocks = getattr(self.encoder, "blocks", None)
        if blocks is None or not hasattr(self.encoder, "forward_intermediates"):
            raise ValueError(f"model {self.name!r} has no encoder blocks (forward_intermediates) for --layer {self.layer}")
        depth = len(blocks)
        if not -depth <= self.layer < depth:  # type: ignore[operator]
            raise ValueError(f"--layer {self.layer} is outside the encoder's {depth} blocks: give 0..{depth - 1} "
                             f"(or -{depth}..-1, counted from the end)")

    @property
    def frame_mean(self) -> bool:
        """Videos are embedded frame by frame and averaged (an image model without a video tower; with
        ``layer``, any image encoder: a block of the trunk sees frames)."""
        tower = hasattr(self.model, "encode_video") and self.layer is None
        return not (self.is_video_model or tower)

    def describe(self, modality: str) -> str:
        self.check(modality)
        m = self.model
        if modality == "text":
            if self.name == "retrieval":
                return "retrieval joint-space caption embedding (projected, L2-normalised)"
            return f"{self.name} pooled encoder feature of the caption alone (encode_text)"
        if self.layer is not None:
            base = (f"{self.name} encoder block {self.layer} output (no final norm), mean-pooled over the patch "
                    f"tokens (encoder.forward_intermediates)")
        elif modality == "video" and hasattr(m, "encode_video"):
            return f"{self.name} video tower (encode_video)"
        elif hasattr(m, "encode_image") and not self.is_video_model:
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

    def block_output(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels -> (B, D): block ``layer``'s tokens (timm ``forward_intermediates``, no final norm,
        prefix tokens dropped), mean-pooled as VideoMAE's mean pooling (modeling_finetune.py
        ``x.mean(1)``)."""
        feats = self.encoder.forward_intermediates(x, [self.layer], intermediates_only=True)  # type: ignore[union-attr]
        return feats[0].mean(dim=1)

    def image(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.layer is not None:
            return self.block_output(x)
        if hasattr(m, "encode_image") and not self.is_video_model:
            return m.encode_image(x)
        if hasattr(m, "forward_features"):
            return _pool_tokens(m.forward_features(x), self.num_prefix)
        return _pool_tokens(self.encoder.forward_features(x), self.num_prefix)  # type: ignore[union-attr]

    def video(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, D)."""
        m = self.model
        if hasattr(m, "encode_video") and self.layer is None:
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

def list_inputs(modality: str, input_path: str, root: str) -> list[InputItem]:
    """The inputs of one modality (:func:`list_texts`, :func:`list_images`, :func:`list_videos`)."""
    if modality == "text":
        return list_texts(input_path)
    return list_images(input_path, root) if modality == "image" else list_videos(input_path, root)


@torch.no_grad()
def embed_items(emb: Embedder, cfg: DictConfig, modality: str, items: Sequence[InputItem], *, batch_size: int,
                device: torch.device, progress: bool = True
                ) -> tuple[torch.Tensor, list[int], list[dict[str, Any]], dict[str, Any]]:
    """Embed ``items`` of one modality -> (embeddings (N_ok, D) fp32 on CPU, their indices into
    ``items``, skipped ``{"id", "reason", ...}``, the protocol in words)."""
    mcfg = model_cfg(cfg.model)
    items = list(items)
    if modality == "text":
        from mmmae.vl.sources import model_tokenizer
        tokenizer = model_tokenizer(mcfg)
        keep = [i for i, it in enumerate(items) if it.text]
        skipped = [{"id": items[i].id, "reason": "empty caption"} for i, it in enumerate(items) if not it.text]
        if not keep:
            return torch.empty(0, 0), [], skipped, {}
        ids, pad = tokenizer([items[i].text for i in keep])
        vectors = embed_texts(emb.text, ids, pad, batch_size=batch_size, device=device, progress=progress)
        return vectors, keep, skipped, {"tokenizer": repr(tokenizer), "max_len": mcfg.max_len}
    if modality == "image":
        from mmmae.vl.sources import caption_image_norm
        vectors, keep, failed = embed_image_files(
            emb.image, [it.path for it in items], image_transform(cfg, mcfg), batch_size=batch_size,
            num_workers=cfg.data.num_workers, device=device, progress=progress)
        skipped = [{"id": items[f["index"]].id, "path": items[f["index"]].path, "reason": f["error"]} for f in failed]
        protocol = {"transform": "resize short side to img_size (bicubic), centre crop, "
                                 f"{caption_image_norm(cfg)} normalisation", "img_size": mcfg.img_size}
        return vectors, keep, skipped, protocol
    return _embed_videos(emb, cfg, mcfg, items, batch_size, device, progress)


# Frames an image model averages over a video's centre clip (every ``sampling_rate`` frames).
VIDEO_FRAMES = 16


def _input_root(cfg: DictConfig, modality: str) -> str:
    """The prefix of relative paths in an input list: the data block's ``root`` for that kind."""
    return "" if modality == "text" else str(input_data(cfg, modality).root)


@torch.no_grad()
def extract(cfg: DictConfig, checkpoint: str, modality: str, input_path: str, out_prefix: str, *,
            normalize: bool = False, root: str | None = None, batch_size: int | None = None, progress: bool = True,
            device: torch.device | None = None, layer: int | None = None) -> dict[str, Any]:
    """Embed every input, write ``PREFIX.npy`` / ``PREFIX.ids.txt`` / ``PREFIX.report.json``; returns the
    report. ``layer``: block ``layer``'s mean-pooled output instead of the model's embedding (pixels only)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = cfg.model.name
    model, load_report = load_model(cfg, checkpoint, device, modalities=(modality,), layer=layer)
    emb = Embedder(model, name, layer=layer)
    items = list_inputs(modality, input_path, _input_root(cfg, modality) if root is None else root)
    vectors, keep, skipped, protocol = embed_items(emb, cfg, modality, items, batch_size=batch_size or cfg.data.batch_size,
                                                   device=device, progress=progress)
    report = {"modality": modality, "model": name, "checkpoint": checkpoint, "input": input_path,
              "embedding": emb.describe(modality), "layer": layer, "num_inputs": len(items),
              "num_embedded": len(keep), "num_skipped": len(skipped), "skipped": skipped, "protocol": protocol,
              "load": load_report}
    return save_rows(out_prefix, vectors, [items[i].id for i in keep], report, normalize=normalize,
                     what=f"inputs of {input_path}", total=len(items))


def save_rows(out_prefix: str, vectors: torch.Tensor, ids: Sequence[str], report: dict[str, Any], *,
              normalize: bool, what: str, total: int) -> dict[str, Any]:
    """Write ``PREFIX.npy`` (float32 rows), ``PREFIX.ids.txt`` (one id a line, row order) and
    ``PREFIX.report.json`` (``report`` + the row facts); returns the full report. No row at all is
    an error (after the report is written, so it lists why)."""
    import numpy as np

    from mmmae.engine.metrics import write_report

    if normalize and vectors.numel():
        vectors = F.normalize(vectors, dim=-1)
    out = Path(out_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    npy, ids_txt, report_path = (out.with_name(out.name + s) for s in (".npy", ".ids.txt", ".report.json"))
    bad_ids = [i for i in ids if "\n" in i or "\r" in i]
    if bad_ids:
        raise ValueError(f"ids cannot hold line breaks (one id per line in {ids_txt}): {bad_ids[:3]}")
    report = {**report, "normalize": bool(normalize), "unit_norm": _unit_rows(vectors),
              "dim": int(vectors.shape[1]) if vectors.numel() else 0, "num_rows": len(ids),
              "outputs": {"embeddings": str(npy), "ids": str(ids_txt)}}
    if ids:
        np.save(npy, vectors.numpy().astype(np.float32, copy=False))
        ids_txt.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    write_report(report, report_path)
    if not ids:
        raise RuntimeError(f"none of the {total} {what} could be embedded; see {report_path}")
    return report


def _unit_rows(x: torch.Tensor) -> bool:
    return bool(x.numel()) and bool(torch.allclose(x.norm(dim=-1), torch.ones(x.shape[0]), atol=1e-4))


def _embed_videos(emb: Embedder, cfg: DictConfig, mcfg: Any, items: list[InputItem], batch_size: int,
                  device: torch.device, progress: bool
                  ) -> tuple[torch.Tensor, list[int], list[dict[str, Any]], dict[str, Any]]:
    from mmmae.video.datasets import VideoTestDataset, collate_test

    # A video encoder takes exactly its own clip length; frame averaging over an image model's
    # frames takes VIDEO_FRAMES of them.
    d = input_data(cfg, "video")
    num_frames = int(mcfg.num_frames) if emb.is_video_model else VIDEO_FRAMES
    ds = VideoTestDataset([(it.path, -1) for it in items], num_frames=num_frames,
                          sampling_rate=d.sampling_rate, num_clips=1, num_crops=1, crop_size=mcfg.img_size,
                          backend=d.backend, short_clip=d.short_clip)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=d.num_workers, collate_fn=collate_test)
    embs, keep, skipped = [], [], []
    for batch in _bar(loader, len(loader), "videos", progress):
        skipped.extend({"id": items[f["index"]].id, "path": f["path"], "reason": f["error"]} for f in batch["failed"])
        if batch["video"] is None:
            continue
        clips = batch["video"][:, 0]  # the one view: (B, 3, T, S, S)
        embs.append(emb.video(clips.to(device)).float().cpu())
        keep.extend(batch["index"].tolist())
    protocol = {"num_frames": num_frames, "sampling_rate": d.sampling_rate, "clip": "centre (1 clip)",
                "crop": "centre (1 crop)", "crop_size": mcfg.img_size, "short_side": mcfg.img_size,
                "backend": d.backend, "short_clip": d.short_clip,
                "pooling": "mean over frames" if emb.frame_mean else "video encoder"}
    return (torch.cat(embs) if embs else torch.empty(0, 0)), keep, skipped, protocol


# ------------------------------------------------------------------------------------------ windows

# Frame normalisations for windows, by the names of ``mmmae.vl.data.IMAGE_STATS``. "none" is the
# reference's: VideoMAEv2 extract_tad_feature.py feeds frames in [0, 1] without the training
# mean/std (ToFloatTensorInZeroOne + Resize only; an open question upstream, OpenGVLab/VideoMAEv2#62).
WINDOW_NORMS = ("none", "imagenet", "cc12m")


def parse_windows(spec: str) -> tuple[int, int]:
    """``"LEN:STRIDE"`` (frames) -> (LEN, STRIDE), both positive."""
    parts = spec.split(":")
    try:
        length, stride = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--windows must be LEN:STRIDE in frames (e.g. 16:4), got {spec!r}") from None
    if length < 1 or stride < 1:
        raise ValueError(f"--windows LEN:STRIDE must both be >= 1 frame, got {spec!r}")
    return length, stride


def window_starts(num_frames: int, length: int, stride: int) -> list[int]:
    """First frames of the windows over a video of ``num_frames`` frames: every ``stride`` frames while
    a whole window of ``length`` consecutive frames fits, no padding at the end (VideoMAEv2
    extract_tad_feature.py ``get_start_idx_range``: ``range(0, num_frames - 15, 4)`` for its 16-frame
    windows on THUMOS14, stride 16 on FineAction)."""
    return list(range(0, num_frames - length + 1, stride))


def window_offsets(length: int, clip_len: int, name: str) -> list[int]:
    """Frame offsets inside a window that make the model's clip: every frame when the window is the
    model's clip length (the reference: 16 frames for a 16-frame model), else every
    ``length // clip_len``-th frame; a window that is not a multiple of the clip is an error."""
    if length % clip_len:
        raise ValueError(f"a window of {length} frames does not split into {name!r}'s clip of {clip_len} frames: "
                         f"give LEN = {clip_len} x k")
    return list(range(0, length, length // clip_len))


def _window_frames(frames: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, S, S): [0, 1], the whole frame resized to S x S bilinear
    (extract_tad_feature.py ``Resize((224, 224))``: F.interpolate, align_corners=False), normalised."""
    x = frames.permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def _embed_windows(emb: Embedder, reader: Any, starts: Sequence[int], offsets: Sequence[int], size: int,
                   norm: str, batch_size: int, device: torch.device) -> torch.Tensor:
    """One video's windows -> (len(starts), D). Frames are decoded once and kept only while a later
    window still needs them, so a long video never sits in memory whole."""
    from mmmae.vl.data import image_stats

    mean, std = image_stats(norm)
    cache: dict[int, torch.Tensor] = {}
    out = []
    for b in range(0, len(starts), batch_size):
        batch = starts[b:b + batch_size]
        wanted = sorted({s + o for s in batch for o in offsets})
        new = [i for i in wanted if i not in cache]
        if new:
            cache.update(zip(new, _window_frames(reader.read(new), size, mean, std)))
        for i in [i for i in cache if i < wanted[0]]:
            del cache[i]
        clips = torch.stack([torch.stack([cache[s + o] for o in offsets], dim=1) for s in batch])  # (B, 3, T, S, S)
        out.append(emb.video(clips.to(device)).float().cpu())
    return torch.cat(out)


def _video_lengths(items: Sequence[InputItem], backend: str) -> tuple[list[tuple[InputItem, int]], list[dict[str, Any]]]:
    """Frame counts of readable videos, and the unreadable ones as skipped entries."""
    from mmmae.video.decoding import VideoDecodeError, open_video

    lengths, skipped = [], []
    for it in items:
        try:
            with open_video(it.path, backend) as reader:
                lengths.append((it, reader.num_frames))
        except VideoDecodeError as e:
            log.warning("skipping unreadable video %s: %s", it.path, e.reason)
            skipped.append({"id": it.id, "path": it.path, "reason": e.reason})
    return lengths, skipped


def _check_window_fits(lengths: Sequence[tuple[InputItem, int]], length: int) -> None:
    short = [f"video {it.path} has {n} frames" for it, n in lengths if n < length]
    if short:
        raise ValueError(f"the window of {length} frames is longer than the video: " + "; ".join(short[:5])
                         + (f" (and {len(short) - 5} more)" if len(short) > 5 else "")
                         + "; give a shorter --windows LEN or leave those videos out")


@torch.no_grad()
def extract_windows(cfg: DictConfig, checkpoint: str, input_path: str, out_prefix: str, *, length: int, stride: int,
                    layer: int | None = None, window_norm: str = "none", normalize: bool = False,
                    root: str | None = None, batch_size: int | None = None, progress: bool = True,
                    device: torch.device | None = None) -> dict[str, Any]:
    """One feature per sliding window over each whole video, as VideoMAEv2's extract_tad_feature.py
    does for temporal action detection: windows of ``length`` frames every ``stride`` frames
    (:func:`window_starts`), each frame resized to the model's ``img_size`` square, the model's pooled
    features (a classifier's ``forward_features``: mean + fc_norm, as the reference's
    ``use_mean_pooling``; an image model's frame mean), or block ``layer``'s mean-pooled output.

    Writes ``PREFIX.npy`` (rows = windows, video by video, in start order), ``PREFIX.ids.txt``
    (``video#start_frame``) and ``PREFIX.report.json``. Unreadable videos are skipped and listed; a
    window longer than a video is an error naming the video and both lengths.
    """
    from mmmae.video.decoding import VideoDecodeError, open_video

    if window_norm not in WINDOW_NORMS:
        raise ValueError(f"window normalisation must be one of {WINDOW_NORMS}, got {window_norm!r}")
    if length < 1 or stride < 1:
        raise ValueError(f"window length and stride must be >= 1 frame, got {length}:{stride}")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name, mcfg = cfg.model.name, model_cfg(cfg.model)
    model, load_report = load_model(cfg, checkpoint, device, modalities=("video",), layer=layer)
    emb = Embedder(model, name, layer=layer)
    offsets = window_offsets(length, int(mcfg.num_frames) if emb.is_video_model else length, name)
    items = list_videos(input_path, input_data(cfg, "video").root if root is None else root)
    lengths, skipped = _video_lengths(items, input_data(cfg, "video").backend)
    _check_window_fits(lengths, length)
    bs = batch_size or cfg.data.batch_size
    rows, ids, videos = [], [], []
    for it, n in _bar(lengths, len(lengths), "videos", progress):
        starts = window_starts(n, length, stride)
        try:
            with open_video(it.path, input_data(cfg, "video").backend) as reader:
                rows.append(_embed_windows(emb, reader, starts, offsets, mcfg.img_size, window_norm, bs, device))
        except VideoDecodeError as e:  # a file that opens but breaks mid-stream loses all its windows
            log.warning("skipping video %s: %s", it.path, e.reason)
            skipped.append({"id": it.id, "path": it.path, "reason": e.reason})
            continue
        ids.extend(f"{it.id}#{s}" for s in starts)
        videos.append({"id": it.id, "num_frames": n, "num_windows": len(starts)})
    protocol = {"reference": "OpenGVLab/VideoMAEv2 extract_tad_feature.py", "length": length, "stride": stride,
                "starts": "range(0, num_frames - length + 1, stride)", "frames_per_window": len(offsets),
                "frame_step": offsets[1] - offsets[0] if len(offsets) > 1 else 1,
                "resize": f"whole frame to {mcfg.img_size}x{mcfg.img_size}, bilinear, align_corners=False",
                "normalisation": window_norm, "backend": input_data(cfg, "video").backend,
                "pooling": "mean over frames" if emb.frame_mean else "video encoder"}
    report = {"modality": "video", "model": name, "checkpoint": checkpoint, "input": input_path,
              "embedding": emb.describe("video").replace("the centre clip", "each window"), "layer": layer,
              "num_inputs": len(items), "num_embedded": len(videos), "num_skipped": len(skipped), "skipped": skipped,
              "videos": videos, "protocol": protocol, "load": load_report}
    vectors = torch.cat(rows) if rows else torch.empty(0, 0)
    return save_rows(out_prefix, vectors, ids, report, normalize=normalize, what=f"videos of {input_path}",
                     total=len(items))


# ------------------------------------------------------------------------------------------ queries

def query_modality(query: str) -> str:
    """``image`` or ``video`` for a file with such an extension, else ``text``. A string that names a
    missing image or video file is an error (not silently a caption)."""
    from mmmae.video.datasets import VIDEO_EXTENSIONS

    ext = os.path.splitext(query.lower())[1]
    kind = "image" if ext[1:] in IMAGE_EXTS else "video" if ext in VIDEO_EXTENSIONS else "text"
    if kind != "text" and not os.path.isfile(query):
        raise FileNotFoundError(f"query {query!r} looks like a {kind} file but there is no such file")
    if kind == "text" and os.path.isfile(query):
        raise ValueError(f"query file {query!r} is neither an image ({', '.join(IMAGE_EXTS)}) nor a video "
                         f"({', '.join(VIDEO_EXTENSIONS)}); pass a caption as text")
    return kind


@torch.no_grad()
def embed_query(cfg: DictConfig, checkpoint: str, query: str, modality: str, *, layer: int | None = None,
                windows: Sequence[int] | None = None, window_norm: str = "none", normalize: bool = False,
                device: torch.device | None = None) -> torch.Tensor:
    """One query (a caption, an image path or a video path) -> (1, D), embedded as the rows of an
    index were: the same model, ``layer`` and normalisation; a video against window rows is its middle
    window of ``windows[0]`` frames, else the extractor's centre clip."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name, mcfg = cfg.model.name, model_cfg(cfg.model)
    model, _ = load_model(cfg, checkpoint, device, modalities=(modality,), layer=layer)
    emb = Embedder(model, name, layer=layer)
    if modality == "video" and windows:
        from mmmae.video.decoding import open_video
        length = int(windows[0])
        offsets = window_offsets(length, int(mcfg.num_frames) if emb.is_video_model else length, name)
        lengths, skipped = _video_lengths([InputItem(query, query)], input_data(cfg, "video").backend)
        if skipped:
            raise ValueError(f"query video {query} cannot be read: {skipped[0]['reason']}")
        _check_window_fits(lengths, length)
        start = (lengths[0][1] - length) // 2
        with open_video(query, input_data(cfg, "video").backend) as reader:
            vec = _embed_windows(emb, reader, [start], offsets, mcfg.img_size, window_norm, 1, device)
    else:
        item = InputItem("query", text=query) if modality == "text" else InputItem(query, query)
        vec, keep, skipped, _ = embed_items(emb, cfg, modality, [item], batch_size=1, device=device, progress=False)
        if not keep:
            raise ValueError(f"query {modality} {query!r} cannot be embedded: {skipped[0]['reason']}")
    return F.normalize(vec, dim=-1) if normalize else vec
