"""Weight layouts of released MAE / VideoMAE checkpoints -> mmmae state dicts.

mmmae keeps timm's per-block names (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1/fc2``)
under ``encoder.``, and MAE's decoder names under ``decoder.``. Position tables are fixed sin-cos
buffers, never stored: a released table is checked against ours instead of loaded, so a layout
mismatch is an error rather than a silently shuffled model.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mmmae.layers.pos_embed import sincos_pos_embed_1d, sincos_pos_embed_2d


def load_checkpoint_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or torch checkpoint; unwraps the usual ``model`` / ``module`` /
    ``state_dict`` nesting of released files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "module", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def _check_table(name: str, table: torch.Tensor, expected: torch.Tensor, prefix_rows: int) -> None:
    body = table.reshape(-1, table.shape[-1])[prefix_rows:].float()
    if body.shape != expected.shape or not torch.allclose(body, expected, atol=1e-4):
        raise ValueError(f"{name}: the checkpoint's position table does not match mmmae's fixed sin-cos "
                         f"layout (shape {tuple(body.shape)} vs {tuple(expected.shape)})")


def _grid_from_table(rows: int) -> tuple[int, int]:
    side = int(round(rows**0.5))
    if side * side != rows:
        raise ValueError(f"cannot infer a square grid from {rows} position rows")
    return side, side


def from_official_mae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """facebookresearch/mae (and timm ``*.mae``) pretraining checkpoints -> mmmae ``mae``."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k == "pos_embed":
            d = v.shape[-1]
            _check_table(k, v, sincos_pos_embed_2d(d, _grid_from_table(v.shape[1] - 1)), 1)
        elif k == "decoder_pos_embed":
            d = v.shape[-1]
            _check_table(k, v, sincos_pos_embed_2d(d, _grid_from_table(v.shape[1] - 1)), 1)
        elif k.startswith("decoder_") or k == "mask_token":
            out[f"decoder.{k}"] = v
        else:
            out[f"encoder.{k}"] = v
    return out


_HF_BLOCK = [
    # (regex on the Hugging Face name after the layer index, mmmae name); both transformers 4 and 5 names.
    (r"layernorm_before\.(weight|bias)", r"norm1.\1"),
    (r"layernorm_after\.(weight|bias)", r"norm2.\1"),
    (r"(?:attention\.output\.dense|attention\.o_proj)\.(weight|bias)", r"attn.proj.\1"),
    (r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", r"mlp.fc1.\1"),
    (r"(?:output\.dense|mlp\.fc2)\.(weight|bias)", r"mlp.fc2.\1"),
]
_HF_QKV = re.compile(r"attention\.(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)\.(weight|bias)")
_QKV_INDEX = {"query": 0, "q_proj": 0, "key": 1, "k_proj": 1, "value": 2, "v_proj": 2}


def _convert_hf_blocks(items: dict[str, torch.Tensor], src: str, dst: str, out: dict[str, torch.Tensor],
                       qv_bias: bool) -> None:
    """Map Hugging Face transformer layers under ``src`` (e.g. ``vit.encoder.layer``) to ``dst``."""
    pat = re.compile(rf"^{re.escape(src)}\.(\d+)\.(.+)$")
    qkv: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for k, v in items.items():
        m = pat.match(k)
        if not m:
            continue
        i, rest = int(m.group(1)), m.group(2)
        q = _HF_QKV.fullmatch(rest)
        if q:
            qkv.setdefault((i, q.group(2)), {})[_QKV_INDEX[q.group(1)]] = v
            continue
        if rest in ("attention.attention.q_bias", "attention.q_bias"):
            out[f"{dst}.{i}.attn.q_bias"] = v
            continue
        if rest in ("attention.attention.v_bias", "attention.v_bias"):
            out[f"{dst}.{i}.attn.v_bias"] = v
            continue
        for rx, repl in _HF_BLOCK:
            if re.fullmatch(rx, rest):
                out[f"{dst}.{i}.{re.sub(rx, repl, rest)}"] = v
                break
        else:
            raise KeyError(f"unrecognised Hugging Face key {k!r}")
    for (i, kind), parts in qkv.items():
        if kind == "bias" and qv_bias and sorted(parts) == [0, 2]:
            # transformers 5 keeps VideoMAE's q/v biases as the query/value Linear biases (key has none).
            out[f"{dst}.{i}.attn.q_bias"] = parts[0]
            out[f"{dst}.{i}.attn.v_bias"] = parts[2]
            continue
        if len(parts) != 3:
            raise KeyError(f"layer {i}: incomplete q/k/v {kind} in the checkpoint")
        out[f"{dst}.{i}.attn.qkv.{kind}"] = torch.cat([parts[0], parts[1], parts[2]], dim=0)


def _layers_prefix(state: dict[str, torch.Tensor], candidates: tuple[str, ...]) -> str:
    for c in candidates:
        if any(k.startswith(c + ".") for k in state):
            return c
    raise KeyError(f"none of {candidates} found in the checkpoint")


def from_hf_vitmae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``ViTMAEForPreTraining`` state dict -> mmmae ``mae``."""
    out: dict[str, torch.Tensor] = {}
    enc = _layers_prefix(state, ("vit.encoder.layer", "vit.layers"))
    dec = _layers_prefix(state, ("decoder.decoder_layers",))
    _convert_hf_blocks(state, enc, "encoder.blocks", out, qv_bias=False)
    _convert_hf_blocks(state, dec, "decoder.decoder_blocks", out, qv_bias=False)
    simple = {
        "vit.embeddings.cls_token": "encoder.cls_token",
        "vit.embeddings.patch_embeddings.projection.weight": "encoder.patch_embed.proj.weight",
        "vit.embeddings.patch_embeddings.projection.bias": "encoder.patch_embed.proj.bias",
        "vit.layernorm.weight": "encoder.norm.weight",
        "vit.layernorm.bias": "encoder.norm.bias",
        "decoder.mask_token": "decoder.mask_token",
        "decoder.decoder_embed.weight": "decoder.decoder_embed.weight",
        "decoder.decoder_embed.bias": "decoder.decoder_embed.bias",
        "decoder.decoder_norm.weight": "decoder.decoder_norm.weight",
        "decoder.decoder_norm.bias": "decoder.decoder_norm.bias",
        "decoder.decoder_pred.weight": "decoder.decoder_pred.weight",
        "decoder.decoder_pred.bias": "decoder.decoder_pred.bias",
    }
    for k, v in state.items():
        if k in simple:
            out[simple[k]] = v
        elif k in ("vit.embeddings.position_embeddings", "decoder.decoder_pos_embed"):
            _check_table(k, v, sincos_pos_embed_2d(v.shape[-1], _grid_from_table(v.shape[1] - 1)), 1)
    return out


def from_official_videomae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MCG-NJU/VideoMAE pretraining checkpoints (``encoder.*`` / ``decoder.*`` / ``encoder_to_decoder``)
    -> mmmae ``videomae``. The decoder's ``head`` becomes ``decoder_pred``."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.endswith("pos_embed"):
            _check_table(k, v, sincos_pos_embed_1d(v.shape[-1], v.reshape(-1, v.shape[-1]).shape[0], interleave=True), 0)
        elif k.startswith("encoder."):
            out[k] = v
        elif k == "encoder_to_decoder.weight" or k == "encoder_to_decoder.bias":
            out[k.replace("encoder_to_decoder", "decoder.decoder_embed")] = v
        elif k == "mask_token":
            out["decoder.mask_token"] = v
        elif k.startswith("decoder.blocks."):
            out[k.replace("decoder.blocks.", "decoder.decoder_blocks.")] = v
        elif k.startswith("decoder.norm."):
            out[k.replace("decoder.norm.", "decoder.decoder_norm.")] = v
        elif k.startswith("decoder.head."):
            out[k.replace("decoder.head.", "decoder.decoder_pred.")] = v
        else:
            raise KeyError(f"unrecognised VideoMAE key {k!r}")
    return out


def from_hf_videomae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``VideoMAEForPreTraining`` state dict -> mmmae ``videomae``."""
    out: dict[str, torch.Tensor] = {}
    enc = _layers_prefix(state, ("videomae.encoder.layer", "videomae.layers"))
    dec = _layers_prefix(state, ("decoder.decoder_layers", "decoder.layers"))
    _convert_hf_blocks(state, enc, "encoder.blocks", out, qv_bias=True)
    _convert_hf_blocks(state, dec, "decoder.decoder_blocks", out, qv_bias=True)
    simple = {
        "videomae.embeddings.patch_embeddings.projection.weight": "encoder.patch_embed.proj.weight",
        "videomae.embeddings.patch_embeddings.projection.bias": "encoder.patch_embed.proj.bias",
        "videomae.layernorm.weight": "encoder.norm.weight",
        "videomae.layernorm.bias": "encoder.norm.bias",
        "encoder_to_decoder.weight": "decoder.decoder_embed.weight",
        "mask_token": "decoder.mask_token",
        "decoder.norm.weight": "decoder.decoder_norm.weight",
        "decoder.norm.bias": "decoder.decoder_norm.bias",
        "decoder.head.weight": "decoder.decoder_pred.weight",
        "decoder.head.bias": "decoder.decoder_pred.bias",
    }
    for k, v in state.items():
        if k in simple:
            out[simple[k]] = v
        elif k == "encoder_to_decoder.bias":
            out["decoder.decoder_embed.bias"] = v
        elif k.endswith("position_embeddings") or k.endswith("pos_embed"):
            _check_table(k, v, sincos_pos_embed_1d(v.shape[-1], v.reshape(-1, v.shape[-1]).shape[0], interleave=True), 0)
    return out
