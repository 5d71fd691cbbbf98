"""Parameter groups (weight decay, layer-wise lr decay) and the warmup + cosine schedule."""

from __future__ import annotations

import math
import re
from typing import Any

from mmmae.heads import EncoderModel


def layer_id(name: str, num_layers: int) -> int:
    """Depth index for layer-wise lr decay (BEiT / MAE fine-tuning): embeddings and special tokens 0,
    encoder block i -> i + 1, everything after the trunk (norms, heads) num_layers + 1."""
    if re.search(r"(^|\.)(cls_token|mask_token|pos_embed|patch_embed|text_embed|type_embed)", name) \
            and "decoder" not in name:
        return 0
    m = re.search(r"(?:^|\.)blocks\.(\d+)\.", name)
    if m and "decoder" not in name:
        return int(m.group(1)) + 1
    return num_layers + 1


def param_groups(model: EncoderModel, weight_decay: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases, norms (1-D tensors), position tables and the model's
    ``no_weight_decay`` names (special tokens); with ``layer_decay`` < 1 each depth gets lr scale
    ``layer_decay ** (num_layers + 1 - depth)``, ``num_layers`` being the encoder's blocks."""
    skip = set(model.no_weight_decay())
    num_layers = len(model.encoder.blocks)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name in skip or name.endswith(".bias") or "pos_embed" in name
        depth = layer_id(name, num_layers) if layer_decay < 1.0 else 0
        scale = layer_decay ** (num_layers + 1 - depth) if layer_decay < 1.0 else 1.0
        key = (depth, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": scale}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def lr_at(step: int, *, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Per-step linear warmup from 0, then half-cosine down to ``min_lr`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
