"""Crash-safe checkpoints in ``output_dir/checkpoints``.

Each checkpoint is written under a ``*.tmp`` name, and only after every rank has finished writing does
rank 0 drop a ``COMPLETE`` marker (written to a temp file and renamed) and rename the folder to its
final ``step_XXXXXXXX`` name. Renames are atomic, so a ``kill -9`` at any moment leaves either a
complete checkpoint or a ``.tmp`` folder that ``resume=auto`` ignores (and the next save clears).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from mmmae.engine import dist as D

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
MARKER = "COMPLETE"
TRAIN_STATE = "train_state.json"
# Fault drills: seconds to wait between writing a checkpoint's files and publishing it, which opens a
# window in which a kill leaves a written but unpublished (".tmp") checkpoint.
PUBLISH_DELAY_ENV = "MMMAE_CKPT_PUBLISH_DELAY_S"


def ckpt_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = ckpt_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); the previous one is untouched."""


def resume_candidates(resume: str, output_dir: str | Path) -> list[Path]:
    """Checkpoints to try, in order: for ``auto`` every complete one, newest first (a newest one that
    turns out unreadable falls back to the one before); for a path just that folder."""
    if resume == "auto":
        return complete_checkpoints(output_dir)[::-1]
    found = resolve_resume(resume, output_dir)
    return [found] if found is not None else []


def read_train_state(path: Path) -> dict[str, Any] | None:
    """The loop state a checkpoint was written with (step, epoch, world size, global batch), or None
    for a checkpoint without it."""
    f = Path(path) / TRAIN_STATE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return None


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """``""`` -> None; ``auto`` -> the latest complete checkpoint (or None); else a checkpoint folder."""
    if not resume:
        return None
    if resume == "auto":
        ckpts = complete_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    p = Path(resume)
    if not (p / MARKER).is_file():
        raise FileNotFoundError(f"resume={resume!r} is not a complete checkpoint folder (no {MARKER} marker)")
    return p


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(engine: Any, output_dir: str | Path, step: int, client_state: dict[str, Any],
                    keep_last: int) -> Path:
    """Write a DeepSpeed checkpoint for ``step`` on every rank, then publish it atomically."""
    root = ckpt_root(output_dir)
    name = f"step_{step:08d}"
    tmp_tag = f"{name}.tmp"
    if D.is_main():
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    D.barrier()
    # Each rank's RNG state travels in its own file: resumed dropout / drop-path draws continue exactly.
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    error = ""
    try:
        engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False)
        torch.save(rng, root / tmp_tag / f"rng_rank{D.rank()}.pt")
    except OSError as e:
        error = f"rank {D.rank()}: {e}"
    # Every rank learns of a failed write (no rank is left waiting at the barrier below).
    if D.all_reduce_max(1.0 if error else 0.0)[0]:
        previous = complete_checkpoints(output_dir)
        keep = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointWriteError(f"could not write checkpoint {root / tmp_tag} ({error or 'failed on another rank'}); "
                                   f"{keep}; the unfinished {tmp_tag} is ignored by resume=auto")
    delay = float(os.environ.get(PUBLISH_DELAY_ENV) or 0)
    if delay > 0:
        time.sleep(delay)
    D.barrier()
    final = root / name
    if D.is_main():
        # The loop's position, readable before the engine exists (a resume on another world size
        # needs it to set up accumulation).
        _write_atomic(root / tmp_tag / TRAIN_STATE, json.dumps(client_state, default=str))
        _write_atomic(root / tmp_tag / MARKER, json.dumps({"step": step}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(root / tmp_tag, final)
        for old in complete_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    D.barrier()
    return final


UNIVERSAL = "universal"  # the world-size-free copy of a ZeRO checkpoint, inside its folder


def to_universal(path: Path) -> Path:
    """DeepSpeed's universal form of a ZeRO 1-3 checkpoint (``ds_to_universal``: the optimizer state
    per parameter instead of per rank), written once into ``path/universal`` (temp name, then rename),
    so the checkpoint resumes on any number of processes. Call on one rank."""
    out = path / UNIVERSAL
    if (out / MARKER).is_file():
        return out
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
    tmp = path / f"{UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ds_to_universal(Namespace(input_folder=str(path), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
    _write_atomic(tmp / MARKER, json.dumps({"from": path.name}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def load_checkpoint(engine: Any, path: Path, *, universal: bool = False) -> dict[str, Any]:
    """Load a published checkpoint into the engine (model, optimizer, scheduler state) and restore
    this rank's RNG state; returns the client state saved with it. ``universal`` loads the checkpoint's
    universal form (a resume on another number of processes)."""
    if universal:
        _, client_state = engine.load_checkpoint(str(path), tag=UNIVERSAL, load_module_strict=True)
        if engine.zero_optimization_stage() == 3:
            _repair_zero3_universal_load(engine, path / UNIVERSAL)
        if client_state is None or "step" not in client_state:
            client_state = read_train_state(path)
    else:
        _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True)
    if client_state is None:
        raise RuntimeError(f"could not load checkpoint {path}")
    rng_file = path / f"rng_rank{D.rank()}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return client_state


def _repair_zero3_universal_load(engine: Any, folder: Path) -> None:
    """Undo two slips of DeepSpeed 0.19's ZeRO-3 universal load (``stage3.py``,
    ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``); the weights and Adam moments it loads
    are exact.

    - It copies the hyperparameters of parameter group 0 onto every group: the no-decay group (biases,
      norms, tokens) resumed with group 0's weight decay, and layer-wise lr scales were lost.
    - It gives every sub-group the same ``step`` tensor. ZeRO-3 steps the sub-groups one at a time and
      torch's AdamW increments ``step`` in place, so with two groups the count rose by 2 per update
      and the bias correction ran ahead.

    Measured on a 1 -> 2 resume at step 4 (tiny MAE, fp32): the loss left the uninterrupted run by
    7e-5 at step 6 and 1.5e-3 at step 8; with only the groups restored still 1.5e-3, with only the
    steps 4.6e-5; with both 1e-7.

    Both are restored from the universal folder's ``zero/optimizer_state.pt``, which holds the saved
    optimizer's groups as written."""
    saved = torch.load(folder / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    groups = saved.get("param_groups") or saved["optimizer_state_dict"]["param_groups"]
    zero_opt = engine.optimizer
    base = zero_opt.optimizer
    if len(groups) != len(base.param_groups):
        raise RuntimeError(f"{folder}: the checkpoint has {len(groups)} optimizer parameter groups, this model "
                           f"{len(base.param_groups)}")
    for group, was in zip(base.param_groups, groups):
        for key, value in was.items():
            if key != "params":
                group[key] = value
    steps = {float(s["step"]) for s in saved["optimizer_state_dict"]["state"].values() if "step" in s}
    if len(steps) > 1:
        raise RuntimeError(f"{folder}: the optimizer's parameter groups were saved at different steps {sorted(steps)}")
    for flat in zero_opt.fp32_partitioned_groups_flat:
        state = base.state.get(flat)
        if state and "step" in state:
            step = state["step"]
            state["step"] = step.detach().clone() if torch.is_tensor(step) else step


def load_first_readable(engine: Any, candidates: list[Path], *, universal: bool = False
                        ) -> tuple[Path, dict[str, Any]] | None:
    """Load the first candidate every rank can read; an unreadable one (a truncated or corrupt file)
    is named in a warning and the next is tried. None when there is no candidate; an error naming
    each one when none loads."""
    failures: list[str] = []
    for path in candidates:
        error = ""
        try:
            state = load_checkpoint(engine, path, universal=universal)
        except Exception as e:  # torch / DeepSpeed raise many kinds for a damaged file
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if not D.all_reduce_max(1.0 if error else 0.0)[0]:
            return path, state
        failures.append(f"{path} ({error or 'unreadable on another rank'})")
        log.warning("checkpoint %s is unreadable (%s); trying the previous complete one", path,
                    error or "on another rank")
    if failures:
        raise RuntimeError("no checkpoint could be loaded: " + "; ".join(failures))
    return None


def consolidated_state_dict(engine: Any, last_ckpt: Path | None) -> dict[str, torch.Tensor] | None:
    """Full fp32 model weights on rank 0 (None elsewhere), also under ZeRO-3.

    For ZeRO stages 1-3 the fp32 master weights are rebuilt from the last checkpoint's partitions
    (DeepSpeed's zero_to_fp32); for stage 0 the module's own weights are used (cast to fp32).
    """
    stage = engine.zero_optimization_stage()
    state: dict[str, torch.Tensor] | None = None
    if stage >= 1 and last_ckpt is not None:
        D.barrier()
        if D.is_main():
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            state = get_fp32_state_dict_from_zero_checkpoint(str(last_ckpt.parent), tag=last_ckpt.name)
        D.barrier()
    elif stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            if D.is_main():
                state = {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
    elif D.is_main():
        state = {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
    if state is not None:
        # Fixed buffers (position tables) are not weights; keep only what load_state_dict expects.
        state = {k: v.float().contiguous() for k, v in state.items()}
    return state


def save_safetensors(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write a safetensors file atomically (temp name, fsync, rename)."""
    from safetensors.torch import save_file
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
