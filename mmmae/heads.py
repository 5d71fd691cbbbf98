"""Heads on top of an encoder's features, and the classification model used for fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmmae.encoder import VisionEncoder
from mmmae.layers.fixed import release_fixed_buffer
from mmmae.registry import register_model


@dataclass
class EncoderCfg:
    """Fields every vision method shares (timm names)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    qkv_bias: str = "qkv"
    init_values: float = 0.0  # layer scale; 0 disables
    attn_impl: str = "auto"
    # 0 = image encoder (2-D patches); >0 = video encoder over this many frames (3-D tubelets).
    num_frames: int = 0
    tubelet_size: int = 2
    pos_embed: str = "sincos"  # sincos, sincos_1d, or none (positions only from rel_pos_bias)
    rel_pos_bias: str = "none"  # BEiT relative position bias: none, shared (one table) or block (one per block)
    cls_token: bool = True


def build_vision_encoder(cfg: EncoderCfg, **extra) -> VisionEncoder:
    return VisionEncoder(
        cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio,
        num_frames=cfg.num_frames or None, tubelet_size=cfg.tubelet_size, pos_embed=cfg.pos_embed,
        rel_pos_bias=cfg.rel_pos_bias, qkv_bias=cfg.qkv_bias, drop_path_rate=cfg.drop_path_rate,
        init_values=cfg.init_values or None, cls_token=cfg.cls_token, attn_impl=cfg.attn_impl, **extra)


class EncoderModel(nn.Module):
    """Base of the registered models: an ``encoder`` (a ``MaskedEncoder``) plus method parts.

    ``init_weights`` initialises each direct child that has an ``init_weights`` (in registration
    order), ``no_weight_decay`` gathers the children's names under their prefixes, and gradient
    checkpointing is the encoder's. Models override what differs (e.g. a head's own init).

    The rest of the contract, with its defaults: ``learned_pos`` (the encoder's position table is a
    trained parameter, resized from the pretraining grid when weights load), ``weight_adapter``
    (a rewrite of an mmmae-named state dict before it loads, e.g. BEVT's head names), and the
    embedding hooks that extraction, retrieval and search call: ``encode_image`` (pixels -> one
    feature row; ``embedding`` says what it is in words) and, for image-text models,
    ``encode_text`` (``text_embedding`` names it; empty: the model embeds no text).
    """

    learned_pos: bool = False
    embedding: str = "encoder patch tokens, mean-pooled (encoder.forward_features)"
    text_embedding: str = ""

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels (B, C, H, W), or a clip (B, C, T, H, W) for a video encoder -> (B, D): the feature
        an embedding row holds (default: the encoder's patch tokens, mean-pooled)."""
        return pool_tokens(self.encoder.forward_features(x), self.encoder.num_prefix_tokens, "avg")

    def encode_text(self, ids: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, S), padding (B, S) bool -> (B, D); only models with a ``text_embedding``."""
        raise ValueError(f"{type(self).__name__} has no text encoder")

    def init_weights(self) -> None:
        for child in self.children():
            if hasattr(child, "init_weights"):
                child.init_weights()

    def no_weight_decay(self) -> set[str]:
        return {f"{name}.{n}" for name, child in self.named_children() if hasattr(child, "no_weight_decay")
                for n in child.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    def weight_adapter(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An mmmae-named state dict rewritten for this model before it loads (default: as it is)."""
        return state


def pool_tokens(x: torch.Tensor, num_prefix_tokens: int, global_pool: str) -> torch.Tensor:
    """(B, P+L, D) -> (B, D): mean over patch tokens (``avg``) or the [cls] token (``token``)."""
    if global_pool == "avg":
        return x[:, num_prefix_tokens:].mean(dim=1)
    if global_pool == "token":
        if num_prefix_tokens == 0:
            raise ValueError("global_pool='token' needs an encoder with a [cls] token")
        return x[:, 0]
    raise ValueError(f"global_pool must be 'avg' or 'token', got {global_pool!r}")


class LinearProbeHead(nn.Module):
    """MAE's linear-probe protocol: BatchNorm without affine parameters, then a linear layer."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(in_dim, num_classes)

    def init_weights(self) -> None:
        """MAE main_linprobe.py: trunc_normal_(std=0.01) weight, zero bias (called by the model's
        ``init_weights``, after construction, as every other initialisation)."""
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))


class ProjectionHead(nn.Module):
    """Linear (or 2-layer MLP) projection into a joint embedding space, e.g. for retrieval."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim)) \
            if hidden_dim else nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class ClassifierCfg(EncoderCfg):
    num_classes: int = 1000
    global_pool: str = "avg"  # MAE / VideoMAE fine-tuning: mean-pool patch tokens, then fc_norm
    head_init_scale: float = 0.001  # VideoMAE scales the head's init down
    head_drop: float = 0.0
    label_smoothing: float = 0.0
    linear_probe: bool = False  # freeze the encoder, BatchNorm + linear head (MAE's protocol)
    # The encoder's position table: "learned" (facebookresearch/mae main_finetune.py / main_linprobe.py:
    # timm's ViT pos_embed, a parameter initialised from the pretrained table, bicubic-interpolated when
    # the grid changes), "fixed" (MCG-NJU/VideoMAE run_class_finetuning.py, use_learnable_pos_emb=False,
    # and young-geng/m3ae_public finetune_main.py: the sin-cos table of the model's own grid, built
    # afresh at any resolution or frame count), "auto": learned for images, fixed for videos.
    pos_table: str = "auto"
    # Image size the init_from weights were pretrained at, i.e. the grid of their table; 0: as written
    # in the pretraining run's config.yaml beside the weights, else img_size. Used by a learned table.
    init_img_size: int = 0


POS_TABLES = ("auto", "learned", "fixed")


def resolve_pos_table(cfg: ClassifierCfg) -> str:
    """``"learned"`` or ``"fixed"``: the fine-tuning rule of the reference each kind of input follows."""
    if cfg.pos_table not in POS_TABLES:
        raise ValueError(f"pos_table must be one of {', '.join(POS_TABLES)}, got {cfg.pos_table!r}")
    if cfg.pos_table == "auto":
        return "fixed" if cfg.num_frames else "learned"
    return cfg.pos_table


class Classifier(EncoderModel):
    """Pretrained vision encoder + pooled head. Keys under ``encoder.`` match the pretraining models,
    so a pretraining state dict loads with only the head (and fc_norm) missing.

    ``forward(batch)`` takes ``batch["image"]`` or ``batch["video"]`` and optional ``batch["label"]``
    (class indices (B,) or soft targets (B, num_classes), as mixup makes) and returns ``logits`` and,
    given labels, ``loss``.

    Position table (``pos_table``): image classifiers follow MAE's fine-tuning and linear probe, a
    learned ``encoder.pos_embed`` (stored in the state dict; frozen with the encoder in a linear
    probe) that :func:`load_encoder_state` fills from the pretrained table, resized to this grid;
    video classifiers follow VideoMAE's, the fixed sin-cos table of their own grid.
    """

    # init_from takes a pretraining encoder; fc_norm and the head start fresh (mmmae.weights part="auto").
    init_part = "encoder"
    embedding = "pooled features (model.forward_features)"

    def __init__(self, cfg: ClassifierCfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = build_vision_encoder(cfg, final_norm=cfg.global_pool == "token")
        self.learned_pos = resolve_pos_table(cfg) == "learned" and self.encoder.pos_embed is not None
        if cfg.pos_table == "learned" and self.encoder.pos_embed is None:
            raise ValueError(f"pos_table='learned' needs a position table; pos_embed={cfg.pos_embed!r} has none")
        if self.learned_pos:
            # timm's ViT keeps its table as a parameter: fine-tuning trains it (no weight decay).
            table = self.encoder.pos_embed.detach().clone()
            self._make_pos_embed = release_fixed_buffer(self.encoder, "pos_embed")
            self.encoder.pos_embed = nn.Parameter(table)
        d = cfg.embed_dim
        if cfg.linear_probe:
            self.encoder.requires_grad_(False)
            self.fc_norm = nn.Identity()
            self.head = LinearProbeHead(d, cfg.num_classes)
        else:
            self.fc_norm = nn.LayerNorm(d, eps=1e-6) if cfg.global_pool == "avg" else nn.Identity()
            self.head = nn.Linear(d, cfg.num_classes)
        self.head_drop = nn.Dropout(cfg.head_drop)

    def init_weights(self) -> None:
        self.encoder.init_weights()
        if self.learned_pos:  # the pretraining table until load_encoder_weights brings the checkpoint's
            with torch.no_grad():
                self.encoder.pos_embed.copy_(self._make_pos_embed())
        if isinstance(self.head, LinearProbeHead):
            self.head.init_weights()
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
            self.head.weight.data.mul_(self.cfg.head_init_scale)

    def no_weight_decay(self) -> set[str]:
        # timm's VisionTransformer.no_weight_decay names pos_embed (MAE's lr-decay groups use it).
        return super().no_weight_decay() | ({"encoder.pos_embed"} if self.learned_pos else set())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels -> pooled, normed features (B, D)."""
        if self.cfg.linear_probe:
            self.encoder.eval()  # frozen: no drop path, and the encoder's statistics stay put
        feats = self.encoder.forward_features(x)
        return self.fc_norm(pool_tokens(feats, self.encoder.num_prefix_tokens, self.cfg.global_pool))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["video"] if "video" in batch else batch["image"]
        logits = self.head(self.head_drop(self.forward_features(x)))
        out = {"logits": logits}
        label = batch.get("label")
        if label is not None:
            if label.ndim == 2:  # soft targets (mixup / cutmix already applied the smoothing)
                loss = torch.sum(-label * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            else:
                loss = F.cross_entropy(logits.float(), label, label_smoothing=self.cfg.label_smoothing)
            out["loss"] = loss
            out["ce_loss"] = loss.detach()
        return out


def _classifier_takes(cfg: ClassifierCfg) -> tuple[str, ...]:
    return ("video",) if cfg.num_frames else ("image",)


def _classifier_example(cfg: ClassifierCfg, batch_size: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    s, c = cfg.img_size, cfg.in_chans
    key, shape = ("video", (batch_size, c, cfg.num_frames, s, s)) if cfg.num_frames else ("image", (batch_size, c, s, s))
    return {key: torch.randn(*shape, generator=g), "label": torch.randint(0, cfg.num_classes, (batch_size,), generator=g)}


class Mixup:
    """timm's Mixup / CutMix on a batch's pixels (soft labels with the classifier's smoothing); a video
    gets one box on H x W for all its frames (time is folded into channels for the cut)."""

    def __init__(self, mixup: float, cutmix: float, label_smoothing: float, num_classes: int) -> None:
        from timm.data import Mixup as TimmMixup
        self.fn = TimmMixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                            num_classes=num_classes)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        key = "video" if "video" in batch else "image"
        x = batch[key]
        flat = x.flatten(1, 2) if x.ndim == 5 else x
        flat, target = self.fn(flat, batch["label"])
        return {**batch, key: flat.view_as(x), "label": target}


def classifier_batch_transform(train_cfg: Any, cfg: ClassifierCfg) -> Mixup | None:
    """Fine-tuning's mixup / cutmix (``train.mixup``, ``train.cutmix``), or None when both are 0."""
    if train_cfg.train.mixup <= 0 and train_cfg.train.cutmix <= 0:
        return None
    return Mixup(train_cfg.train.mixup, train_cfg.train.cutmix, cfg.label_smoothing, cfg.num_classes)


@register_model("classifier", ClassifierCfg, takes=_classifier_takes, example_batch=_classifier_example,
                batch_transform=classifier_batch_transform)
def _build_classifier(cfg: ClassifierCfg) -> Classifier:
    return Classifier(cfg)


def vision_encoder_state(state: dict[str, torch.Tensor], prefix: str = "encoder.") -> dict[str, torch.Tensor]:
    """The ``prefix``-ed weights of a pretraining state dict that an image/video ``VisionEncoder`` takes,
    keys without the prefix.

    Multimodal encoders (M3AE) add a learned image type embedding to every patch token: a constant
    offset, so it folds exactly into the patch projection's bias; their text-only weights are left out.
    """
    enc = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    out = {k: v for k, v in enc.items() if not k.startswith(("text_embed", "type_embed"))}
    if "type_embed.image" in enc and "patch_embed.proj.bias" in enc:
        bias = enc["patch_embed.proj.bias"]
        out["patch_embed.proj.bias"] = bias + enc["type_embed.image"].reshape(-1).to(bias.dtype)
    return out


@dataclass
class EncoderLoad:
    """What :func:`load_encoder_state` did: missing / unexpected encoder keys and, in words and grids,
    where the position table came from."""

    missing: list[str]
    unexpected: list[str]
    pos_embed: dict[str, Any]


def load_encoder_state(model: nn.Module, state: dict[str, torch.Tensor], *, prefix: str = "encoder.",
                       source_grid: tuple[int, ...] | None = None) -> EncoderLoad:
    """Load the ``prefix``-ed part of a pretraining state into ``model.encoder``, non-strictly, through
    :func:`mmmae.weights.load` (``part="encoder"``; its position-table rules: a learned table gets the
    checkpoint's table, or the sin-cos table the encoder was pretrained with over ``source_grid``,
    resized to the model's grid; a fixed table stays the model's own, and a learned table in the
    checkpoint is then unexpected). Keys are returned without the ``encoder.`` prefix."""
    from mmmae.weights import load

    if not any(k.startswith(prefix) for k in state):
        raise KeyError(f"checkpoint has no keys under {prefix!r}; first keys: {list(state)[:5]}")
    if prefix != "encoder.":
        state = {"encoder." + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    rep = load(model, state, part="encoder", strict=False, source_grid=source_grid)
    strip = len("encoder.")
    unexpected = [k[strip:] for k in rep.unexpected if k.startswith("encoder.")]
    unexpected += [k[strip:] for k in rep.ignored if k.startswith("encoder.") and not rep.ignored[k].startswith("M3AE")]
    if rep.wrong_shape:
        raise ValueError(f"the checkpoint's encoder does not fit the model: {rep.problems()}")
    return EncoderLoad([k[strip:] for k in rep.missing], unexpected, rep.pos_embed)


def load_encoder_weights(model: nn.Module, state: dict[str, torch.Tensor], *, prefix: str = "encoder.",
                         source_grid: tuple[int, ...] | None = None) -> tuple[list[str], list[str]]:
    """:func:`load_encoder_state`, returning only the (missing, unexpected) encoder keys."""
    res = load_encoder_state(model, state, prefix=prefix, source_grid=source_grid)
    return res.missing, res.unexpected
