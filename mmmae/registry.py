"""MODELS: method name -> its spec (config dataclass, builder, inputs, mask maker, size recipe,
example batch, visualiser, batch transform).

A method registers once, and the engine and tools use only its spec and the model contract
(:class:`mmmae.heads.EncoderModel`: ``init_weights``, ``no_weight_decay``, ``set_grad_checkpointing``,
``weight_adapter``, ``learned_pos``, an ``encoder``); encoder sizes are data (``configs/sizes/*.yaml``) and describe the encoder
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
# The batch keys of each input kind (a batch of a mixed source holds one or both of its keys).
KIND_KEYS = {"image": ("image",), "video": ("video",), "image_text": ("image", "text"),
             "video_image": ("video", "image"), "omni": ("video", "image")}

# Example batch: (cfg, batch_size, generator) -> the method's input keys (random tensors of the right
# shapes); :meth:`MethodSpec.example` adds the method's masks.
ExampleBatch = Callable[[Any, int, torch.Generator], dict[str, torch.Tensor]]
# Visualiser: (model, batch, out, *, mean, std) -> the four views of ``mmmae.visualize.VIEWS`` (images
# (B, 3, H, W) or videos (B, 3, T, H, W) in [0, 1]), or None where this output is not pixels.
Visualize = Callable[..., "dict[str, torch.Tensor] | None"]
# Batch transform for training: (train cfg, model cfg) -> a function batch -> batch applied on the device
# before the forward (e.g. the classifier's mixup / cutmix), or None.
BatchTransform = Callable[[Any, Any], "Callable[[dict[str, Any]], dict[str, Any]] | None"]


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
    # The method's inputs for a contract test or a benchmark; default: random pixels for the input kind.
    example_batch: ExampleBatch | None = None
    # Reconstruction pictures (training pictures, tools/visualize.py); None: the method draws none.
    visualize: Visualize | None = None
    batch_transform: BatchTransform | None = None

    def input_keys(self, cfg: Any) -> tuple[str, ...]:
        """The batch keys of the inputs the method reads with ``cfg`` (e.g. ``("video", "image")``)."""
        return tuple(dict.fromkeys(k for kind in self.takes(cfg) for k in KIND_KEYS[kind]))

    def example(self, cfg: Any, batch_size: int = 2, generator: torch.Generator | None = None
                ) -> dict[str, torch.Tensor]:
        """A valid random batch for ``cfg`` on the CPU: the inputs (:attr:`example_batch`, else random
        pixels of the first input kind) and the masks the data pipeline would add."""
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        batch = dict((self.example_batch or _pixel_example(self))(cfg, batch_size, g))
        if self.make_mask_fn is not None and not any(k.endswith("mask") for k in batch):
            main = next(k for k in ("video", "image", "text") if k in batch)
            batch.update(self.make_mask_fn(cfg)(batch_size, g, modality=main))
        return batch

    def batch_counts(self, cfg: Any, batch: dict[str, Any], out: dict[str, Any], tokens_per_sample: int
                     ) -> tuple[int, int]:
        """(samples, tokens) a training batch holds, for throughput: samples of the first input key
        present; tokens are the (B, L) mask's positions (else ``tokens_per_sample`` per sample) plus
        the text positions."""
        keys = [k for k in self.input_keys(cfg) if torch.is_tensor(batch.get(k))]
        if not keys:
            return 0, 0
        samples = int(batch[keys[0]].shape[0])
        mask = out.get("mask")
        tokens = mask.numel() if torch.is_tensor(mask) and mask.ndim == 2 else tokens_per_sample * samples
        if "text" in keys:
            tokens += batch["text"].numel()
        return samples, tokens


def _pixel_example(spec: MethodSpec) -> ExampleBatch:
    """Random normalised pixels for each pixel key of the method's first input kind: images
    (B, C, S, S), videos (B, C, T, S, S) with the config's ``in_chans``, ``img_size``, ``num_frames``."""
    def make(cfg: Any, batch_size: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        s, c = cfg.img_size, cfg.in_chans
        shapes = {"image": (batch_size, c, s, s), "video": (batch_size, c, cfg.num_frames, s, s)}
        return {k: torch.randn(*shapes[k], generator=g) for k in KIND_KEYS[spec.takes(cfg)[0]] if k in shapes}
    return make


MODELS: dict[str, MethodSpec] = {}


@dataclass(frozen=True)
class _Fixed:
    """``takes`` for a method that reads the same input kinds with any config."""
    kinds: tuple[str, ...]

    def __call__(self, cfg: Any) -> tuple[str, ...]:
        return self.kinds


def register_model(name: str, cfg_cls: type, make_mask_fn: Callable[[Any], MaskFn] | None = None, *,
                   takes: tuple[str, ...] | Takes, size_recipe: dict[str, dict[str, Any]] | None = None,
                   example_batch: ExampleBatch | None = None, visualize: Visualize | None = None,
                   batch_transform: BatchTransform | None = None
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
        reads: Takes = takes if callable(takes) else _Fixed(tuple(takes))
        MODELS[name] = MethodSpec(name, cfg_cls, build, reads, make_mask_fn, dict(size_recipe or {}),
                                  example_batch, visualize, batch_transform)
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
    from mmmae.heads import EncoderModel
    if not isinstance(model, EncoderModel):
        raise TypeError(f"model {name!r}: its builder returned a {type(model).__name__}; a registered method "
                        f"builds an mmmae.heads.EncoderModel (the model contract)")
    if init:
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
        if hasattr(m, "reset_parameters"):  # torch's own layers (Linear, LayerNorm, ...) have it, others not
            m.reset_parameters()
    model.init_weights()
    reset_fixed_buffers(model)
    return model


def create_model(name: str, size: str | None = None, *, device: str | torch.device | None = None,
                 **overrides: Any) -> nn.Module:
    """Build a registered model: ``create_model("mae", size="vit_base", mask_ratio=0.9)``;
    ``device="meta"`` builds it without memory (see :func:`materialize`)."""
    return build_from_cfg(name, resolve_model_cfg(name, size, **overrides), device=device)
