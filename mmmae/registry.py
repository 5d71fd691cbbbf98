"""MODELS: method name -> its spec (config dataclass, builder, mask maker, size recipe, inputs).

A method registers once, and the engine and tools use only its spec and the model contract
(:class:`mmmae.heads.EncoderModel`); encoder sizes are data (``configs/sizes/*.yaml``) and describe the encoder
only (``PRESET_KEYS``). What a size means for the rest of a method (VideoMAE's decoder narrows with the
encoder, MAE's does not) is that method's own ``size_recipe``. ``create_model(name, size=...,
**overrides)`` resolves defaults < size preset < the method's recipe for that size < overrides,
rejecting unknown keys with the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
from contextlib import nullcontext
from dataclasses import dataclass
from importlib import resources
from importlib.metadata import entry_points
from typing import Any, Callable

import torch
import yaml
from torch import nn

# Mask maker: fn(batch_size, generator, modality="image") -> {"mask": (B, L) bool, ...}; ``modality``
# ("image", "video" or "text") is the batch's main input, for methods that mix modalities (OmniMAE).
MaskFn = Callable[..., dict[str, torch.Tensor]]

# The only fields a size preset may set: the encoder's shape (timm names).
PRESET_KEYS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


# What a method reads, matched against what a data source yields (mmmae.data.registry.INPUT_KINDS).
Takes = Callable[[Any], tuple[str, ...]]
VIDEO_KINDS = {"video", "video_image", "omni"}  # the input kinds with frames


@dataclass(frozen=True)
class MethodSpec:
    name: str
    cfg_cls: type  # the model block's dataclass
    build: Callable[[Any], nn.Module]  # cfg -> a model meeting the contract of mmmae.heads.EncoderModel
    # The input kinds the method reads, given its config (a classifier reads videos when it has frames).
    takes: Takes
    # Makes the batch's masks in the data pipeline: (batch_size, generator) -> {"mask": (B, L) bool, ...}.
    make_mask_fn: Callable[[Any], MaskFn] | None = None
    # Size preset name -> the method's own fields for that encoder size (e.g. decoder widths).
    size_recipe: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


MODELS: dict[str, MethodSpec] = {}


def register_model(name: str, cfg_cls: type, make_mask_fn: Callable[[Any], MaskFn] | None = None, *,
                   takes: tuple[str, ...] | Takes, size_recipe: dict[str, dict[str, Any]] | None = None
                   ) -> Callable[[Callable[[Any], nn.Module]], Callable[[Any], nn.Module]]:
    """Register a method: ``@register_model("mae", MAECfg, mask_fn, takes=("image",))`` over its builder."""
    def deco(build: Callable[[Any], nn.Module]) -> Callable[[Any], nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        fields = {f.name for f in dataclasses.fields(cfg_cls)}
        for size, values in (size_recipe or {}).items():
            stray = sorted(set(values) - fields)
            if stray:
                raise ValueError(f"model {name!r}: size recipe {size!r} sets fields {cfg_cls.__name__} lacks: {stray}")
        reads: Takes = takes if callable(takes) else (lambda cfg, _t=tuple(takes): _t)
        MODELS[name] = MethodSpec(name, cfg_cls, build, reads, make_mask_fn, dict(size_recipe or {}))
        return build
    return deco


def _ensure_registered() -> None:
    """Import every installed method package once, which registers its models and datasets.

    Packages announce themselves through the ``mmmae.plugins`` entry-point group (see pyproject), so
    the core never imports a method package by name and third-party packages can add methods.
    """
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import mmmae.heads  # noqa: F401  (the classifier lives in the core)
    for ep in sorted(entry_points(group="mmmae.plugins"), key=lambda e: e.name):
        ep.load()


_LOADED = False


def list_models() -> list[str]:
    """Registered method names, sorted."""
    _ensure_registered()
    return sorted(MODELS)


def get_spec(name: str) -> MethodSpec:
    _ensure_registered()
    if name not in MODELS:
        near = difflib.get_close_matches(name, MODELS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise KeyError(f"unknown model {name!r}{hint}; registered models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def list_sizes() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("mmmae.configs").joinpath("sizes").iterdir()
                  if p.name.endswith(".yaml"))


def load_size(size: str) -> dict[str, Any]:
    """An encoder size preset: only ``PRESET_KEYS`` (a decoder or any method field is an error)."""
    path = resources.files("mmmae.configs").joinpath("sizes", f"{size}.yaml")
    if not path.is_file():
        near = difflib.get_close_matches(size, list_sizes(), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown size preset {size!r}{hint}; available: {', '.join(list_sizes())}")
    values = yaml.safe_load(path.read_text()) or {}
    stray = sorted(set(values) - set(PRESET_KEYS))
    if stray:
        raise ValueError(f"size preset {path}: {stray} are not encoder-shape keys; a preset may set only "
                         f"{', '.join(PRESET_KEYS)} (decoders belong to each method's size recipe)")
    return values


def unknown_key_error(key: str, valid: list[str], where: str) -> KeyError:
    near = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return KeyError(f"unknown key {key!r} in {where}{hint} (valid keys: {', '.join(sorted(valid))})")


def resolve_model_cfg(name: str, size: str | None = None, **overrides: Any) -> Any:
    """Build the method's config: dataclass defaults < size preset < the method's recipe for that
    size < overrides."""
    spec = get_spec(name)
    fields = {f.name: f for f in dataclasses.fields(spec.cfg_cls)}
    values: dict[str, Any] = {}
    if size:
        values.update(load_size(size))
        values.update(spec.size_recipe.get(size, {}))
    for k, v in overrides.items():
        if k not in fields:
            raise unknown_key_error(k, list(fields), f"model {name!r}")
        values[k] = v
    # A structured merge converts and type-checks the values (a string for an int field is an error).
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    try:
        merged = OmegaConf.merge(OmegaConf.structured(spec.cfg_cls), values)
    except OmegaConfBaseException as e:
        raise ValueError(f"model {name!r}, key {getattr(e, 'full_key', None)!r}: {str(e).splitlines()[0]}") from None
    cfg = OmegaConf.to_object(merged)
    frames = getattr(cfg, "num_frames", 0)
    if frames and not set(spec.takes(cfg)) & VIDEO_KINDS:
        # The methods that read videos when asked with these frames (a classifier reads videos with frames).
        video = [n for n, other in sorted(MODELS.items()) if set(other.takes(cfg)) & VIDEO_KINDS]
        raise ValueError(f"model {name!r} reads {' or '.join(spec.takes(cfg))} input, so num_frames={frames} does not "
                         f"apply (leave it 0); methods that read videos: {', '.join(video)}")
    return cfg


def build_from_cfg(name: str, cfg: Any, *, init: bool = True, device: str | torch.device | None = None) -> nn.Module:
    """Build a method from its config. ``device="meta"`` builds without memory or initialisation
    (for sharded or deferred construction); :func:`materialize` then makes it real."""
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            return get_spec(name).build(cfg)
    with torch.device(device) if device is not None else nullcontext():
        model = get_spec(name).build(cfg)
    if init and hasattr(model, "init_weights"):
        model.init_weights()
    return model


@torch.no_grad()
def materialize(model: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """Allocate a meta-device model on ``device`` and initialise it as construction would have:
    every layer's own ``reset_parameters`` (in construction order, so a seeded run draws the same
    numbers as an eager build), then the model's ``init_weights``, then its fixed buffers."""
    from mmmae.layers.fixed import reset_fixed_buffers
    model.to_empty(device=device)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    if hasattr(model, "init_weights"):
        model.init_weights()
    reset_fixed_buffers(model)
    return model


def create_model(name: str, size: str | None = None, *, device: str | torch.device | None = None,
                 **overrides: Any) -> nn.Module:
    """Build a registered model: ``create_model("mae", size="vit_base", mask_ratio=0.9)``;
    ``device="meta"`` builds it without memory (see :func:`materialize`)."""
    return build_from_cfg(name, resolve_model_cfg(name, size, **overrides), device=device)
