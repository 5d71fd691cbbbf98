"""Process-group helpers: collectives over ranks that hold different keys; launch environments."""

from __future__ import annotations

import os
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
