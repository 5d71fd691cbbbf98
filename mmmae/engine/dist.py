"""Process-group setup that works under the deepspeed launcher, torchrun, and plain ``python``."""

from __future__ import annotations

import logging
import os
import socket

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_rendezvous_env() -> None:
    """Plain ``python tools/train.py`` has no launcher: describe a one-process group ourselves,
    otherwise DeepSpeed falls back to MPI discovery (and fails without mpi4py)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", "0")
        return
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def init_distributed() -> torch.device:
    """Initialise the process group once (gloo on CPU, nccl on GPU) and return this rank's device."""
    ensure_rendezvous_env()
    import deepspeed

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized() and world_size() > 1:
        dist.barrier()


def _collective_device() -> torch.device:
    """Where collective tensors must live: NCCL only reduces CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_weighted_mean(sums: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
    """Mean of each metric over every rank's observations: sum of sums / sum of counts.

    Ranks may hold different keys (a loss part only some steps produce): the union of keys is
    agreed first, so the collective always lines up.
    """
    keys = sorted(sums)
    if dist.is_initialized() and world_size() > 1:
        gathered: list[list[str]] = [[] for _ in range(world_size())]
        dist.all_gather_object(gathered, keys)
        keys = sorted({k for ks in gathered for k in ks})
        t = torch.tensor([float(sums.get(k, 0.0)) for k in keys] + [float(counts.get(k, 0)) for k in keys],
                         dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        s, c = t[: len(keys)].tolist(), t[len(keys):].tolist()
    else:
        s, c = [sums[k] for k in keys], [counts.get(k, 0) for k in keys]
    return {k: (sk / ck if ck else float("nan")) for k, sk, ck in zip(keys, s, c)}


def all_reduce_counts(counts: dict[str, int]) -> dict[str, int]:
    """Sum integer counters over ranks; ranks may hold different keys (an image batch counts
    ``skipped_images``, a video batch ``skipped_videos``): the union of keys is agreed first."""
    keys = sorted(counts)
    if not dist.is_initialized() or world_size() == 1:
        return {k: int(counts[k]) for k in keys}
    gathered: list[list[str]] = [[] for _ in range(world_size())]
    dist.all_gather_object(gathered, keys)
    keys = sorted({k for ks in gathered for k in ks})
    t = torch.tensor([int(counts.get(k, 0)) for k in keys], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t)
    return dict(zip(keys, (int(v) for v in t.tolist())))


def all_reduce_sum(value: float) -> float:
    if not dist.is_initialized() or world_size() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return float(t.item())


def broadcast_object(obj: object) -> object:
    if not dist.is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
