"""Fault drills in one process through the real trainer: a disk that fills during a checkpoint write,
a newest checkpoint that is corrupt."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
import torch

from mmmae.config import load_config

COMMON = ["model.name=mae", "model.size=vit_tiny_test", "model.img_size=32", "model.patch_size=8",
          "data.dataset=synthetic", "data.length=64", "data.batch_size=4", "data.num_workers=0",
          "train.progress=false", "train.precision=fp32", "train.log_every=1", "optim.lr=0.01",
          "optim.warmup_steps=0", "train.ckpt_every=2", "train.keep_last=5"]


def _steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path: Path, dist_group: None,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from mmmae.engine.checkpoint import CheckpointWriteError, complete_checkpoints, resume_candidates
    from mmmae.engine.trainer import train

    run = tmp_path / "full"
    real_save = torch.save

    def save(obj, f, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        if "step_00000004.tmp" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointWriteError) as e:
        train(load_config(None, [*COMMON, f"output_dir={run}", "train.max_steps=6"]))
    msg = str(e.value)
    assert "step_00000004.tmp" in msg and "No space left on device" in msg and "step_00000002 is intact" in msg
    assert [p.name for p in complete_checkpoints(run)] == ["step_00000002"]
    monkeypatch.setattr(torch, "save", real_save)
    assert resume_candidates("auto", run)[0].name == "step_00000002"
    summary = train(load_config(None, [*COMMON, f"output_dir={run}", "train.max_steps=6", "resume=auto"]))
    assert summary["step"] == 6 and _steps(run)[-4:] == [3, 4, 5, 6]


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path: Path, dist_group: None,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    from mmmae.engine.trainer import train

    run = tmp_path / "corrupt"
    train(load_config(None, [*COMMON, f"output_dir={run}", "train.max_steps=4"]))
    newest = run / "checkpoints" / "step_00000004"
    states = newest / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 3])  # a truncated file
    with caplog.at_level(logging.WARNING):
        summary = train(load_config(None, [*COMMON, f"output_dir={run}", "train.max_steps=5", "resume=auto"]))
    assert any(str(newest) in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    assert summary["step"] == 5
    assert _steps(run)[-3:] == [3, 4, 5]  # continued from step 2


def test_no_readable_checkpoint_names_each(tmp_path: Path, dist_group: None) -> None:
    from mmmae.engine.trainer import train

    run = tmp_path / "allbad"
    train(load_config(None, [*COMMON, f"output_dir={run}", "train.max_steps=2"]))
    states = run / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
    states.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="no checkpoint could be loaded: .*step_00000002"):
        train(load_config(None, [*COMMON, f"output_dir={run}", "train.max_steps=3", "resume=auto"]))


# ----------------------------------------------------------------------------------------------------
# telemetry: time waiting for data, step time, MFU


class _SlowDataset(torch.utils.data.Dataset):
    """Synthetic images that take 60 ms each to 'decode'."""

    def __init__(self, inner: torch.utils.data.Dataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict:
        import time
        time.sleep(0.06)
        return self.inner[i]


def test_metrics_report_data_wait_step_time_and_mfu(tmp_path: Path, dist_group: None,
                                                   caplog: pytest.LogCaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import mmmae.engine.trainer as T

    def rows(run: Path) -> list[dict]:
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    common = [*COMMON, "train.max_steps=6", "train.log_every=2", "train.ckpt_every=100"]
    T.train(load_config(None, [*common, f"output_dir={tmp_path / 'fast'}"]))
    fast = rows(tmp_path / "fast")
    for r in fast:
        assert 0.0 <= r["data_wait_share"] < 1.0 and r["step_time_s"] > 0 and 0.0 < r["mfu"] < 1.0
    real = T.build_dataset
    monkeypatch.setattr(T, "build_dataset", lambda *a, **k: _SlowDataset(real(*a, **k)))
    caplog.clear()  # the tiny model may wait on even the synthetic images: count the slow run's warnings
    with caplog.at_level(logging.WARNING, logger="mmmae.train"):
        T.train(load_config(None, [*common, f"output_dir={tmp_path / 'slow'}"]))
    slow = rows(tmp_path / "slow")
    # 4 images x 60 ms per step in the main process: waiting dominates the step (the first window also
    # holds start-up work, the one-off FLOP count among it, so it is not judged).
    assert all(r["data_wait_share"] > 0.5 for r in slow[1:]), [r["data_wait_share"] for r in slow]
    # The wait the run reports covers the injected sleep (4 x 60 ms per step, at least), however
    # loaded the machine is.
    assert all(r["data_wait_share"] * r["step_time_s"] >= 0.22 for r in slow[1:]), slow
    warnings = [r for r in caplog.records if "waiting for data" in r.getMessage()]
    assert len(warnings) == 1 and "data.num_workers" in warnings[0].getMessage()
