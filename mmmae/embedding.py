"""Embeddings of videos, images and captions from a trained model, for retrieval, clustering or probes.

``extract(cfg, checkpoint, modality, input, out_prefix)`` writes ``PREFIX.npy`` (float32, (N, D)),
``PREFIX.ids.txt`` (one id per line, in row order) and ``PREFIX.report.json`` (counts, what each row
is, the inputs that were skipped and why). Everything is deterministic: fixed views, eval mode, fp32.

The model side lives here (:func:`load_model`, :class:`Embedder`, :func:`save_rows`); how inputs of a
modality are listed and read is registered by the package that reads them (:func:`register_inputs`:
videos by ``mmmae.video.extract``, images and captions by ``mmmae.vl.extract``), so this module
imports no modality.

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

``normalize=True``
L2-normalises every row (a video's frame mean included). ``layer=K`` (images, videos): block K's
output (0-based, negative from the end; no final norm, timm's ``forward_intermediates``) mean-pooled
over the patch tokens, instead of the table above. ``embed_query`` embeds one caption, image or video
the way an index's rows were (``tools/search.py``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from mmmae.config import model_cfg
from mmmae.data.registry import input_data
from mmmae.evaluation import load_for_eval, progress_bar
from mmmae.heads import EncoderModel
from mmmae.registry import _ensure_registered

log = logging.getLogger(__name__)

__all__ = ["MODALITIES", "Embedder", "InputItem", "InputKind", "embed_items", "embed_query", "extract", "list_inputs",
           "load_model", "progress_bar", "query_modality", "read_list", "register_inputs", "save_rows"]

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
    from mmmae.registry import build_from_cfg

    name = cfg.model.name
    probe = build_from_cfg(name, model_cfg(cfg.model), device="meta")
    for modality in modalities:
        Embedder(probe, name, layer=layer).check(modality)
    # Any layout mmmae.weights reads; non-strict unless asked, but weights of another size never load.
    model, rep = load_for_eval(cfg, checkpoint, device, strict=False)
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
    return model, report


class Embedder:
    """Maps a model and a modality to the embedding function the module docstring tabulates, through
    the model contract's hooks (``EncoderModel.encode_image`` / ``encode_text``, ``embedding`` /
    ``text_embedding``).

    ``image(x (B, C, H, W))``, ``video(x (B, C, T, H, W))``, ``text(ids (B, S), pad (B, S))`` -> (B, D).
    """

    def __init__(self, model: EncoderModel, name: str, layer: int | None = None) -> None:
        if not isinstance(model, EncoderModel):
            raise TypeError(f"model {name!r} is a {type(model).__name__}, not an mmmae EncoderModel")
        self.model, self.name, self.layer = model, name, layer
        self.encoder = model.encoder
        self.num_prefix = int(self.encoder.num_prefix_tokens)
        self.is_video_model = bool(self.encoder.is_video)

    # -- what is possible

    def check(self, modality: str) -> None:
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if self.layer is not None:
            self._check_layer(modality)
        if modality == "text" and not self.model.text_embedding:
            raise ValueError(f"model {self.name!r} has no text encoder: --modality text needs an image-text model "
                             f"(retrieval or m3ae)")

    def _check_layer(self, modality: str) -> None:
        if modality == "text":
            raise ValueError(f"--layer {self.layer} takes a block of the pixel encoder; captions are embedded "
                             f"by encode_text only (drop --layer for text)")
        depth = len(self.encoder.blocks)
        if not -depth <= self.layer < depth:  # type: ignore[operator]
            raise ValueError(f"--layer {self.layer} is outside the encoder's {depth} blocks: give 0..{depth - 1} "
                             f"(or -{depth}..-1, counted from the end)")

    @property
    def frame_mean(self) -> bool:
        """Videos are embedded frame by frame and averaged (an image encoder; with ``layer`` too: a
        block of an image trunk sees frames)."""
        return not self.is_video_model

    def describe(self, modality: str) -> str:
        self.check(modality)
        if modality == "text":
            return f"{self.name} {self.model.text_embedding}"
        if self.layer is not None:
            base = (f"{self.name} encoder block {self.layer} output (no final norm), mean-pooled over the patch "
                    f"tokens (encoder.forward_intermediates)")
        else:
            base = f"{self.name} {self.model.embedding}"
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
        feats = self.encoder.forward_intermediates(x, [self.layer], intermediates_only=True)
        return feats[0].mean(dim=1)

    def image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D); a video encoder takes the image as a static clip."""
        return self.block_output(x) if self.layer is not None else self.model.encode_image(x)

    def video(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, D)."""
        if not self.frame_mean:
            return self.image(x)  # a video encoder takes the clip itself
        b, c, t = x.shape[:3]
        frames = x.transpose(1, 2).reshape(b * t, c, *x.shape[3:])
        return self.image(frames).reshape(b, t, -1).mean(dim=1)

    def text(self, ids: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        return self.model.encode_text(ids, pad)


# ------------------------------------------------------------------------------------------ inputs

@dataclass
class InputItem:
    id: str
    path: str = ""  # file (videos, images)
    text: str = ""  # caption (texts)


def read_list(path: str, root: str) -> list[tuple[str, str]]:
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


# Embeds one modality's items: (embedder, cfg, items, *, batch_size, device, progress) ->
# (embeddings (N_ok, D) fp32 on CPU, their indices into items, skipped {"id", "reason", ...}, protocol).
EmbedItems = Callable[..., "tuple[torch.Tensor, list[int], list[dict[str, Any]], dict[str, Any]]"]


@dataclass(frozen=True)
class InputKind:
    """How inputs of one modality are listed (``list(input_path, root)``) and embedded, and the file
    suffixes that make a query of this modality."""

    list: Callable[[str, str], list[InputItem]]
    embed: EmbedItems
    suffixes: tuple[str, ...] = ()


INPUTS: dict[str, InputKind] = {}


def register_inputs(modality: str, list_fn: Callable[[str, str], list[InputItem]], embed_fn: EmbedItems, *,
                    suffixes: Sequence[str] = ()) -> None:
    """Called by the package that reads ``modality`` (one of :data:`MODALITIES`) when it is imported."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    INPUTS[modality] = InputKind(list_fn, embed_fn, tuple(s.lower() for s in suffixes))


def _inputs(modality: str) -> InputKind:
    _ensure_registered()
    if modality not in INPUTS:
        raise ValueError(f"no installed package reads {modality} inputs (registered: {', '.join(sorted(INPUTS))})")
    return INPUTS[modality]


# ------------------------------------------------------------------------------------------ extract

def list_inputs(modality: str, input_path: str, root: str) -> list[InputItem]:
    """The inputs of one modality, as its package lists them (folders, list files, caption files)."""
    return _inputs(modality).list(input_path, root)


@torch.no_grad()
def embed_items(emb: Embedder, cfg: DictConfig, modality: str, items: Sequence[InputItem], *, batch_size: int,
                device: torch.device, progress: bool = True
                ) -> tuple[torch.Tensor, list[int], list[dict[str, Any]], dict[str, Any]]:
    """Embed ``items`` of one modality -> (embeddings (N_ok, D) fp32 on CPU, their indices into
    ``items``, skipped ``{"id", "reason", ...}``, the protocol in words)."""
    return _inputs(modality).embed(emb, cfg, list(items), batch_size=batch_size, device=device, progress=progress)


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

    from mmmae.metrics import write_report

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




# ------------------------------------------------------------------------------------------ queries

def query_modality(query: str) -> str:
    """The modality whose registered suffixes the query's file name has (``image``, ``video``), else
    ``text``. A string that names a missing image or video file is an error (not silently a caption)."""
    _ensure_registered()
    ext = os.path.splitext(query.lower())[1]
    kind = next((m for m, k in INPUTS.items() if ext and ext in k.suffixes), "text")
    if kind != "text" and not os.path.isfile(query):
        raise FileNotFoundError(f"query {query!r} looks like a {kind} file but there is no such file")
    if kind == "text" and os.path.isfile(query):
        known = ", ".join(s for m, k in sorted(INPUTS.items()) for s in k.suffixes)
        raise ValueError(f"query file {query!r} is neither an image nor a video ({known}); pass a caption as text")
    return kind


@torch.no_grad()
def embed_query(cfg: DictConfig, checkpoint: str, query: str, modality: str, *, layer: int | None = None,
                normalize: bool = False, device: torch.device | None = None) -> torch.Tensor:
    """One query (a caption, an image path or a video path) -> (1, D), embedded as the rows of an
    index were: the same model, ``layer`` and normalisation (a video: the extractor's centre clip;
    against window rows see ``mmmae.video.extract.embed_window_query``)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_model(cfg, checkpoint, device, modalities=(modality,), layer=layer)
    emb = Embedder(model, cfg.model.name, layer=layer)
    item = InputItem("query", text=query) if modality == "text" else InputItem(query, query)
    vec, keep, skipped, _ = embed_items(emb, cfg, modality, [item], batch_size=1, device=device, progress=False)
    if not keep:
        raise ValueError(f"query {modality} {query!r} cannot be embedded: {skipped[0]['reason']}")
    return F.normalize(vec, dim=-1) if normalize else vec
