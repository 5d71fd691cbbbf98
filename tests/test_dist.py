"""Process-group helpers: collectives over ranks that hold different keys; launch environments."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from conftest import _free_port


def _counts_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from mmmae.engine import dist as D
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # Rank 0 saw only image batches, rank 1 only video batches (as OmniMAE's mixed steps can).
        mine = {"skipped_images": 3} if rank == 0 else {"skipped_videos": 2, "skipped_images": 1}
        torch.save(D.all_reduce_counts(mine), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_counters_with_different_keys_sum_over_ranks(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_counts_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert torch.load(tmp_path / f"rank{rank}.pt") == {"skipped_images": 4, "skipped_videos": 2}


# ----------------------------------------------------------------------------------------------------
# launch environments

import pytest  # noqa: E402

from mmmae.engine.dist import LaunchError, ensure_rendezvous_env, expand_hostlist, slurm_rendezvous  # noqa: E402


@pytest.mark.parametrize("text,hosts", [
    ("node01", ["node01"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("a[8-11]", ["a8", "a9", "a10", "a11"]),
    ("rack[1-2]-n[09-10]", ["rack1-n09", "rack1-n10", "rack2-n09", "rack2-n10"]),
    ("x-[001-002]-ib,y", ["x-001-ib", "x-002-ib", "y"]),
])
def test_slurm_host_lists_expand_in_order(text: str, hosts: list[str]) -> None:
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["gpu[01-03", "gpu01]", "gpu[a-b]", "gpu[5-3]"])
def test_bad_host_lists_are_named(text: str) -> None:
    with pytest.raises(LaunchError, match=re.escape(repr(text))):
        expand_hostlist(text)


def test_slurm_variables_become_the_rendezvous() -> None:
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_NNODES": "2",
           "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[12-13]", "SLURM_JOB_ID": "123456"}
    got = slurm_rendezvous(env)
    assert got == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                   "MASTER_ADDR": "gpu12", "MASTER_PORT": str(20000 + 123456 % 20000)}
    assert slurm_rendezvous({**env, "MASTER_PORT": "29400"})["MASTER_PORT"] == "29400"


@pytest.mark.parametrize("env,message", [
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK=2 is outside WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "MASTER_ADDR not set"),
    ({"RANK": "0"}, "RANK=0 is set but WORLD_SIZE is not"),
    ({"RANK": "0", "WORLD_SIZE": "two"}, "must be integers"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "n1"},
     "SLURM_JOB_ID"),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h",
      "MASTER_PORT": "1"}, "LOCAL_RANK=3 is outside LOCAL_WORLD_SIZE=2"),
])
def test_bad_launches_are_named_before_any_work(env: dict[str, str], message: str) -> None:
    with pytest.raises(LaunchError, match=re.escape(message)):
        ensure_rendezvous_env(dict(env))


def test_plain_python_describes_one_process() -> None:
    env: dict[str, str] = {}
    ensure_rendezvous_env(env)
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and env["LOCAL_RANK"] == "0" and env["MASTER_PORT"]


@pytest.mark.parametrize("task_code,script_code,requeued", [(75, 0, True), (0, 0, False), (3, 3, False)])
def test_sbatch_template_requeues_on_the_preemption_code(tmp_path: Path, task_code: int, script_code: int,
                                                         requeued: bool) -> None:
    """tools/slurm/train.sbatch under stand-in srun / scontrol: exit 75 from the tasks requeues the
    job and ends the script cleanly; any other code is passed on."""
    import subprocess

    from conftest import ROOT
    from mmmae.engine.trainer import PREEMPTED_EXIT_CODE

    assert PREEMPTED_EXIT_CODE == 75  # the code the template tests for
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/srun_args\nexit {task_code}\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/requeue\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "42", "SLURM_CPUS_PER_TASK": "4"}
    res = subprocess.run(["bash", str(ROOT / "tools" / "slurm" / "train.sbatch"), "--config", "video_mae.yaml"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == script_code, res.stderr
    args = (tmp_path / "srun_args").read_text()
    assert "tools/train.py resume=auto --config video_mae.yaml" in args
    assert (tmp_path / "requeue").is_file() == requeued
    if requeued:
        assert (tmp_path / "requeue").read_text().split() == ["requeue", "42"]
