"""Typed training configuration, merged once: dataclass schemas, strict YAML loading, dotted overrides, dump.

Precedence: dataclass defaults < ``--config`` YAML (and the YAML it names as ``base``) < ``key=value``
overrides. :func:`load_config` reads ``model.name`` and ``data.dataset`` first, then builds one
structured config from that method's config class (mmmae.registry) and that source's data class
(mmmae.data.registry), so every key is checked against what applies before any work starts: a key
the method or source lacks is an error naming the dotted key and the nearest valid one; a wrong type
is an error naming the key; a source whose input the method does not take is an error naming both.
A value both sides need (frames, text length, image size) lives once, in ``model``. The ``ds``
block is DeepSpeed's config, passed through (fields the training config owns must agree with it).
The loaded config is read-only; derived values (effective lr, DeepSpeed batch fields) come from
functions, never from writing back.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmmae.data.registry import get_source, list_sources, views_per_item
from mmmae.registry import get_spec, resolve_model_cfg


class ConfigError(ValueError):
    """A config problem, with the dotted key and what was expected."""


# Keys that moved when each value came to be given once.
MOVED_KEYS = {"data.num_frames": "model.num_frames", "text.max_len": "model.max_len",
              "text.tokenizer": "model.tokenizer", "train.label_smoothing": "model.label_smoothing"}


@dataclass
class OptimCfg:
    blr: float = 1.5e-4  # base lr; effective lr = blr * global batch / 256
    lr: float = 0.0  # absolute lr; overrides blr when > 0
    lr_counts_repeats: bool = False  # the lr's batch counts data.num_samples views (the references do not)
    min_lr: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.05
    warmup_epochs: float = 40.0
    warmup_steps: int = -1  # >= 0 overrides warmup_epochs
    layer_decay: float = 1.0  # < 1 for fine-tuning (layer-wise lr decay)
    clip_grad: float = 0.0
    fused: bool = True  # torch's fused AdamW kernel (CPU and CUDA)


@dataclass
class LoopCfg:
    epochs: int = 800
    max_steps: int = 0  # > 0 stops after this many optimizer steps, overriding epochs
    stop_at_step: int = 0  # > 0 ends this invocation at that step with a checkpoint, keeping the
    # schedule of max_steps / epochs (as a preemption would); resume=auto continues the run
    accum_steps: int = 1
    seed: int = 0
    precision: str = "auto"  # auto (bf16 where supported), bf16 (autocast), bf16_weights, fp16, fp32
    log_every: int = 10
    ckpt_every: int = 1000  # optimizer steps between checkpoints (and one at the end)
    keep_last: int = 2
    vis_every: int = 0  # pictures of reconstructions every N steps (0: only at the end)
    max_nonfinite: int = 5  # consecutive non-finite losses before the run stops
    grad_checkpointing: bool = False
    compile: bool = False
    progress: bool = True
    mixup: float = 0.0  # fine-tuning: mixup and cutmix alpha (timm's Mixup; smoothing is model.label_smoothing)
    cutmix: float = 0.0


@dataclass
class TrainCfg:
    output_dir: str = "runs/default"
    resume: str = ""  # "" (fresh), "auto" (latest complete checkpoint in output_dir) or a path
    init_from: str = ""  # weights to start from, any layout mmmae.weights reads (run, DeepSpeed, official, timm, HF)
    init_strict: bool = True  # false: load what fits init_from and report the rest (missing / unexpected keys)
    init_part: str = "auto"  # auto (classifiers: the encoder; pretraining models: all), all, or encoder
    # The method's config class (mmmae.registry) plus ``name`` and ``size``, and the source's data
    # class (mmmae.data.registry), chosen by model.name and data.dataset when the config is loaded.
    model: Any = None
    data: Any = None
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: LoopCfg = field(default_factory=LoopCfg)
    ds: dict = field(default_factory=lambda: {"zero_optimization": {"stage": 0}})


DEFAULT_METHOD, DEFAULT_SOURCE = "mae", "synthetic"


def find_config(name: str) -> Path:
    """A path, or a file name looked up among the packaged configs (``image_mae.yaml`` works anywhere)."""
    p = Path(name)
    if p.is_file():
        return p
    packaged = resources.files("mmmae.configs")
    for cand in (name, f"{name}.yaml"):
        q = packaged.joinpath(cand)
        if q.is_file():
            return Path(str(q))
    available = sorted(x.name for x in packaged.iterdir() if x.name.endswith(".yaml"))
    near = difflib.get_close_matches(name, available, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise FileNotFoundError(f"config {name!r} is neither a file nor a packaged config{hint} "
                            f"(packaged: {', '.join(available)})")


def _block_name(node: Any, block: str, key: str) -> Any:
    sub = node.get(block) if isinstance(node, DictConfig) else None
    return sub.get(key) if isinstance(sub, DictConfig) else None


def _load_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """Load a YAML; a top-level ``base: other.yaml`` is loaded first and this file merged over it.
    A file that names another method (``model.name``) starts its model block afresh, and one that
    names another source (``data.dataset``) keeps only the base's data fields that source has: the
    other method's or source's fields would not fit."""
    if path.resolve() in seen:
        raise ConfigError(f"config inheritance loops through {path}")
    node = OmegaConf.load(path)
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: a config must be a mapping at the top level")
    base = node.pop("base", None)
    if base is None:
        return node
    base_path = (path.parent / base) if (path.parent / base).is_file() else find_config(base)
    parent = _load_yaml_chain(base_path, seen + (path.resolve(),))
    name = _block_name(node, "model", "name")
    if name and _block_name(parent, "model", "name") != name:
        parent.pop("model")
    dataset = _block_name(node, "data", "dataset")
    if dataset and (_block_name(parent, "data", "dataset") or DEFAULT_SOURCE) != dataset:
        try:
            fits = {f.name for f in dataclasses.fields(get_source(dataset).cfg_cls)}
        except KeyError as e:
            raise ConfigError(f"{path}: data.dataset: {e.args[0]}") from None
        parent.data = {k: v for k, v in parent.data.items() if k in fits}
    return OmegaConf.merge(parent, node)  # type: ignore[return-value]


def _unknown(dotted: str, valid: Sequence[str], prefix: str, where: str = "") -> ConfigError:
    if dotted in MOVED_KEYS:
        return ConfigError(f"config key {dotted!r} is now {MOVED_KEYS[dotted]!r} (each value is given once)")
    near = difflib.get_close_matches(dotted.rsplit(".", 1)[-1], list(valid), n=1)
    hint = f"; did you mean {prefix}{near[0]}?" if near else ""
    return ConfigError(f"unknown config key {dotted!r}{where}{hint}")


def _check_keys(node: Any, schema: type, prefix: str, where: str = "") -> None:
    """Reject keys the schema lacks, naming the dotted key and the nearest valid key."""
    if not isinstance(node, (dict, DictConfig)):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node:
        dotted = f"{prefix}{key}"
        if key not in fields:
            if isinstance(node[key], (dict, DictConfig)):  # a block that moved: name its first key's new home
                dotted = next((f"{dotted}.{k}" for k in node[key] if f"{dotted}.{k}" in MOVED_KEYS), dotted)
            raise _unknown(dotted, list(fields), prefix, where)
        sub = next((t for t in (OptimCfg, LoopCfg) if t.__name__ == str(fields[key].type)), None)
        if sub is not None:
            _check_keys(node[key], sub, f"{dotted}.")


@functools.cache
def _model_block_cls(cfg_cls: type) -> type:
    """The ``model`` block's schema: the method's config class plus ``name`` and ``size``."""
    return dataclasses.make_dataclass(f"{cfg_cls.__name__}Block", [("name", str, ""), ("size", str, "")],
                                      bases=(cfg_cls,))


def _model_node(layers: list[DictConfig]) -> DictConfig:
    """The merged ``model`` blocks, resolved once (defaults < size preset < method recipe < values)."""
    blocks = [OmegaConf.to_container(layer.model, resolve=True) for layer in layers
              if isinstance(layer.get("model"), DictConfig)]
    values: dict[str, Any] = {}
    for b in blocks:
        values.update(b)  # type: ignore[arg-type]
    name = values.pop("name", None) or DEFAULT_METHOD
    size = values.pop("size", None) or ""
    try:
        spec = get_spec(name)
    except KeyError as e:
        raise ConfigError(f"model.name: {e.args[0]}") from None
    fields = [f.name for f in dataclasses.fields(spec.cfg_cls)]
    for key in values:
        if key not in fields:
            raise _unknown(f"model.{key}", fields, "model.", f" (method {name!r})")
    try:
        resolved = resolve_model_cfg(name, size or None, **values)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"model block: {e.args[0] if isinstance(e, KeyError) else e}") from None
    block = _model_block_cls(spec.cfg_cls)(name=name, size=size, **dataclasses.asdict(resolved))
    return OmegaConf.structured(block)


def _data_node(layers: list[DictConfig]) -> DictConfig:
    """The merged ``data`` blocks on the chosen source's schema."""
    blocks = [layer.data for layer in layers if isinstance(layer.get("data"), DictConfig)]
    name = next((b.dataset for b in reversed(blocks) if b.get("dataset")), DEFAULT_SOURCE)
    try:
        source = get_source(name)
    except KeyError as e:
        raise ConfigError(f"data.dataset: {e.args[0]}") from None
    for b in blocks:
        _check_keys(b, source.cfg_cls, "data.", f" (data.dataset {name!r})")
    try:
        return OmegaConf.merge(OmegaConf.structured(source.cfg_cls), *blocks)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid value for config key 'data.{getattr(e, 'key', None)}': "
                          f"{str(e).splitlines()[0]}") from None


def check_input(method: str, mcfg: Any, dataset: str) -> None:
    """The source must yield what the method takes (e.g. ``mae`` reads images, not videos)."""
    takes = get_spec(method).takes(mcfg)
    gives = get_source(dataset).provides
    if gives not in takes:
        fits = [n for n in list_sources() if get_source(n).provides in takes]
        raise ConfigError(f"model {method!r} takes {' or '.join(takes)} input, but data.dataset={dataset!r} yields "
                          f"{gives}; sources that fit: {', '.join(fits) or 'none'}")


def load_config(config: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults < YAML < ``key=value`` overrides -> a read-only, validated DictConfig."""
    layers: list[DictConfig] = []
    if config:
        layers.append(_load_yaml_chain(find_config(str(config))))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    if overrides:
        # `key=` (nothing after =) means an empty string for string keys (e.g. init_from= to clear it);
        # OmegaConf would read it as null, which a str field rejects.
        layers.append(OmegaConf.from_dotlist([o + "''" if o.endswith("=") else o for o in overrides]))
    for layer in layers:
        _check_keys({k: v for k, v in layer.items() if k not in ("model", "data")}, TrainCfg, "")
    model, data = _model_node(layers), _data_node(layers)
    rest = [OmegaConf.masked_copy(layer, [k for k in layer if k not in ("model", "data")]) for layer in layers]
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(TrainCfg), *rest)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"invalid value for config key {key!r}: {str(e).splitlines()[0]}") from None
    cfg.model, cfg.data = model, data
    check_input(model.name, model_cfg(model), data.dataset)
    OmegaConf.set_readonly(cfg, True)
    OmegaConf.set_struct(cfg, True)
    return cfg  # type: ignore[return-value]


def load_config_or_exit(config: str | Path | None, overrides: Sequence[str] = ()) -> DictConfig:
    """For command-line tools: :func:`load_config`, or the error on stderr and exit status 2."""
    try:
        return load_config(config, overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def model_cfg(model: Any) -> Any:
    """The method's config dataclass from a ``model`` block (``name``, optional ``size``, fields)."""
    block = dict(OmegaConf.to_container(model, resolve=True) if isinstance(model, DictConfig) else model)
    name = block.pop("name", None)
    if not name:
        raise ConfigError("the model block needs a name (model.name), e.g. mae")
    size = block.pop("size", None) or None
    try:
        get_spec(name)
    except KeyError as e:
        raise ConfigError(f"model.name: {e.args[0]}") from None
    try:
        return resolve_model_cfg(name, size, **block)
    except KeyError as e:
        raise ConfigError(f"model block: {e.args[0]}".replace("unknown key '", "unknown key 'model.")) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model block: {e}") from None


def dump_config(cfg: DictConfig, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(cfg, resolve=True))


def global_batch_size(cfg: DictConfig, world_size: int, accum_steps: int | None = None) -> int:
    """Samples per optimizer step: items per batch x repeated views x accumulation x processes
    (``accum_steps`` replaces ``train.accum_steps`` when a resume on another world size adjusts it)."""
    accum = cfg.train.accum_steps if accum_steps is None else accum_steps
    return cfg.data.batch_size * views_per_item(cfg.data) * accum * world_size


def effective_lr(cfg: DictConfig, world_size: int, accum_steps: int | None = None) -> float:
    """MAE's linear scaling rule: lr = blr x batch / 256 (unless an absolute lr is given).

    The batch counts loader items x accumulation x processes, as the references do (MAE and MAE-ST
    ``eff_batch_size = batch_size * accum_iter * world_size``; VideoMAE / VideoMAEv2 ``batch_size *
    num_tasks`` with ``--num_sample`` views per item not counted). ``optim.lr_counts_repeats=true``
    counts the repeated views too."""
    if cfg.optim.lr > 0:
        return float(cfg.optim.lr)
    batch = global_batch_size(cfg, world_size, accum_steps)
    if not cfg.optim.lr_counts_repeats:
        batch //= views_per_item(cfg.data)
    return float(cfg.optim.blr) * batch / 256
