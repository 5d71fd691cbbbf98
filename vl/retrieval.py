"""Image-text retrieval on the shared M3AE trunk: a dual encoder trained with CLIP's contrastive loss.

The image tower and the text tower are *one* ``MultimodalEncoder`` (the M3AE encoder, same weights),
run on an image alone (``[cls] + patches``) and on a caption alone (``[cls] + tokens``, padding
excluded as attention keys). Each tower's pooled feature (the [cls] token by default, as M3AE's
downstream use) goes through its own projection head into a joint ``proj_dim`` space and is
L2-normalised; the loss is CLIP's symmetric cross-entropy over the batch's image-text similarity
matrix, scaled by a learnable temperature (Radford et al. 2021, sec. 2.5: ``logit_scale`` starts at
``log(1/0.07)`` and ``exp(logit_scale)`` is clamped at 100).

Weights come from an M3AE pretraining run through ``init_from`` (``load_pretrained`` takes the
``encoder.*`` weights and leaves the decoder behind); the projections and the temperature start
fresh.

Several processes: features are all-gathered across ranks (with gradients) so every rank scores its
images against the *global* batch of captions (and its captions against all images). Each rank's loss
covers its own rows (open_clip's ``local_loss=True, gather_with_grad=True``); the gather's backward
sums the feature gradients over ranks, so after the data-parallel gradient average the update is
exactly the gradient of the global-batch loss. Every rank must hold the same number of pairs (the
engine's sampler drops the last uneven batch). ``gather_across_ranks: false`` makes the loss per-rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mmmae.heads import EncoderCfg, EncoderModel, ProjectionHead
from mmmae.registry import register_model
from mmmae.vl.models import build_multimodal_encoder, random_image_text_batch

__all__ = ["RetrievalCfg", "RetrievalModel", "clip_contrastive_loss", "gather_with_grad", "MAX_LOGIT_SCALE"]

MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale) here "to prevent scaling the logits by more than 100"


@dataclass
class RetrievalCfg(EncoderCfg):
    """Field names follow ``M3AECfg`` where they apply, so an M3AE size block works unchanged."""

    img_size: int = 256  # the M3AE pretraining resolution; must match the checkpoint's grid
    tokenizer: str = "openclip"  # the M3AE checkpoint's vocabulary (mmmae.vl.tokenizers.build_tokenizer names)
    vocab_size: int = 49408  # must match the M3AE checkpoint (open_clip BPE by default)
    max_len: int = 64  # text positions; captions are cut to it
    global_pool: str = "token"  # tower feature before projection: [cls] ("token") or mean ("avg")
    proj_dim: int = 256  # joint embedding width
    proj_hidden_dim: int = 0  # 0: linear projections; > 0: 2-layer MLP heads
    init_logit_scale: float = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
    learn_logit_scale: bool = True
    freeze_encoder: bool = False  # train only the projections and the temperature (a "linear" probe)
    gather_across_ranks: bool = True  # contrast against the global batch in multi-process runs


class _AllGatherWithGrad(torch.autograd.Function):
    """(n, P) per rank -> (world * n, P) in rank order; backward sums the gradient over ranks and
    returns this rank's slice. Built on ``all_gather`` + ``all_reduce`` only, so it runs on gloo
    (CPU) as well as NCCL."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.n = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather (B, P) features over the process group with gradients; identity in one process.

    Raises when ranks hold different batch sizes (the contrastive targets would be misaligned).
    """
    if not _distributed():
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
    counts = [int(s) for s in sizes]
    if len(set(counts)) != 1:
        raise ValueError(f"contrastive gather needs the same batch size on every rank, got {counts}")
    return _AllGatherWithGrad.apply(x)


def clip_contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, *,
                          gather: bool = True) -> torch.Tensor:
    """CLIP's symmetric InfoNCE. image_emb, text_emb (B, P) L2-normalised, row i of each a pair;
    logit_scale: the multiplier (already exponentiated). Computed in fp32.

    With ``gather`` and several processes, local rows are scored against the gathered global batch;
    the targets are the local rows' global positions.
    """
    img, txt = image_emb.float(), text_emb.float()
    scale = logit_scale.float()
    if gather and _distributed():
        all_img, all_txt = gather_with_grad(img), gather_with_grad(txt)
        offset = dist.get_rank() * img.shape[0]
    else:
        all_img, all_txt, offset = img, txt, 0
    labels = torch.arange(img.shape[0], device=img.device) + offset
    logits_per_image = scale * img @ all_txt.T  # (B, world*B)
    logits_per_text = scale * txt @ all_img.T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class RetrievalModel(EncoderModel):
    """Dual-encoder retrieval on one shared M3AE encoder.

    ``forward(batch)``: ``image`` (B, C, H, W), ``text`` (B, S) token ids, ``text_pad`` (B, S) bool
    (True = padding; none when absent); row i of image and text is a pair. Returns ``loss``,
    ``contrastive_loss`` (detached) and ``logit_scale`` (detached, the multiplier exp(logit_scale)
    actually used, i.e. 1 / temperature). No masks: both towers see their full input.

    ``encode_image(images) -> (B, P)`` and ``encode_text(ids, pad) -> (B, P)``: L2-normalised joint
    embeddings, so cosine similarity is a dot product.
    """

    def __init__(self, cfg: RetrievalCfg) -> None:
        super().__init__()
        if cfg.proj_dim < 1:
            raise ValueError(f"proj_dim must be >= 1, got {cfg.proj_dim}")
        self.cfg = cfg
        self.encoder = build_multimodal_encoder(cfg, "the retrieval model")
        self.image_proj = ProjectionHead(cfg.embed_dim, cfg.proj_dim, cfg.proj_hidden_dim)
        self.text_proj = ProjectionHead(cfg.embed_dim, cfg.proj_dim, cfg.proj_hidden_dim)
        # Shape (1,), not (): DeepSpeed's initial broadcast views each parameter as bytes, which a
        # 0-dim bf16 tensor cannot do.
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.init_logit_scale)),
                                        requires_grad=cfg.learn_logit_scale)
        if cfg.freeze_encoder:
            self.encoder.requires_grad_(False)

    def init_weights(self) -> None:
        self.encoder.init_weights()
        # CLIP initialises its projections with std width ** -0.5 (model.py, initialize_parameters).
        for head in (self.image_proj, self.text_proj):
            for m in head.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=m.in_features ** -0.5)
                    nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.logit_scale.fill_(float(self.cfg.init_logit_scale))

    def train(self, mode: bool = True) -> RetrievalModel:
        super().train(mode)
        if self.cfg.freeze_encoder:
            self.encoder.eval()  # frozen: no drop path
        return self

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"logit_scale"}

    # -- loading

    # init_from takes an M3AE encoder; the projections start fresh unless the checkpoint has them
    # (a retrieval run's): mmmae.weights part="auto".
    init_part = "encoder"

    def load_pretrained(self, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """An M3AE state dict (``model.safetensors``) or another retrieval model's, non-strictly through
        :func:`mmmae.weights.load` (``part="auto"``): every ``encoder.*`` weight (the decoder is left
        behind on purpose), and a retrieval state's projections and temperature too. An image-only
        encoder (MAE, a classifier) loads its vision part, and the text weights are reported missing.
        Returns the (missing, unexpected) ``encoder.``-prefixed keys; weights of another size are an
        error."""
        from mmmae.weights import load

        if not any(k.startswith("encoder.") for k in state):
            raise KeyError(f"checkpoint has no keys under 'encoder.'; first keys: {list(state)[:5]}")
        rep = load(self, state, part="auto", strict=False)
        if rep.wrong_shape:
            raise ValueError("checkpoint weights do not fit the model (check img_size, patch_size, embed_dim, "
                             "vocab_size against the pretraining config): "
                             + "; ".join(f"{k}: {v}" for k, v in list(rep.wrong_shape.items())[:5]))
        return rep.missing, [k for k in rep.unexpected if k.startswith("encoder.")]

    # -- towers

    def _frozen_ctx(self) -> torch.set_grad_enabled:
        return torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_encoder)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> pooled encoder features (B, D), before projection."""
        with self._frozen_ctx():
            return self.encoder.encode_image(images, self.cfg.global_pool)

    def text_features(self, ids: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, S), padding (B, S) bool -> pooled encoder features (B, D), before projection."""
        with self._frozen_ctx():
            return self.encoder.encode_text(ids, pad, self.cfg.global_pool)

    embedding = "joint-space image embedding (projected, L2-normalised)"
    text_embedding = "joint-space caption embedding (projected, L2-normalised)"

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> L2-normalised joint embeddings (B, P)."""
        return F.normalize(self.image_proj(self.image_features(images)).float(), dim=-1)

    def encode_text(self, ids: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, S), padding (B, S) bool -> L2-normalised joint embeddings (B, P)."""
        return F.normalize(self.text_proj(self.text_features(ids, pad)).float(), dim=-1)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at 100 (in the forward, so no optimizer hook is needed; above
        the clamp the temperature gets no gradient, which is what CLIP's in-place clamp amounts to)."""
        return self.logit_scale.float().clamp(max=math.log(MAX_LOGIT_SCALE)).exp().squeeze(0)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image, text = batch.get("image"), batch.get("text")
        if image is None or text is None:
            raise ValueError(f"the retrieval model needs batch['image'] and batch['text'] (pairs); got keys "
                             f"{sorted(batch)}")
        if image.shape[0] != text.shape[0]:
            raise ValueError(f"image batch has {image.shape[0]} samples but text has {text.shape[0]}")
        img = self.encode_image(image)
        txt = self.encode_text(text, batch.get("text_pad"))
        scale = self.scale()
        loss = clip_contrastive_loss(img, txt, scale, gather=self.cfg.gather_across_ranks)
        return {"loss": loss, "contrastive_loss": loss.detach(), "logit_scale": scale.detach()}

    def example_batch(self, batch_size: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
        """A valid random batch on CPU: images and captions with ragged padding."""
        return random_image_text_batch(self.cfg, batch_size, torch.Generator().manual_seed(seed))


@register_model("retrieval", RetrievalCfg, takes=("image_text",), example_batch=random_image_text_batch,
                size_recipe={"vit_huge": {"patch_size": 16}, "vit_giant": {"patch_size": 16}})  # M3AE's ViT-H/16
def _build_retrieval(cfg: RetrievalCfg) -> RetrievalModel:
    return RetrievalModel(cfg)
