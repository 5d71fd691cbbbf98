"""``load(model, source)``: any released layout into any mmmae model, with a report of what happened.

Steps: read the source (:mod:`mmmae.weights.io`), convert it to mmmae names
(:mod:`mmmae.weights.layouts`), adapt it to the model (the model's own ``weight_adapter`` first, then
the generic rules below), match it key by key against the model's state dict, load, and report.

Generic rules, each from a reference:

- Position tables. A [cls] row is folded into ``cls_token`` (timm / MAE / HF ViT add the table after
  prepending [cls], so ``cls + pos[0]`` is exact; mmmae adds no position to [cls]). A model with a
  learned table (an image classifier) takes the checkpoint's table, or else the sin-cos table its
  encoder was pretrained with, bicubic-resized to its grid (facebookresearch/mae util/pos_embed.py
  ``interpolate_pos_embed``; video tables over space only, VideoMAE run_class_finetuning.py). A model
  with a fixed sin-cos table checks that the stored one is that table (then it is rebuilt, at any grid:
  VideoMAE's ``use_learnable_pos_emb=False``); a learned table it cannot hold is unexpected.
- A 2-D patch kernel into a 3-D tubelet embedding is inflated: repeated over the tubelet and divided
  by its length (BEVT / I3D), so a static clip gives the image's tokens.
- A shared relative position bias table is copied into every block of a per-block model (SimMIM
  utils.py ``remap_pretrained_keys_vit``). A relative position table of another (square) grid is
  resized as that function does: offsets on a geometric progression, bicubic spline, the three [cls]
  rows kept (:mod:`mmmae.weights.relpos`); the index buffers are rebuilt from the model's grid.
- q/v biases <-> a fused qkv bias with a zero k part (BEiT / VideoMAE's ``q_bias, 0, v_bias``).
- A multimodal (M3AE) encoder into a vision-only one: the image type embedding is folded into the
  patch bias and the text tower is left out (``mmmae.heads.vision_encoder_state``).
- ``part="encoder"``: only ``encoder.*`` is loaded; a pretraining ``mask_token`` and everything else
  in the checkpoint is ignored (listed), the model's other weights keep their initialisation (listed).
  ``part="auto"``: ``"all"`` when the checkpoint holds every non-encoder weight of the model with its
  shape, else the model's ``init_part`` (``"encoder"`` for classifiers and retrieval, whose heads are
  new when fine-tuning; a head whose shape differs is dropped, as MAE main_finetune.py does), else
  ``"all"``.

Strict (the default): any missing, unexpected or wrongly shaped key is a :class:`WeightsError`
naming the source, the layout and the keys, and nothing is loaded.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from mmmae.layers.pos_embed import interpolate_pos_table, pos_table
from mmmae.weights.io import Source, read_source
from mmmae.weights.layouts import LAYOUTS, Converted, PosTable, convert, variant
from mmmae.weights.relpos import NUM_EXTRA_TOKENS, interpolate_rel_pos_table

log = logging.getLogger(__name__)

PARTS = ("auto", "all", "encoder")
# (model, state in mmmae names) -> state adapted to the model (e.g. BEVT's image head -> image_head).
Adapter = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class WeightsError(ValueError):
    """A checkpoint that does not fit the model (strict load), naming the source and the keys."""


@dataclass
class LoadReport:
    """What :func:`load` did. Keys are the model's (``encoder.blocks.0.attn.qkv.weight``).

    ``loaded``: model keys filled from the source; ``renamed``: model key -> source key where the
    names differ; ``converted``: model key -> what was done to the value (fused q/k/v, folded [cls]
    row, copied shared table...); ``interpolated``: table -> {from_grid, to_grid}; ``inflated``:
    kernels inflated 2-D -> 3-D; ``fixed``: stored tables found equal to the model's fixed sin-cos
    table (rebuilt, not loaded) and index buffers; ``missing`` / ``unexpected`` / ``wrong_shape``: what
    a strict load refuses; ``ignored``: source keys outside ``part`` -> why; ``initialised``: model keys
    outside ``part``, left as initialised; ``pos_embed``: the encoder table's origin and grids."""

    source: str
    layout: str
    variant: str
    part: str
    loaded: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    converted: dict[str, str] = field(default_factory=dict)
    interpolated: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    inflated: list[str] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: dict[str, str] = field(default_factory=dict)
    wrong_shape: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    initialised: list[str] = field(default_factory=list)
    pos_embed: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_shape)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the trainer writes it as init_report.json); ``unexpected`` as a list of keys,
        with ``unexpected_why`` giving each key's reason."""
        d = asdict(self)
        d["unexpected_why"] = d.pop("unexpected")
        d["unexpected"] = list(self.unexpected)
        return d

    def problems(self, limit: int = 8) -> str:
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing (e.g. {', '.join(self.missing[:limit])})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected (e.g. "
                         + "; ".join(f"{k}: {v}" for k, v in list(self.unexpected.items())[:limit]) + ")")
        if self.wrong_shape:
            parts.append(f"{len(self.wrong_shape)} of the wrong shape ("
                         + "; ".join(f"{k}: {v}" for k, v in list(self.wrong_shape.items())[:limit]) + ")")
        return "; ".join(parts)


def load(model: nn.Module, source: str | Path | Mapping[str, torch.Tensor], *, layout: str = "auto",
         part: str = "all", strict: bool = True, source_grid: tuple[int, ...] | None = None,
         adapter: Adapter | None = None) -> LoadReport:
    """Load ``source`` (a path: file, Hugging Face / run / DeepSpeed folder; or a state dict) into
    ``model``. ``layout``: ``"auto"`` (detected from keys and shapes) or a name of
    :data:`mmmae.weights.LAYOUTS`; ``part``: ``"all"``, ``"encoder"`` or ``"auto"`` (module docstring);
    ``source_grid``: the token grid the weights were trained on when the stored table does not say
    (a square grid, per time slice for videos, is assumed otherwise); ``adapter``: a model-specific
    rewrite of the mmmae-named state (default: the model's ``weight_adapter``, part of the model contract
    :class:`mmmae.heads.EncoderModel`; none for another module).
    Returns the :class:`LoadReport`; strict: raises :class:`WeightsError` instead of a partial load."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    src = read_source(source)
    converted = convert(src.state, layout, src.name())
    return load_converted(model, converted, src, part=part, strict=strict, source_grid=source_grid,
                          adapter=adapter if adapter is not None else _contract_adapter(model))


def _contract_adapter(model: nn.Module) -> Adapter | None:
    from mmmae.heads import EncoderModel
    return model.weight_adapter if isinstance(model, EncoderModel) else None


def load_converted(model: nn.Module, c: Converted, src: Source, *, part: str, strict: bool,
                   source_grid: tuple[int, ...] | None, adapter: Adapter | None) -> LoadReport:
    own = model.state_dict()
    rep = LoadReport(src.name(), c.layout, variant(c, src.state), part, renamed=dict(c.renamed))
    state = dict(c.state)
    rep.fixed.extend(c.dropped)
    unsupported = dict(c.unsupported)
    if adapter is not None:
        state = adapter(state)
    _vision_from_multimodal(state, own, rep)
    _inflate(state, own, rep)
    _shared_to_block_tables(state, own, rep)
    _rel_pos_tables(model, state, own, rep)
    _qkv_bias(state, own, rep, unsupported)
    _tables(model, c.tables, state, own, rep, unsupported, source_grid)
    rep.part = _resolve_part(model, part, state, own)
    to_load = _match(state, own, rep, unsupported)
    if strict and not rep.ok:
        raise WeightsError(f"{rep.source} ({LAYOUTS[c.layout].description if c.layout in LAYOUTS else c.layout}) "
                           f"does not fit the model {type(model).__name__} (part={rep.part}): {rep.problems()}. "
                           f"Check the config's sizes against the checkpoint, or pass strict=False "
                           f"(init_from: init_strict=false) to load what fits")
    model.load_state_dict(to_load, strict=False)
    rep.loaded = sorted(to_load)
    return rep


# ---------------------------------------------------------------------------------------- rules


def _vision_from_multimodal(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], rep: LoadReport) -> None:
    if "encoder.type_embed.image" not in state or "encoder.type_embed.image" in own:
        return
    from mmmae.heads import vision_encoder_state
    enc = vision_encoder_state(state)
    for k in [k for k in state if k.startswith("encoder.") and k[len("encoder."):] not in enc]:
        rep.ignored[k] = "M3AE text tower / type embeddings: a vision encoder takes the image part"
        del state[k]
    if "patch_embed.proj.bias" in enc:
        state["encoder.patch_embed.proj.bias"] = enc["patch_embed.proj.bias"]
        rep.converted["encoder.patch_embed.proj.bias"] = "image type embedding folded into the patch bias"


def _inflate(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], rep: LoadReport) -> None:
    key = "encoder.patch_embed.proj.weight"
    if key in state and key in own and state[key].ndim == 4 and own[key].ndim == 5:
        t = own[key].shape[2]
        state[key] = state[key].unsqueeze(2).repeat(1, 1, t, 1, 1) / t
        rep.inflated.append(key)


def _shared_to_block_tables(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], rep: LoadReport) -> None:
    shared = "encoder.rel_pos_bias.relative_position_bias_table"
    if shared not in state or shared in own:
        return
    blocks = [k for k in own if k.startswith("encoder.blocks.") and k.endswith(".attn.relative_position_bias_table")]
    if not blocks:
        return
    table = state.pop(shared)
    for k in blocks:
        state[k] = table.clone()
        rep.converted[k] = f"copy of the shared table {shared} (SimMIM remap_pretrained_keys_vit)"


def _rel_pos_tables(model: nn.Module, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
                    rep: LoadReport) -> None:
    """Relative position tables (R, heads) of another grid -> the model's grid (SimMIM
    remap_pretrained_keys_vit); a table whose head count differs stays a wrong-shape key."""
    for k in [k for k in state if k.endswith("relative_position_bias_table") and k in own]:
        src, dst = state[k], own[k]
        if src.shape == dst.shape or src.ndim != 2 or dst.ndim != 2 or src.shape[1] != dst.shape[1]:
            continue
        window = getattr(model.get_submodule(k.rsplit(".", 1)[0]), "window_size", None)
        if window is None or window[0] != window[1]:
            raise WeightsError(f"{rep.source}: {k}: the model's relative position grid {window} is not square; "
                               f"the reference (SimMIM remap_pretrained_keys_vit) resizes square grids only")
        try:
            state[k] = interpolate_rel_pos_table(src, window[0])
        except ValueError as e:
            raise WeightsError(f"{rep.source}: {k}: {e}") from None
        side = (int(round((src.shape[0] - NUM_EXTRA_TOKENS) ** 0.5)) + 1) // 2
        rep.interpolated[k] = {"from_grid": [side, side], "to_grid": list(window)}
        why = (f"resized {side}x{side} -> {window[0]}x{window[1]} (geometric offsets, bicubic spline; "
               "SimMIM remap_pretrained_keys_vit)")
        rep.converted[k] = f"{rep.converted[k]}, then {why}" if k in rep.converted else why


def _qkv_bias(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], rep: LoadReport,
              unsupported: dict[str, tuple[str, str]]) -> None:
    prefixes = {k[: -len("attn.qkv.weight")] for k in own if k.endswith("attn.qkv.weight")}
    for p in prefixes:
        qkv, q, v = f"{p}attn.qkv.bias", f"{p}attn.q_bias", f"{p}attn.v_bias"
        if qkv in own and q in state and v in state and qkv not in state:
            state[qkv] = torch.cat([state.pop(q), torch.zeros_like(state[v]), state.pop(v)])
            rep.converted[qkv] = "q_bias, zero k bias, v_bias fused (BEiT / VideoMAE attention)"
        elif q in own and qkv in state and q not in state:
            bq, bk, bv = state.pop(qkv).chunk(3)
            if bool(bk.abs().max() > 0):
                unsupported[qkv] = ("a non-zero k bias: the model's attention has q/v biases only "
                                    "(qkv_bias='qv'); build it with qkv_bias='qkv'", "encoder")
                continue
            state[q], state[v] = bq, bv
            rep.converted[q] = rep.converted[v] = f"split from {qkv} (its k part is zero)"


def _model_grid(model: nn.Module) -> tuple[int, ...] | None:
    enc = getattr(model, "encoder", None)
    grid = getattr(enc, "grid_size", None)
    return tuple(grid) if grid is not None else None


def _source_grid(rows: int, model_grid: tuple[int, ...] | None, given: tuple[int, ...] | None,
                 key: str) -> tuple[int, ...]:
    """The grid of a stored table with ``rows`` patch rows: ``given`` when it fits, else the model's
    when it fits, else square (MAE's interpolate_pos_embed) per time slice of the model's T
    (VideoMAE run_class_finetuning.py)."""
    if given is not None:
        n = 1
        for g in given:
            n *= g
        if n != rows:
            raise WeightsError(f"{key}: the checkpoint's position table has {rows} rows, not the {n} of the "
                               f"pretraining grid {tuple(given)}; set model.init_img_size to the size it was "
                               f"trained at")
        return tuple(given)
    if model_grid is not None:
        n = 1
        for g in model_grid:
            n *= g
        if n == rows:
            return model_grid
    slices = model_grid[0] if model_grid is not None and len(model_grid) == 3 else 1
    side = int(round((rows / slices) ** 0.5))
    if side * side * slices != rows:
        raise WeightsError(f"{key}: cannot read a square grid from the checkpoint's {rows}-row position table "
                           f"({slices} time slices); set model.init_img_size")
    return (slices, side, side) if model_grid is not None and len(model_grid) == 3 else (side, side)


def _pos_kind(model: nn.Module) -> str:
    cfg = getattr(model, "cfg", None)
    return str(getattr(cfg, "pos_embed", "sincos"))


def _is_fixed_table(body: torch.Tensor, kind: str, grid: tuple[int, ...]) -> bool:
    """Whether a stored table (L, D) is the fixed sin-cos table of ``kind`` over ``grid``."""
    try:
        expected = pos_table(kind, body.shape[-1], grid)
    except ValueError:
        return False
    return expected.shape == body.shape and torch.allclose(body.float(), expected, atol=1e-4)


def _tables(model: nn.Module, tables: dict[str, PosTable], state: dict[str, torch.Tensor],
            own: dict[str, torch.Tensor], rep: LoadReport, unsupported: dict[str, tuple[str, str]],
            source_grid: tuple[int, ...] | None) -> None:
    enc = getattr(model, "encoder", None)
    grid = _model_grid(model)
    learned = "encoder.pos_embed" in own
    buffer = getattr(enc, "pos_embed", None)
    for name, t in tables.items():
        part = "encoder" if name.startswith("encoder.") else "other"
        body = t.table[:, t.num_prefix:]
        if t.num_prefix:
            _fold_cls_row(t, state, own, rep, unsupported, part)
        if name == "encoder.pos_embed":
            if learned:
                src_grid = _source_grid(body.shape[1], grid, source_grid, t.key)
                new = interpolate_pos_table(body.to(own[name].dtype), src_grid, grid)
                state[name] = new
                rep.pos_embed = {"table": "learned", "source": "checkpoint", "from_grid": list(src_grid),
                                 "to_grid": list(grid), "interpolated": src_grid != grid}
                if src_grid != grid:
                    rep.interpolated[name] = {"from_grid": list(src_grid), "to_grid": list(grid)}
            elif buffer is not None and any(_is_fixed_table(body[0], kind, g) for kind, g in
                                            _candidate_grids(body.shape[1], grid) if kind == _pos_kind(model)):
                rep.fixed.append(t.key)
            else:
                why = ("a learned position table; the model's table is its fixed sin-cos one "
                       "(a classifier takes it with model.pos_table=learned)") if buffer is not None \
                    else "a position table; the model has none (positions from rel_pos_bias only)"
                unsupported[t.key] = (why, part)
        else:
            dec_buffer = getattr(getattr(model, "decoder", None), "decoder_pos_embed", None)
            rows = body.shape[1]
            ok = dec_buffer is not None and (
                (dec_buffer.shape[1] == rows and torch.allclose(body.float(), dec_buffer.float(), atol=1e-4))
                or any(_is_fixed_table(body[0], kind, g) for kind, g in _candidate_grids(rows, grid)))
            if ok:
                rep.fixed.append(t.key)
            else:
                unsupported[t.key] = ("a decoder position table that is not the model's fixed sin-cos table", part)
    if learned and "encoder.pos_embed" not in tables:
        # mmmae's pretraining state stores no table: start from the sin-cos table it was trained with.
        src_grid = tuple(source_grid) if source_grid is not None else grid
        fresh = pos_table(_pos_kind(model), own["encoder.pos_embed"].shape[-1], src_grid).unsqueeze(0)
        state["encoder.pos_embed"] = interpolate_pos_table(fresh.to(own["encoder.pos_embed"].dtype), src_grid, grid)
        rep.converted["encoder.pos_embed"] = "the pretraining sin-cos table (the checkpoint stores none)"
        rep.pos_embed = {"table": "learned", "source": "pretraining sin-cos", "from_grid": list(src_grid),
                         "to_grid": list(grid), "interpolated": src_grid != grid}
        if src_grid != grid:
            rep.interpolated["encoder.pos_embed"] = {"from_grid": list(src_grid), "to_grid": list(grid)}
    if not rep.pos_embed and grid is not None:
        rep.pos_embed = {"table": "fixed" if buffer is not None else "none", "source": "model",
                         "from_grid": list(grid), "to_grid": list(grid), "interpolated": False}


def _candidate_grids(rows: int, grid: tuple[int, ...] | None) -> list[tuple[str, tuple[int, ...]]]:
    side = int(round(rows**0.5))
    out: list[tuple[str, tuple[int, ...]]] = [("sincos_1d", (rows,))]
    if side * side == rows:
        out.append(("sincos", (side, side)))
    if grid is not None and len(grid) == 3 and rows % grid[0] == 0:
        s = int(round((rows // grid[0]) ** 0.5))
        if s * s * grid[0] == rows:
            out.append(("sincos", (grid[0], s, s)))
    return out


def _fold_cls_row(t: PosTable, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], rep: LoadReport,
                  unsupported: dict[str, tuple[str, str]], part: str) -> None:
    row = t.table[:, : t.num_prefix]
    if not bool(row.abs().max() > 0):
        return  # MAE's sin-cos tables have a zero [cls] row: nothing to carry
    cls = "encoder.cls_token" if t.key.find("decoder") < 0 else None
    if cls is not None and cls in state and cls in own:
        state[cls] = state[cls] + row.reshape(state[cls].shape).to(state[cls].dtype)
        rep.converted[cls] = f"the [cls] row of {t.key} added (timm adds the table after prepending [cls])"
    else:
        unsupported[f"{t.key}[cls row]"] = ("a non-zero [cls] row of a position table, and no [cls] token to "
                                             "carry it", part)


def _resolve_part(model: nn.Module, part: str, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> str:
    if part != "auto":
        return part
    others = [k for k in own if not k.startswith("encoder.")]
    if all(k in state and state[k].shape == own[k].shape for k in others):
        return "all"
    return str(getattr(model, "init_part", "all"))


def _match(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], rep: LoadReport,
           unsupported: dict[str, tuple[str, str]]) -> dict[str, torch.Tensor]:
    encoder_only = rep.part == "encoder"
    to_load: dict[str, torch.Tensor] = {}
    for k, ref in own.items():
        in_part = not encoder_only or k.startswith("encoder.")
        if not in_part:
            rep.initialised.append(k)
            if k in state:
                rep.ignored[k] = (f"outside part=encoder (shape {tuple(state[k].shape)}"
                                  + (", the model's differs: dropped as MAE main_finetune.py drops a mismatched head)"
                                     if state[k].shape != ref.shape else ")"))
        elif k not in state:
            rep.missing.append(k)
        elif state[k].shape != ref.shape:
            rep.wrong_shape[k] = f"checkpoint {tuple(state[k].shape)} vs model {tuple(ref.shape)}"
        else:
            to_load[k] = state[k]
    for k in state:
        if k in own:
            continue
        if encoder_only and not k.startswith("encoder."):
            rep.ignored[k] = "outside part=encoder"
        elif encoder_only and k == "encoder.mask_token":
            rep.ignored[k] = "the pretraining mask token (fine-tuning models have none)"
        elif encoder_only and k in ("encoder.norm.weight", "encoder.norm.bias"):
            rep.ignored[k] = ("the pretraining encoder's final norm: mean pooling + fc_norm takes its place "
                              "(MAE main_finetune.py global_pool, VideoMAE use_mean_pooling)")
        else:
            rep.unexpected[k] = "no such weight in the model"
    for k, (why, part) in unsupported.items():
        if encoder_only and part != "encoder":
            rep.ignored[k] = why
        else:
            rep.unexpected[k] = why
    return to_load
