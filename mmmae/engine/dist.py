"""Process-group setup that works under the deepspeed launcher, torchrun, SLURM's ``srun`` and plain
``python``."""

from __future__ import annotations

import logging
import os
import re
import socket
from datetime import timedelta
from typing import Mapping, MutableMapping

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT_ENV = "MMMAE_COLLECTIVE_TIMEOUT_S"  # seconds; default 600


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LaunchError(RuntimeError):
    """The launch environment cannot describe a process group (named variables and values)."""


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: ``a[1-2,4],b`` -> ``["a[1-2,4]", "b"]``."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"SLURM host list {text!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise LaunchError(f"SLURM host list {text!r}: unbalanced '['")
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def _expand_range(spec: str, whole: str) -> list[str]:
    """``01-03,07`` -> ``["01", "02", "03", "07"]`` (zero padding kept from the range's start)."""
    out: list[str] = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise LaunchError(f"SLURM host list {whole!r}: cannot read range {item!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise LaunchError(f"SLURM host list {whole!r}: range {item!r} runs backwards")
        out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
    return out


def expand_hostlist(text: str) -> list[str]:
    """SLURM's compressed host list (``SLURM_JOB_NODELIST``) -> host names, in order, without
    ``scontrol``: ``gpu[01-03,07],login1`` -> gpu01, gpu02, gpu03, gpu07, login1; several bracket
    groups in one name expand as a product (``r[1-2]n[1-2]`` -> r1n1, r1n2, r2n1, r2n2)."""
    hosts: list[str] = []
    for part in _split_top_level(text):
        names = [""]
        for literal, rng in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", part):
            if not literal and not rng:
                continue
            choices = _expand_range(rng, text) if rng else [""]
            names = [n + literal + c for n in names for c in choices]
        hosts.extend(names)
    if not hosts:
        raise LaunchError(f"SLURM host list {text!r} names no host")
    return hosts


def _first_count(tasks_per_node: str) -> int:
    """``SLURM_TASKS_PER_NODE`` such as ``4(x2),3`` -> tasks on the first node (4)."""
    m = re.match(r"\s*(\d+)", tasks_per_node)
    if not m:
        raise LaunchError(f"SLURM_TASKS_PER_NODE={tasks_per_node!r} is not a task count")
    return int(m.group(1))


SLURM_PORT_BASE = 20000  # master port = base + SLURM_JOB_ID % 20000: every task of a job agrees on it


def slurm_rendezvous(env: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables for a task started by ``srun`` (one task per process):
    rank, local rank, world size, master address (the first host of the job's node list) and port
    (from the job id, unless MASTER_PORT is set)."""
    need = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    missing = [k for k in need if k not in env]
    if missing:
        raise LaunchError(f"SLURM environment without {', '.join(missing)}: start tasks with srun")
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist and "MASTER_ADDR" not in env:
        raise LaunchError("SLURM environment without SLURM_JOB_NODELIST and no MASTER_ADDR: cannot find the "
                          "rendezvous host")
    # srun describes its own step (SLURM_STEP_NUM_TASKS); SLURM_NTASKS is the allocation's.
    world = env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"]
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": world, "LOCAL_RANK": env["SLURM_LOCALID"],
           "MASTER_ADDR": env.get("MASTER_ADDR") or expand_hostlist(nodelist or "")[0]}
    tpn = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if tpn:
        out["LOCAL_WORLD_SIZE"] = str(_first_count(tpn))
    if "MASTER_PORT" in env:
        out["MASTER_PORT"] = env["MASTER_PORT"]
    elif "SLURM_JOB_ID" in env:
        out["MASTER_PORT"] = str(SLURM_PORT_BASE + int(env["SLURM_JOB_ID"]) % 20000)
    else:
        raise LaunchError("SLURM environment without SLURM_JOB_ID and no MASTER_PORT: the tasks cannot agree "
                          "on a rendezvous port")
    return out


def check_rendezvous(env: Mapping[str, str]) -> None:
    """Reject a launch that cannot form its group before any work: a rank outside the world, a local
    rank outside the node, a multi-process group without MASTER_ADDR / MASTER_PORT."""
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", "0"))
    except ValueError:
        raise LaunchError(f"RANK={env.get('RANK')!r}, WORLD_SIZE={env.get('WORLD_SIZE')!r}, "
                          f"LOCAL_RANK={env.get('LOCAL_RANK')!r} must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise LaunchError(f"RANK={rank} is outside WORLD_SIZE={world} (ranks run 0..{world - 1})")
    if "LOCAL_WORLD_SIZE" in env and not 0 <= local < int(env["LOCAL_WORLD_SIZE"]):
        raise LaunchError(f"LOCAL_RANK={local} is outside LOCAL_WORLD_SIZE={env['LOCAL_WORLD_SIZE']}")
    if world > 1:
        absent = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if absent:
            raise LaunchError(f"WORLD_SIZE={world} but {' and '.join(absent)} not set: the processes cannot "
                              "meet (set them, or start through deepspeed, torchrun or srun)")


def ensure_rendezvous_env(env: MutableMapping[str, str] = os.environ) -> None:
    """Fill the torch.distributed variables from the launcher in use, then check them.

    deepspeed / torchrun set RANK and WORLD_SIZE themselves; under ``srun`` they come from SLURM's
    variables; plain ``python tools/train.py`` has no launcher, so a one-process group is described
    here (otherwise DeepSpeed falls back to MPI discovery and fails without mpi4py).
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        env.setdefault("LOCAL_RANK", "0")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env.update(slurm_rendezvous(env))
    elif "RANK" in env or "WORLD_SIZE" in env:
        given = "RANK" if "RANK" in env else "WORLD_SIZE"
        other = "WORLD_SIZE" if given == "RANK" else "RANK"
        raise LaunchError(f"{given}={env[given]} is set but {other} is not: set both, or neither for one process")
    else:
        env.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    check_rendezvous(env)


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
        # A collective that waits longer than this fails instead of hanging (a dead peer on gloo fails
        # at once; a stuck one after the timeout).
        timeout = timedelta(seconds=float(os.environ.get(COLLECTIVE_TIMEOUT_ENV) or 600))
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
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


def all_reduce_max(*values: float) -> list[float]:
    """Element-wise maximum over ranks of a few flags, in one collective."""
    if not dist.is_initialized() or world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def broadcast_object(obj: object) -> object:
    if not dist.is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
