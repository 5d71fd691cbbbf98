"""Reading weights from wherever they were released or written: one function, :func:`read_source`.

Sources: a state dict already in memory; a file (``.safetensors``, or a torch pickle ``.pth`` / ``.pt``
/ ``.bin`` / ``.ckpt``); a Hugging Face directory (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``, sharded or not); an mmmae run directory (``model.safetensors``); a DeepSpeed
checkpoint folder (``checkpoints/step_*`` with ``*mp_rank_00_model_states.pt``), or the run directory
holding those folders (its newest complete one). The usual wrappers of released files are unwrapped:
``model`` / ``module`` / ``state_dict`` nesting (MAE, VideoMAE and VideoMAEv2 save ``{"model": ...}``;
VideoMAEv2 ``run_class_finetuning.py --model_key model|module``) and the ``module.`` (DDP) and
``_orig_mod.`` (torch.compile) key prefixes.

DeepSpeed folders are read here, not through ``mmmae.engine`` (the core never imports the engine):
with ZeRO partitions present (``*_optim_states.pt``, stages 1-3) the fp32 master weights are rebuilt
with DeepSpeed's ``zero_to_fp32`` (what ``mmmae.engine.checkpoint.consolidated_state_dict`` does after
training); a stage-0 folder holds the whole module in ``mp_rank_00_model_states.pt``.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
_WRAPPERS = ("model", "module", "state_dict", "model_state")
_KEY_PREFIXES = ("module.", "_orig_mod.")
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class Source:
    """A state dict and where it came from: ``kind`` is one of state_dict, file, hf_dir, run_dir,
    deepspeed; ``path`` the file or folder read (None for a state dict); ``hf_config`` the Hugging Face
    ``config.json`` of an HF directory."""

    state: dict[str, torch.Tensor]
    kind: str
    path: Path | None = None
    hf_config: dict[str, Any] = field(default_factory=dict)

    def name(self) -> str:
        return str(self.path) if self.path is not None else "<state dict>"


def read_source(source: str | Path | Mapping[str, torch.Tensor]) -> Source:
    """Read ``source`` (see the module docstring) -> :class:`Source` with a flat ``{name: tensor}``."""
    if isinstance(source, Mapping):
        return Source(unwrap(dict(source), "<state dict>"), "state_dict")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _read_dir(path)
    return Source(unwrap(read_file(path), str(path)), "file", path)


def read_file(path: Path) -> dict[str, Any]:
    """One checkpoint file, as stored (wrappers not yet removed)."""
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file
        return load_file(str(path))
    if suffix not in TORCH_SUFFIXES:
        raise ValueError(f"{path}: unknown checkpoint file type {suffix!r}; readable are {SAFETENSORS_SUFFIX} "
                         f"and torch files ({', '.join(TORCH_SUFFIXES)}), or a Hugging Face / run / DeepSpeed folder")
    try:
        # Released MAE / VideoMAE files keep their argparse Namespace of arguments beside the weights:
        # allowed explicitly, everything else stays under torch's weights-only unpickler.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError / RuntimeError for foreign objects and bad files
        raise ValueError(f"{path}: cannot be read as a weights-only torch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None


def unwrap(state: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """Remove the ``model`` / ``module`` / ``state_dict`` nesting and the ``module.`` / ``_orig_mod.``
    key prefixes; keep the tensors."""
    for _ in range(3):
        inner = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = dict(inner)
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    if not tensors:
        raise ValueError(f"{where}: no tensors found (top-level keys: {list(state)[:8]})")
    for prefix in _KEY_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def _read_dir(path: Path) -> Source:
    if (path / "config.json").is_file() and _hf_weight_files(path):
        state: dict[str, torch.Tensor] = {}
        for f in _hf_weight_files(path):
            state.update(unwrap(read_file(f), str(f)))
        return Source(state, "hf_dir", path, json.loads((path / "config.json").read_text()))
    if is_deepspeed_folder(path):
        return Source(read_deepspeed(path), "deepspeed", path)
    if (path / "model.safetensors").is_file():
        return Source(unwrap(read_file(path / "model.safetensors"), str(path)), "run_dir", path / "model.safetensors")
    steps = deepspeed_steps(path / "checkpoints" if (path / "checkpoints").is_dir() else path)
    if steps:
        return Source(read_deepspeed(steps[-1]), "deepspeed", steps[-1])
    raise FileNotFoundError(f"{path}: no weights found in this folder (looked for a Hugging Face config.json + "
                            "model.safetensors / pytorch_model.bin, a run's model.safetensors, a DeepSpeed "
                            "mp_rank_00_model_states.pt, or checkpoints/step_* folders)")


def _hf_weight_files(path: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            return [path / s for s in shards]
    return [path / f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).is_file()][:1]


def deepspeed_steps(root: Path) -> list[Path]:
    """Complete DeepSpeed checkpoint folders under ``root``: ``step_N`` with the ``COMPLETE`` marker
    mmmae's trainer publishes them with (mmmae.engine.checkpoint), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "COMPLETE").is_file()
             and is_deepspeed_folder(p)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def is_deepspeed_folder(path: Path) -> bool:
    """``mp_rank_00_model_states.pt`` (stages 0-2) or ``zero_pp_rank_N_mp_rank_00_model_states.pt`` (ZeRO-3)."""
    return any(path.glob("*mp_rank_00_model_states.pt"))


def read_deepspeed(folder: Path) -> dict[str, torch.Tensor]:
    """The model weights of one DeepSpeed checkpoint folder (fp32 masters when ZeRO partitions exist)."""
    if list(folder.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
        return {k: v.float().contiguous() for k, v in state.items()}
    file = folder / "mp_rank_00_model_states.pt"
    try:
        blob = torch.load(file, map_location="cpu", weights_only=True)
    except Exception:  # DeepSpeed stores its config and scheduler objects beside the module (a run's own file)
        blob = torch.load(file, map_location="cpu", weights_only=False)
    module = blob.get("module") if isinstance(blob, dict) else None
    if not isinstance(module, Mapping):
        raise ValueError(f"{file}: no 'module' state dict in this DeepSpeed file")
    return unwrap(dict(module), str(folder))
