"""Released weight layouts -> mmmae names: detection from keys and shapes, and one converter per layout.

mmmae keeps timm's per-block names (``norm1``, ``attn.qkv``, ``attn.q_bias`` / ``attn.v_bias``,
``attn.proj``, ``ls1.gamma``, ``norm2``, ``mlp.fc1/fc2``) under ``encoder.``; MAE's decoder names under
``decoder.`` (``decoder_embed``, ``mask_token``, ``decoder_blocks``, ``decoder_norm``, ``decoder_pred``);
classifiers ``fc_norm`` and ``head`` (a linear probe's ``head.bn`` / ``head.fc``).

A converter never decides what the target model does with a position table: tables travel beside the
state as :class:`PosTable` (with their prefix rows) and :mod:`mmmae.weights.loader` checks, resizes or
folds them for the model at hand. Keys with no mmmae counterpart are kept as ``unsupported`` with the
reason, so a strict load names them instead of dropping them silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from mmmae.layers.pos_embed import sincos_pos_embed_1d, sincos_pos_embed_2d


@dataclass
class PosTable:
    """A stored position table: ``table`` (1, P+L, D) with ``num_prefix`` (P) leading [cls] rows."""

    table: torch.Tensor
    num_prefix: int
    key: str


@dataclass
class Converted:
    """A state in mmmae names. ``renamed`` maps mmmae name -> source key where they differ;
    ``dropped`` source keys the model rebuilds (index buffers), with the reason; ``unsupported`` source
    keys with no mmmae counterpart -> (reason, part), part ``"encoder"`` or ``"other"``."""

    layout: str
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    tables: dict[str, PosTable] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    unsupported: dict[str, tuple[str, str]] = field(default_factory=dict)
    source_keys: frozenset[str] = frozenset()

    def put(self, name: str, value: torch.Tensor, source_key: str) -> None:
        self.state[name] = value
        if name != source_key:
            self.renamed[name] = source_key

    def table(self, name: str, value: torch.Tensor, num_prefix: int, source_key: str) -> None:
        self.tables[name] = PosTable(value.reshape(1, -1, value.shape[-1]), num_prefix, source_key)


# --------------------------------------------------------------------------------------- ViT blocks

_INDEX = "rebuilt from the grid (SimMIM utils.py remap_pretrained_keys_vit drops relative_position_index too)"
_SAME = re.compile(r"(norm1|norm2|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)|attn\.qkv\.(weight|bias)|"
                   r"attn\.(q_bias|v_bias|relative_position_bias_table)|ls[12]\.gamma")
_GAMMA = {"gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma",  # BEiT / SimMIM / VideoMAE(v2) layer scale
          "layer_scale_gamma1": "ls1.gamma", "layer_scale_gamma2": "ls2.gamma"}  # omnivision


def _block(out: Converted, src_prefix: str, dst_prefix: str, key: str, value: torch.Tensor, part: str) -> None:
    """One key of a timm-style block list (``src_prefix`` + ``N.rest``) -> ``dst_prefix`` + ``N.rest``."""
    i, rest = key[len(src_prefix):].split(".", 1)
    dst = f"{dst_prefix}{i}."
    if _SAME.fullmatch(rest):
        out.put(dst + rest, value, key)
    elif rest in _GAMMA:
        if value.numel() == 1 and value.ndim == 3:
            out.unsupported[key] = ("a scalar layer scale (omnivision layer_scale_type=scalar); mmmae's is per "
                                    "channel", part)
        else:
            out.put(dst + _GAMMA[rest], value.reshape(-1), key)
    elif rest == "attn.relative_position_index":
        out.dropped[key] = _INDEX
    elif rest == "attn.scale":
        out.unsupported[key] = ("cosine attention's learned scale (VideoMAEv2 cos_attn=True): mmmae's attention "
                                "is scaled dot-product", part)
    else:
        out.unsupported[key] = ("no mmmae counterpart in a transformer block", part)


def _vit_key(out: Converted, key: str, value: torch.Tensor, src: str, enc: str, *, finetune: bool) -> bool:
    """The timm / official ViT names under ``src`` (encoder side) -> mmmae names under ``enc``.
    Returns False for a key it does not know."""
    k = key[len(src):]
    if not key.startswith(src):
        return False
    if k.startswith("blocks."):
        _block(out, src + "blocks.", enc + "blocks.", key, value, "encoder")
    elif k in ("cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
               "rel_pos_bias.relative_position_bias_table", "mask_token"):
        out.put(enc + k, value, key)
    elif k == "rel_pos_bias.relative_position_index":
        out.dropped[key] = _INDEX
    elif k == "pos_embed":
        out.table("encoder.pos_embed", value, 1 if f"{src}cls_token" in out.source_keys else 0, key)
    elif finetune and k in ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"):
        out.put(k, value, key)
    elif finetune and re.fullmatch(r"head\.0\.(running_mean|running_var|num_batches_tracked)", k):
        # MAE main_linprobe.py: head = Sequential(BatchNorm1d(affine=False, eps=1e-6), head).
        out.put("head.bn." + k.split(".", 2)[2], value, key)
    elif finetune and re.fullmatch(r"head\.1\.(weight|bias)", k):
        out.put("head.fc." + k.split(".", 2)[2], value, key)
    else:
        return False
    return True


def _start(layout: str, state: dict[str, torch.Tensor]) -> Converted:
    # The source's keys travel along: a ViT table has a [cls] row exactly when its state has a cls_token.
    return Converted(layout, source_keys=frozenset(state))


# ------------------------------------------------------------------------------------- converters


def convert_mmmae(state: dict[str, torch.Tensor]) -> Converted:
    """mmmae's own state dicts (a run's model.safetensors, DeepSpeed folders): names as they are; a
    learned ``encoder.pos_embed`` (a fine-tuned image classifier's, no [cls] row) travels as a table."""
    out = _start("mmmae", state)
    for k, v in state.items():
        if k == "encoder.pos_embed":
            out.table(k, v, 0, k)
        else:
            out.put(k, v, k)
    return out


def convert_vit(state: dict[str, torch.Tensor]) -> Converted:
    """timm's VisionTransformer layout: timm state dicts, facebookresearch/mae fine-tuned
    (models_vit.py, a timm ViT with ``fc_norm`` under global_pool) and linear-probe checkpoints
    (main_linprobe.py: ``head.0`` BatchNorm, ``head.1`` Linear), SimMIM / BEiT fine-tuned ViTs (q/v
    biases, ``gamma_1/2``, per-block relative position tables), VideoMAE / VideoMAEv2 fine-tuned and
    distilled ViTs (3-D patch kernel, no [cls]); ``backbone.`` / ``encoder.``-prefixed encoders
    (VideoMAEv2 run_class_finetuning.py strips both)."""
    prefix = next((p for p in ("backbone.", "encoder.") if all(k.startswith(p) for k in state)), "")
    out = _start("vit", state)
    for k, v in state.items():
        if not _vit_key(out, k, v, prefix, "encoder.", finetune=True):
            out.unsupported[k] = ("no mmmae counterpart in a timm-style ViT", "other")
    return out


def convert_mae(state: dict[str, torch.Tensor]) -> Converted:
    """facebookresearch/mae pretraining (models_mae.py MaskedAutoencoderViT): the encoder in timm
    names at the top level, the decoder as ``decoder_*`` and the decoder's ``mask_token``."""
    out = _start("mae", state)
    for k, v in state.items():
        if k.startswith("decoder_blocks."):
            _block(out, "decoder_blocks.", "decoder.decoder_blocks.", k, v, "other")
        elif k == "decoder_pos_embed":
            out.table("decoder.decoder_pos_embed", v, 1, k)
        elif k == "mask_token" or re.fullmatch(r"decoder_(embed|norm|pred)\.(weight|bias)", k):
            out.put(f"decoder.{k}", v, k)
        elif not _vit_key(out, k, v, "", "encoder.", finetune=False):
            out.unsupported[k] = ("no mmmae counterpart in MAE's MaskedAutoencoderViT", "other")
    return out


def convert_videomae(state: dict[str, torch.Tensor]) -> Converted:
    """MCG-NJU/VideoMAE and OpenGVLab/VideoMAEv2 pretraining (modeling_pretrain.py
    PretrainVisionTransformer): ``encoder.*``, ``encoder_to_decoder``, ``mask_token``, ``decoder.blocks``,
    ``decoder.norm``, ``decoder.head`` (mmmae's ``decoder_pred``)."""
    out = _start("videomae", state)
    for k, v in state.items():
        if k.startswith("decoder.blocks."):
            _block(out, "decoder.blocks.", "decoder.decoder_blocks.", k, v, "other")
        elif k in ("encoder_to_decoder.weight", "encoder_to_decoder.bias"):
            out.put(k.replace("encoder_to_decoder", "decoder.decoder_embed"), v, k)
        elif k == "mask_token":
            out.put("decoder.mask_token", v, k)
        elif re.fullmatch(r"decoder\.(norm|head)\.(weight|bias)", k):
            out.put(k.replace("decoder.norm.", "decoder.decoder_norm.").replace("decoder.head.", "decoder.decoder_pred."),
                    v, k)
        elif k == "pos_embed":  # only with use_learnable_pos_emb (never in the released files)
            out.table("decoder.decoder_pos_embed", v, 0, k)
        elif not _vit_key(out, k, v, "encoder.", "encoder.", finetune=False):
            out.unsupported[k] = ("no mmmae counterpart in VideoMAE's PretrainVisionTransformer", "other")
    return out


def convert_simmim(state: dict[str, torch.Tensor]) -> Converted:
    """microsoft/SimMIM pretraining (models/simmim.py SimMIM with VisionTransformerForSimMIM): the
    encoder under ``encoder.`` (``gamma_1/2`` -> ``ls1/ls2.gamma``, the shared ``rel_pos_bias`` table,
    ``mask_token``), the one-layer decoder ``decoder.0`` (a 1x1 conv) -> mmmae's ``decoder.proj``."""
    out = _start("simmim", state)
    for k, v in state.items():
        if k in ("decoder.0.weight", "decoder.0.bias"):
            out.put(k.replace("decoder.0.", "decoder.proj."), v, k)
        elif not _vit_key(out, k, v, "encoder.", "encoder.", finetune=False):
            out.unsupported[k] = ("no mmmae counterpart in SimMIM's ViT", "other")
    return out


_OMNI_DECODER = ("omnivision's MAE decoder adds an encoder-width table and encoder-width mask tokens before "
                 "decoder_embed; mmmae's OmniMAE decoder (MAE's order) cannot hold it: load part='encoder'")


def convert_omnimae(state: dict[str, torch.Tensor]) -> Converted:
    """facebookresearch/omnivore OmniMAE (omnimae/omni_mae_model.py ``OmniMAE(trunk, head)`` with
    omnivision/models/vision_transformer.py): ``trunk.patch_embed.proj.1`` (the Conv3d after
    PadIm2Video), ``trunk.pos_embed`` (a sin-cos buffer), ``trunk.blocks``, ``trunk.norm``. Fine-tuned
    (no decoder): global_pool then ``trunk.norm`` is mmmae's fc_norm, and ``head`` the classifier.
    Pretraining: ``trunk.mask_token`` (encoder width) and the decoder are kept as unsupported."""
    pretrain = any(k.startswith("trunk.decoder.") for k in state)
    pool_norm = not pretrain and "trunk.cls_token" not in state
    out = _start("omnimae", state)
    for k, v in state.items():
        m = re.fullmatch(r"trunk\.patch_embed\.proj(?:\.1)?\.(weight|bias)", k)
        if m:
            out.put(f"encoder.patch_embed.proj.{m.group(1)}", v, k)
        elif k in ("trunk.norm.weight", "trunk.norm.bias") and pool_norm:
            out.put(k.replace("trunk.norm.", "fc_norm."), v, k)
        elif k == "trunk.mask_token":
            out.put("encoder.mask_token", v.reshape(1, 1, -1), k)
        elif k.startswith("trunk.decoder."):
            out.unsupported[k] = (_OMNI_DECODER, "other")
        elif k in ("head.weight", "head.bias"):
            if pretrain:
                out.unsupported[k] = (_OMNI_DECODER, "other")
            else:
                out.put(k, v, k)
        elif not _vit_key(out, k, v, "trunk.", "encoder.", finetune=False):
            out.unsupported[k] = ("no mmmae counterpart in omnivision's VisionTransformer", "other")
    return out


# ----------------------------------------------------------------------------------- Hugging Face

_HF_BLOCK = [
    # (regex on the Hugging Face name after the layer index, mmmae name); transformers 4 and 5 names.
    (r"layernorm_before\.(weight|bias)", r"norm1.\1"),
    (r"layernorm_after\.(weight|bias)", r"norm2.\1"),
    (r"(?:attention\.output\.dense|attention\.o_proj)\.(weight|bias)", r"attn.proj.\1"),
    (r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", r"mlp.fc1.\1"),
    (r"(?:output\.dense|mlp\.fc2)\.(weight|bias)", r"mlp.fc2.\1"),
]
_HF_QKV = re.compile(r"attention\.(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)\.(weight|bias)")
_QKV_INDEX = {"query": 0, "q_proj": 0, "key": 1, "k_proj": 1, "value": 2, "v_proj": 2}


def _hf_layers(out: Converted, state: dict[str, torch.Tensor], src: str, dst: str, part: str) -> set[str]:
    """Hugging Face transformer layers under ``src`` -> ``dst``; q/k/v are fused into ``attn.qkv``
    (transformers 5 VideoMAE keeps its q/v biases as the query / value biases and gives key none:
    they become ``q_bias`` / ``v_bias``). Returns the keys used."""
    pat = re.compile(rf"^{re.escape(src)}\.(\d+)\.(.+)$")
    qkv: dict[tuple[int, str], dict[int, tuple[str, torch.Tensor]]] = {}
    used: set[str] = set()
    for k, v in state.items():
        m = pat.match(k)
        if not m:
            continue
        used.add(k)
        i, rest = int(m.group(1)), m.group(2)
        q = _HF_QKV.fullmatch(rest)
        if q:
            qkv.setdefault((i, q.group(2)), {})[_QKV_INDEX[q.group(1)]] = (k, v)
        elif rest in ("attention.attention.q_bias", "attention.q_bias", "attention.attention.v_bias", "attention.v_bias"):
            out.put(f"{dst}.{i}.attn.{rest.rsplit('.', 1)[1]}", v, k)  # transformers 4 VideoMAE
        else:
            for rx, repl in _HF_BLOCK:
                if re.fullmatch(rx, rest):
                    out.put(f"{dst}.{i}.{re.sub(rx, repl, rest)}", v, k)
                    break
            else:
                out.unsupported[k] = ("no mmmae counterpart in a Hugging Face ViT layer", part)
    for (i, kind), parts in sorted(qkv.items()):
        names = ",".join(parts[j][0] for j in sorted(parts))
        if kind == "bias" and sorted(parts) == [0, 2]:
            out.put(f"{dst}.{i}.attn.q_bias", parts[0][1], parts[0][0])
            out.put(f"{dst}.{i}.attn.v_bias", parts[2][1], parts[2][0])
        elif sorted(parts) == [0, 1, 2]:
            out.put(f"{dst}.{i}.attn.qkv.{kind}", torch.cat([parts[j][1] for j in range(3)]), names)
        else:
            for j in parts:
                out.unsupported[parts[j][0]] = (f"layer {i}: incomplete q/k/v {kind}", part)
    return used


def _hf_prefix(state: dict[str, torch.Tensor], base: str) -> str:
    return f"{base}." if any(k.startswith(f"{base}.embeddings.") for k in state) else ""


def convert_hf_vit(state: dict[str, torch.Tensor]) -> Converted:
    """transformers ``ViTModel`` / ``ViTForImageClassification`` / ``ViTMAEModel`` /
    ``ViTMAEForPreTraining`` state dicts (transformers 5 ``layers.N.attention.q_proj`` names and the
    earlier ``encoder.layer.N.attention.attention.query`` ones)."""
    p = _hf_prefix(state, "vit")
    out = _start("hf_vit", state)
    layers = next((f"{p}{c}" for c in ("layers", "encoder.layer") if any(k.startswith(f"{p}{c}.") for k in state)),
                  f"{p}layers")
    used = _hf_layers(out, state, layers, "encoder.blocks", "encoder")
    # transformers 5 save_pretrained writes the hub's earlier names back, the ViTMAE decoder's as
    # decoder.decoder_encoder.layer.N (transformers 4: decoder.decoder_layers.N).
    for dec in ("decoder.decoder_layers", "decoder.decoder_encoder.layer"):
        used |= _hf_layers(out, state, dec, "decoder.decoder_blocks", "other")
    simple = {f"{p}embeddings.cls_token": "encoder.cls_token", f"{p}embeddings.mask_token": "encoder.mask_token",
              f"{p}embeddings.patch_embeddings.projection.weight": "encoder.patch_embed.proj.weight",
              f"{p}embeddings.patch_embeddings.projection.bias": "encoder.patch_embed.proj.bias",
              f"{p}layernorm.weight": "encoder.norm.weight", f"{p}layernorm.bias": "encoder.norm.bias",
              "classifier.weight": "head.weight", "classifier.bias": "head.bias"}
    for name in ("mask_token", "decoder_embed.weight", "decoder_embed.bias", "decoder_norm.weight",
                 "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"):
        simple[f"decoder.{name}"] = f"decoder.{name}"
    for k, v in state.items():
        if k in used:
            continue
        if k in simple:
            out.put(simple[k], v, k)
        elif k == f"{p}embeddings.position_embeddings":
            out.table("encoder.pos_embed", v, 1, k)
        elif k == "decoder.decoder_pos_embed":
            out.table("decoder.decoder_pos_embed", v, 1, k)
        elif k.startswith(f"{p}pooler."):
            out.unsupported[k] = ("ViTModel's pooler (dense + tanh) has no mmmae counterpart", "other")
        else:
            out.unsupported[k] = ("no mmmae counterpart in a Hugging Face ViT", "other")
    return out


def convert_hf_videomae(state: dict[str, torch.Tensor]) -> Converted:
    """transformers ``VideoMAEModel`` / ``VideoMAEForVideoClassification`` / ``VideoMAEForPreTraining``."""
    p = _hf_prefix(state, "videomae")
    out = _start("hf_videomae", state)
    layers = next((f"{p}{c}" for c in ("encoder.layer", "layers") if any(k.startswith(f"{p}{c}.") for k in state)),
                  f"{p}encoder.layer")
    used = _hf_layers(out, state, layers, "encoder.blocks", "encoder")
    dec = next((c for c in ("decoder.decoder_layers", "decoder.layers") if any(k.startswith(c + ".") for k in state)),
               "decoder.decoder_layers")
    used |= _hf_layers(out, state, dec, "decoder.decoder_blocks", "other")
    simple = {f"{p}embeddings.patch_embeddings.projection.weight": "encoder.patch_embed.proj.weight",
              f"{p}embeddings.patch_embeddings.projection.bias": "encoder.patch_embed.proj.bias",
              f"{p}layernorm.weight": "encoder.norm.weight", f"{p}layernorm.bias": "encoder.norm.bias",
              "fc_norm.weight": "fc_norm.weight", "fc_norm.bias": "fc_norm.bias",
              "classifier.weight": "head.weight", "classifier.bias": "head.bias",
              "encoder_to_decoder.weight": "decoder.decoder_embed.weight",
              "encoder_to_decoder.bias": "decoder.decoder_embed.bias", "mask_token": "decoder.mask_token",
              "decoder.norm.weight": "decoder.decoder_norm.weight", "decoder.norm.bias": "decoder.decoder_norm.bias",
              "decoder.head.weight": "decoder.decoder_pred.weight", "decoder.head.bias": "decoder.decoder_pred.bias"}
    for k, v in state.items():
        if k in used:
            continue
        if k in simple:
            out.put(simple[k], v, k)
        elif k.endswith("position_embeddings"):
            out.table("encoder.pos_embed" if k.startswith(p + "embeddings") else "decoder.decoder_pos_embed", v, 0, k)
        else:
            out.unsupported[k] = ("no mmmae counterpart in a Hugging Face VideoMAE", "other")
    return out


# -------------------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class Layout:
    name: str
    description: str
    detect: Callable[[dict[str, torch.Tensor]], bool]
    convert: Callable[[dict[str, torch.Tensor]], Converted]


def _any(state: dict[str, torch.Tensor], pattern: str) -> bool:
    rx = re.compile(pattern)
    return any(rx.match(k) for k in state)


def _kernel_ndim(state: dict[str, torch.Tensor], key: str) -> int:
    v = state.get(key)
    return v.ndim if v is not None else 0


# In detection order: the first layout whose rule holds is taken.
LAYOUTS: dict[str, Layout] = {lay.name: lay for lay in [
    Layout("hf_videomae", "Hugging Face VideoMAEModel / VideoMAEForVideoClassification / VideoMAEForPreTraining",
           lambda s: _any(s, r"(videomae\.)?embeddings\.patch_embeddings\.") and _kernel_ndim(
               s, next((k for k in s if k.endswith("patch_embeddings.projection.weight")), "")) == 5,
           convert_hf_videomae),
    Layout("hf_vit", "Hugging Face ViTModel / ViTForImageClassification / ViTMAEModel / ViTMAEForPreTraining",
           lambda s: _any(s, r"(vit\.)?embeddings\.patch_embeddings\."), convert_hf_vit),
    Layout("omnimae", "facebookresearch/omnivore OmniMAE (trunk.* / head.*), pretraining and fine-tuned",
           lambda s: _any(s, r"trunk\.blocks\.\d+\."), convert_omnimae),
    Layout("videomae", "MCG-NJU/VideoMAE and OpenGVLab/VideoMAEv2 pretraining (encoder.*, encoder_to_decoder, "
           "mask_token, decoder.blocks / decoder.head)",
           lambda s: "encoder_to_decoder.weight" in s or _any(s, r"decoder\.blocks\.\d+\."), convert_videomae),
    Layout("simmim", "microsoft/SimMIM ViT pretraining (encoder.* with gamma_1/2 and rel_pos_bias, decoder.0)",
           lambda s: "decoder.0.weight" in s or _any(s, r"encoder\.blocks\.\d+\.gamma_1$")
           or "encoder.rel_pos_bias.relative_position_index" in s, convert_simmim),
    Layout("mmmae", "mmmae state dicts: a run's model.safetensors, DeepSpeed checkpoint folders",
           lambda s: _any(s, r"encoder\.(blocks|patch_embed|cls_token)") and not _any(s, r"encoder\.blocks\.\d+\.gamma_"),
           convert_mmmae),
    Layout("mae", "facebookresearch/mae pretraining (models_mae.py: encoder at the top level, decoder_*)",
           lambda s: "decoder_embed.weight" in s or "decoder_pos_embed" in s, convert_mae),
    Layout("vit", "timm VisionTransformer layout: timm state dicts, MAE fine-tuned (models_vit.py) and "
           "linear-probe (main_linprobe.py) checkpoints, SimMIM/BEiT fine-tuned ViTs, VideoMAE / VideoMAEv2 "
           "fine-tuned and distilled ViTs (3-D patch kernel)",
           lambda s: _any(s, r"((backbone|encoder)\.)?(blocks\.\d+\.|patch_embed\.proj\.weight)"), convert_vit),
]}


def variant(converted: Converted, state: dict[str, torch.Tensor]) -> str:
    """A finer name for the report (which reference a ``vit`` / ``omnimae`` state most likely is)."""
    if converted.layout == "vit":
        kernel = converted.state.get("encoder.patch_embed.proj.weight")
        if kernel is not None and kernel.ndim == 5:
            return "videomae_finetune (VideoMAE / VideoMAEv2 fine-tuned or distilled)"
        if "head.bn.running_mean" in converted.state:
            return "mae_linprobe (MAE main_linprobe.py)"
        if any(k.endswith("relative_position_bias_table") for k in converted.state) or _any(state, r".*gamma_1$"):
            return "beit_finetune (SimMIM / BEiT fine-tuned ViT)"
        if "fc_norm.weight" in converted.state:
            return "mae_finetune (MAE models_vit.py global_pool, timm ViT with fc_norm)"
        return "timm_vit (timm VisionTransformer)"
    if converted.layout == "omnimae":
        return "omnimae_pretrain" if any(k.startswith("trunk.decoder.") for k in state) else "omnimae_finetune"
    return converted.layout


def detect_layout(state: dict[str, torch.Tensor], where: str = "<state dict>") -> str:
    """The name of the first layout in :data:`LAYOUTS` whose key rule fits ``state``."""
    for lay in LAYOUTS.values():
        if lay.detect(state):
            return lay.name
    raise ValueError(f"{where}: no known weight layout fits this checkpoint; known layouts: "
                     + "; ".join(f"{n} ({lay.description})" for n, lay in LAYOUTS.items())
                     + f". First keys seen: {list(state)[:8]}")


def convert(state: dict[str, torch.Tensor], layout: str = "auto", where: str = "<state dict>") -> Converted:
    """``state`` in ``layout`` (``"auto"``: detected) -> mmmae names."""
    if layout == "auto":
        layout = detect_layout(state, where)
    if layout not in LAYOUTS:
        raise ValueError(f"{where}: unknown layout {layout!r}; known: auto, {', '.join(LAYOUTS)}")
    return LAYOUTS[layout].convert(state)


# ------------------------------------------------------------------------ converter-only entry points


def _checked(converted: Converted, kind: str) -> dict[str, torch.Tensor]:
    """The converted state alone, every stored table checked to be the fixed sin-cos table of ``kind``
    (``"2d"``: MAE's, ``"1d"``: VideoMAE's interleaved one) that mmmae's pretraining models rebuild."""
    for name, t in converted.tables.items():
        body = t.table[0, t.num_prefix:].float()
        rows, d = body.shape
        if kind == "2d":
            side = int(round(rows**0.5))
            expected = sincos_pos_embed_2d(d, (side, side)) if side * side == rows else None
        else:
            expected = sincos_pos_embed_1d(d, rows, interleave=True)
        if expected is None or not torch.allclose(body, expected, atol=1e-4):
            raise ValueError(f"{t.key}: the checkpoint's position table does not match mmmae's fixed sin-cos layout "
                             f"({kind}, {rows} rows)")
    if converted.unsupported:
        k, (why, _) = next(iter(converted.unsupported.items()))
        raise KeyError(f"unrecognised key {k!r}: {why}")
    return dict(converted.state)


def from_official_mae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """facebookresearch/mae pretraining state -> mmmae ``mae`` state (tables checked, not loaded)."""
    return _checked(convert_mae(state), "2d")


def from_hf_vitmae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``ViTMAEForPreTraining`` state -> mmmae ``mae`` state."""
    return _checked(convert_hf_vit(state), "2d")


def from_official_videomae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MCG-NJU/VideoMAE pretraining state -> mmmae ``videomae`` state."""
    return _checked(convert_videomae(state), "1d")


def from_hf_videomae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``VideoMAEForPreTraining`` state -> mmmae ``videomae`` state."""
    return _checked(convert_hf_videomae(state), "1d")
