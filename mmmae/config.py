"""Typed training configuration: dataclass schemas, strict YAML loading, dotted overrides, dump.

Precedence: dataclass defaults < ``--config`` YAML (and the YAML it names as ``base``) < ``key=value``
overrides. Every key is checked against the schema before any work starts: an unknown key is an error
naming the dotted key and the nearest valid one; a wrong type is an error naming the key. The
``model`` block is checked against the chosen method's own dataclass; the ``ds`` block is DeepSpeed's
config, passed through (DeepSpeed validates it). The loaded config is read-only; derived values
(effective lr, DeepSpeed batch fields) come from functions, never from writing back.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmmae.registry import get_spec, resolve_model_cfg


class ConfigError(ValueError):
    """A config problem, with the dotted key and what was expected."""


@dataclass
class DataCfg:
    # Which source to read; each method package registers its own (see mmmae.data.registry).
    dataset: str = "synthetic"
    root: str = ""  # images / videos folder, or the prefix for paths in the lists
    train_list: str = ""  # video annotation list ("path label" lines or CSV)
    val_list: str = ""
    class_list: str = ""  # one class name per line, for lists that name classes
    captions: str = ""  # caption file (COCO json, Karpathy json, CSV/JSONL, tar shards)
    images: str = ""  # image folder for the caption file
    val_captions: str = ""
    val_images: str = ""
    image_root: str = ""  # second stream for joint image+video methods (OmniMAE, BEVT)
    image_dataset: str = ""
    image_ratio: float = 0.5  # share of steps that draw the image stream in joint training
    backend: str = "auto"  # video decoding: auto (torchcodec > decord > pyav, the first usable) | torchcodec | decord | pyav
    decode_device: str = "cpu"  # cpu | cuda (GPU decoding, torchcodec only; needs data.num_workers=0)
    num_frames: int = 16
    sampling_rate: int = 4
    num_samples: int = 1  # repeated sampling: views per decoded video
    short_clip: str = "loop"  # clips shorter than the sampled span: loop or pad (clip_rule fit only)
    sampling: str = "auto"  # dense | segment (TSN-style) | auto: segment for an ssv2 classifier, else dense
    clip_rule: str = "videomae"  # dense clip placement: videomae (the reference's) | fit (mmmae's earlier rule)
    repeat_mode: str = "shared_window"  # num_samples views share frames (VideoMAE/v2) | independent (MAE-ST)
    num_clips: int = 5  # test views (temporal clips x spatial crops)
    num_crops: int = 3
    max_bad_fraction: float = 0.1
    batch_size: int = 8  # micro batch per process
    num_workers: int = 2
    limit: int = 0  # use only the first N items (debugging, tiny configs)
    hflip: bool = True
    min_scale: float = 0.2  # RandomResizedCrop lower scale
    rand_augment: str = ""  # fine-tuning: timm RandAugment spec, e.g. rand-m7-n4-mstd0.5-inc1 ("" = off)
    erase_prob: float = 0.0  # fine-tuning: random erasing probability per frame (VideoMAE: 0.25)
    caption_mode: str = "all"  # all: one pair per caption; random: one caption per image per epoch
    # Statistics the caption data's transform (captions source, retrieval, extraction) normalises
    # images with: cc12m, imagenet, none, or auto: cc12m for data.dataset=captions (m3ae_public
    # ImageTextDataset's default), imagenet for any other source (its ImageNet datasets' default)
    caption_image_norm: str = "auto"
    length: int = 256  # synthetic source size


@dataclass
class TextCfg:
    tokenizer: str = "openclip"
    max_len: int = 64


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
    model: dict = field(default_factory=lambda: {"name": "mae"})
    data: DataCfg = field(default_factory=DataCfg)
    text: TextCfg = field(default_factory=TextCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: LoopCfg = field(default_factory=LoopCfg)
    ds: dict = field(default_factory=lambda: {"zero_optimization": {"stage": 0}})


FREE_FORM = {"ds"}  # passed through to DeepSpeed


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


def _load_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """Load a YAML; a top-level ``base: other.yaml`` is loaded first and this file merged over it
    (the ``model`` block too, unless this file names a different ``model.name``)."""
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
    # A config that switches method (e.g. a classifier on top of a pretraining recipe) starts its
    # model block afresh: the other method's fields would not fit.
    child_name = node.get("model", {}).get("name") if isinstance(node.get("model"), DictConfig) else None
    if child_name and parent.get("model") is not None and parent.model.get("name") != child_name:
        parent.pop("model")
    return OmegaConf.merge(parent, node)  # type: ignore[return-value]


def _check_keys(node: Any, schema: type, prefix: str) -> None:
    """Reject keys the schema lacks, naming the dotted key and the nearest valid key."""
    if not isinstance(node, (dict, DictConfig)):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node:
        dotted = f"{prefix}{key}"
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else ""
            raise ConfigError(f"unknown config key {dotted!r}{hint}")
        ftype = fields[key].type
        sub = next((t for t in (DataCfg, TextCfg, OptimCfg, LoopCfg) if t.__name__ == str(ftype)), None)
        if sub is not None:
            _check_keys(node[key], sub, f"{dotted}.")


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
        _check_keys(layer, TrainCfg, "")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(TrainCfg), *layers)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"invalid value for config key {key!r}: {str(e).splitlines()[0]}") from None
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(model, dict)
    model_cfg(model)  # validates the model block against the method's schema
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
    size = block.pop("size", None)
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
    return cfg.data.batch_size * max(cfg.data.num_samples, 1) * accum * world_size


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
        batch //= max(cfg.data.num_samples, 1)
    return float(cfg.optim.blr) * batch / 256
