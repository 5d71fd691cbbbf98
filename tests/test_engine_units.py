"""Engine pieces on their own: parameter groups, schedule, DeepSpeed config, samplers, collate,
checkpoint discovery, the loop's state, data stream and log window, and non-finite losses through the
real training loop (in-process)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import nn

import mmmae
from mmmae.config import ConfigError, effective_lr, global_batch_size, load_config
from mmmae.data.collate import MaskCollator, collate_dicts
from mmmae.data.sampler import MixedBatchSampler, ResumableBatchSampler, SeededDataset
from mmmae.engine.checkpoint import MARKER, complete_checkpoints, resolve_resume
from mmmae.engine.optim import layer_id, lr_at, param_groups
from mmmae.heads import EncoderCfg, EncoderModel, build_vision_encoder
from mmmae.engine.trainer import (LogWindow, StepResult, TrainData, TrainState, deepspeed_config,
                                  resume_accum_steps)


def test_param_groups_exclude_norms_biases_tokens() -> None:
    model = mmmae.create_model("mae", size="vit_tiny_test", img_size=32, patch_size=8)
    groups = param_groups(model, weight_decay=0.05)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    plain = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert "encoder.cls_token" in plain and "decoder.mask_token" in plain
    assert all(not n.endswith(".bias") and "norm" not in n for n in decayed)
    assert "encoder.blocks.0.attn.qkv.weight" in decayed and "encoder.patch_embed.proj.weight" in decayed
    assert decayed | plain == {n for n, _ in model.named_parameters()}


def test_layer_decay_scales_by_depth() -> None:
    model = mmmae.create_model("classifier", size="vit_tiny_test", img_size=32, patch_size=8, num_classes=3)
    depth = len(model.encoder.blocks)
    groups = param_groups(model, 0.05, layer_decay=0.75)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["head.weight"] == 1.0
    assert scale["encoder.blocks.1.mlp.fc1.weight"] == pytest.approx(0.75 ** (depth - 1))
    assert scale["encoder.patch_embed.proj.weight"] == pytest.approx(0.75 ** (depth + 1))
    assert layer_id("encoder.cls_token", depth) == 0 and layer_id("fc_norm.weight", depth) == depth + 1


def test_warmup_then_cosine() -> None:
    kw = dict(base_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)
    assert lr_at(110, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_effective_lr_counts_accumulation_world_and_views() -> None:
    video = ["model.name=videomae", "data.dataset=video_list"]
    cfg = load_config(None, [*video, "data.batch_size=32", "train.accum_steps=4", "optim.blr=1.5e-4", "data.num_samples=2"])
    assert global_batch_size(cfg, 8) == 32 * 2 * 4 * 8
    # The references scale by loader items, not repeated views (MAE / MAE-ST eff_batch_size,
    # VideoMAEv2 run_mae_pretraining.py total_batch_size = batch_size * num_tasks).
    assert effective_lr(cfg, 8) == pytest.approx(1.5e-4 * 32 * 4 * 8 / 256)
    counted = load_config(None, [*video, "data.batch_size=32", "train.accum_steps=4", "optim.blr=1.5e-4",
                                 "data.num_samples=2", "optim.lr_counts_repeats=true"])
    assert effective_lr(counted, 8) == pytest.approx(1.5e-4 * 2048 / 256)
    assert effective_lr(load_config(None, ["optim.lr=0.01"]), 8) == 0.01


def test_deepspeed_config_fields_and_conflicts() -> None:
    cfg = load_config(None, ["data.batch_size=4", "train.accum_steps=2", "optim.clip_grad=3.0",
                             "ds.zero_optimization.stage=2"])
    ds = deepspeed_config(cfg, 2, "bf16")
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["train_batch_size"] == 16
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 3.0
    # bf16 = fp32 weights + autocast; bf16_weights = DeepSpeed's bf16 mode.
    assert ds["torch_autocast"]["enabled"] and not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 2
    pure = deepspeed_config(cfg, 2, "bf16_weights")
    assert pure["bf16"]["enabled"] and not pure["torch_autocast"]["enabled"]
    bad = load_config(None, ["data.batch_size=4", "ds.train_micro_batch_size_per_gpu=8"])
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu"):
        deepspeed_config(bad, 1, "fp32")
    # One knob per quantity: a ds field that disagrees with its owner names both keys.
    clip = load_config(None, ["optim.clip_grad=1.0", "ds.gradient_clipping=5.0"])
    with pytest.raises(ValueError, match=r"ds.gradient_clipping=5.0 disagrees with optim.clip_grad"):
        deepspeed_config(clip, 1, "fp32")
    agree = load_config(None, ["optim.clip_grad=1.0", "ds.gradient_clipping=1.0"])
    assert deepspeed_config(agree, 1, "fp32")["gradient_clipping"] == 1.0
    half = load_config(None, ["ds.fp16.enabled=true"])
    with pytest.raises(ValueError, match=r"ds.fp16.enabled=True disagrees with train.precision"):
        deepspeed_config(half, 1, "bf16")
    assert deepspeed_config(half, 1, "fp16")["fp16"]["enabled"]


def test_config_is_read_only_and_every_packaged_config_loads(tmp_path: Path) -> None:
    from importlib import resources

    from omegaconf import OmegaConf
    names = sorted(p.name for p in resources.files("mmmae.configs").iterdir() if p.name.endswith(".yaml"))
    assert "image_mae.yaml" in names
    for name in names:
        cfg = load_config(name)
        # Round trip: the dumped YAML loads back to the same config.
        dumped = tmp_path / name
        dumped.write_text(OmegaConf.to_yaml(cfg))
        assert OmegaConf.to_container(load_config(str(dumped))) == OmegaConf.to_container(cfg)
    cfg = load_config("image_mae.yaml")
    with pytest.raises(Exception):
        cfg.optim.blr = 1.0  # type: ignore[misc]
    with pytest.raises(ConfigError, match="loops"):
        loop = tmp_path / "loop.yaml"
        loop.write_text(f"base: {loop}\n")
        load_config(str(loop))


def test_resumable_batch_sampler_continues_where_it_stopped() -> None:
    s = ResumableBatchSampler(50, 4, num_replicas=2, rank=1, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start_batch=3)
    assert list(s) == full[3:]
    other = ResumableBatchSampler(50, 4, num_replicas=2, rank=0, seed=3)
    other.set_epoch(2)
    assert not set(sum(full, [])) & set(sum(list(other), []))  # ranks see disjoint shards
    s.set_epoch(3)
    assert list(s) != full


def test_mixed_batch_sampler_homogeneous_deterministic_resumable() -> None:
    s = MixedBatchSampler([30, 20], [0.5, 0.5], batch_size=4, seed=1)
    s.set_epoch(0)
    batches = list(s)
    assert len(batches) == len(s) == (30 + 20) // 4
    kinds = [all(i < 30 for i in b) or all(i >= 30 for i in b) for b in batches]
    assert all(kinds)
    assert {b[0] < 30 for b in batches} == {True, False}
    s.set_epoch(0, start_batch=5)
    assert list(s) == batches[5:]
    only_images = MixedBatchSampler([30, 20], [1.0, 0.0], batch_size=4, seed=1)
    only_images.set_epoch(0)
    assert all(i < 30 for b in only_images for i in b)


def test_mask_collator_is_reproducible_per_batch() -> None:
    fn = mmmae.registry.get_spec("mae").make_mask_fn(mmmae.registry.resolve_model_cfg("mae", img_size=32, patch_size=8))
    samples = [{"image": torch.zeros(3, 32, 32), "index": i, "skipped": i % 2} for i in range(4)]
    a, b = MaskCollator(fn, seed=0), MaskCollator(fn, seed=0)
    out_a, out_b = a(samples), b(samples)
    assert torch.equal(out_a["mask"], out_b["mask"]) and out_a["skipped_images"] == 2
    assert not torch.equal(out_a["mask"], a(samples[::-1])["mask"])
    b.set_epoch(1)
    assert not torch.equal(out_a["mask"], b(samples)["mask"])
    assert collate_dicts([[{"x": torch.ones(2)}, {"x": torch.zeros(2)}]])["x"].shape == (2, 2)


def test_seeded_dataset_makes_augmentation_a_function_of_the_sample() -> None:
    class Noisy(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> torch.Tensor:
            return torch.rand(3)

    ds = SeededDataset(Noisy(), seed=5)
    first = ds[2]
    torch.rand(100)  # the caller's RNG moves on; the sample does not change
    assert torch.equal(ds[2], first) and not torch.equal(ds[1], first)
    ds.set_epoch(1)
    assert not torch.equal(ds[2], first)


def test_resume_auto_ignores_partial_checkpoints(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    (root / "step_00000004").mkdir(parents=True)
    (root / "step_00000004" / MARKER).write_text("{}")
    (root / "step_00000008").mkdir()  # published without a marker: never picked
    (root / "step_00000012.tmp").mkdir()  # still being written
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000004"]
    assert resolve_resume("auto", tmp_path) == root / "step_00000004"
    assert resolve_resume("", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        resolve_resume(str(root / "step_00000008"), tmp_path)


@dataclass
class _ProbeCfg(EncoderCfg):
    img_size: int = 32
    patch_size: int = 8
    embed_dim: int = 8
    depth: int = 1
    num_heads: int = 1
    nan_every: int = 1  # 1: every batch is non-finite; 2: batches with an odd first index are


class _Probe(EncoderModel):
    """A real (tiny) model meeting the model contract, whose loss is NaN on chosen batches."""

    def __init__(self, cfg: _ProbeCfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = build_vision_encoder(cfg)
        self.fc = nn.Linear(cfg.embed_dim, 1)

    def forward(self, batch: dict) -> dict:
        loss = self.fc(self.encoder.forward_features(batch["image"]).mean(dim=1)).pow(2).mean()
        if self.cfg.nan_every == 1 or int(batch["index"][0]) % 2 == 1:
            loss = loss * float("nan")
        return {"loss": loss, "probe_loss": loss.detach()}


@pytest.fixture
def probe_model():  # noqa: ANN201
    from mmmae.registry import MODELS, register_model
    register_model("nonfinite_probe", _ProbeCfg, takes=("image",))(_Probe)
    yield "nonfinite_probe"
    MODELS.pop("nonfinite_probe")


def test_nonfinite_losses_are_skipped_counted_and_stop_the_run(tmp_path: Path, dist_group: None,
                                                               probe_model: str) -> None:
    from mmmae.engine.trainer import NonFiniteLossError, train
    common = [f"model.name={probe_model}", "data.dataset=synthetic", "data.length=64", "data.batch_size=4",
              "data.num_workers=0", "train.progress=false", "train.precision=fp32", "train.log_every=1",
              "optim.lr=0.01", "optim.warmup_steps=0"]
    summary = train(load_config(None, [*common, f"output_dir={tmp_path / 'some'}", "model.nan_every=2",
                                       "train.max_steps=4", "train.max_nonfinite=50"]))
    rows = [json.loads(x) for x in (tmp_path / "some" / "metrics.jsonl").read_text().splitlines()]
    assert summary["step"] == 4 and rows[-1]["nonfinite_steps"] > 0
    assert all(r["loss"] is not None and math.isfinite(r["loss"]) for r in rows)
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in rows)  # fp32, no ZeRO, no clipping
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite"):
        train(load_config(None, [*common, f"output_dir={tmp_path / 'all'}", "model.nan_every=1",
                                 "train.max_steps=4", "train.max_nonfinite=3"]))


def test_empty_override_clears_a_string_key() -> None:
    cfg = load_config("video_mae_tiny.yaml", ["init_from=", "data.class_list="])
    assert cfg.init_from == "" and cfg.data.class_list == ""


def test_train_state_round_trips_and_recuts_its_position_for_another_world() -> None:
    state = TrainState(step=7, epoch=2, epoch_batches=6, nonfinite_total=3, skipped={"skipped_videos": 2})
    # Written by 2 processes with 4 items each and 2 accumulation steps.
    saved = json.loads(json.dumps(state.to_dict(batch_size=4, world_size=2, accum_steps=2, zero_stage=1)))
    assert saved["epoch_samples"] == 6 * 4 * 2 and saved["global_batch"] == 16 and saved["zero_stage"] == 1
    assert TrainState.from_dict(saved, batch_size=4, world_size=2) == state
    # On 1 process the same 48 samples of the epoch are 12 batches of 4; on 4 processes 3.
    assert TrainState.from_dict(saved, batch_size=4, world_size=1).epoch_batches == 12
    assert TrainState.from_dict(saved, batch_size=4, world_size=4).epoch_batches == 3
    # ... and accumulation grows so that an optimizer step still takes 16 items.
    assert resume_accum_steps(saved, load_config(None, ["data.batch_size=4", "train.accum_steps=2"]), 1) == 4
    older = {"step": 5, "epoch": 1, "epoch_batches": 9}  # no sampler position, counters or run shape
    assert TrainState.from_dict(older, batch_size=4, world_size=3) == TrainState(step=5, epoch=1, epoch_batches=9)
    with pytest.raises(ValueError, match=r"ckpt/step_00000005 lacks epoch, epoch_batches"):
        TrainState.from_dict({"step": 5}, batch_size=4, world_size=1, where="ckpt/step_00000005")


def test_train_data_crosses_epochs_and_continues_from_a_train_state() -> None:
    class Items(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int) -> dict:
            return {"image": torch.full((1,), float(i)), "index": i}

    cfg = load_config(None, ["data.batch_size=2", "data.num_workers=0"])

    def stream(state: TrainState) -> tuple[Iterator[dict], list[float]]:
        data = TrainData(cfg, SeededDataset(Items(), 0), None, world=1, rank=0, seed=0, device=torch.device("cpu"))
        assert data.batches_per_epoch == 5
        waits: list[float] = []
        return data.batches(state, waits.append), waits

    state = TrainState()
    batches, waits = stream(state)
    drawn = [next(batches)["index"].tolist() for _ in range(7)]
    assert (state.epoch, state.epoch_batches) == (1, 2) and len(waits) == 7
    assert sorted(sum(drawn[:5], [])) == list(range(10))  # epoch 0 sees every item once
    resumed, _ = stream(TrainState(epoch=1, epoch_batches=2))
    assert next(resumed)["index"].tolist() == next(batches)["index"].tolist()


def _step(sums: dict, counts: dict, samples: int, tokens: int) -> StepResult:
    return StepResult(sums, counts, samples, tokens, grad_norm=1.0, stop_signum=0, batch={}, out={})


def test_log_window_makes_one_record_per_window_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    window = LogWindow(step_flops=6e12, peak_tflops=2.0, clock=lambda: now[0])
    state = TrainState(step=2, epoch=0, nonfinite_total=1, skipped={"skipped_images": 3})
    # Two steps: loss 1.0 and 2.0 over two micro-batches, then 4.0 over one (its other one was skipped).
    window.add(_step({"loss": 3.0, "mse_loss": 3.0}, {"loss": 2, "mse_loss": 2}, samples=8, tokens=64))
    window.add(_step({"loss": 4.0, "mse_loss": 4.0}, {"loss": 1, "mse_loss": 1}, samples=4, tokens=32))
    window.add_wait(0.5)
    now[0] = 102.0
    with caplog.at_level("WARNING", logger="mmmae.train"):
        rec = window.record(state, epoch=0.4, lr=1e-3, grad_norm=1.0)
    assert rec["loss"] == pytest.approx(7.0 / 3) and rec["mse_loss"] == pytest.approx(7.0 / 3)
    assert rec["samples_per_s"] == 6.0 and rec["tokens_per_s"] == 48.0 and rec["step_time_s"] == 1.0
    assert rec["data_wait_share"] == 0.25 and rec["mfu"] == pytest.approx(3.0)
    assert rec["skipped_images"] == 3 and rec["nonfinite_steps"] == 1 and rec["step"] == 2
    assert not caplog.records  # the first window pays worker start-up: not judged
    # The window starts again: the next record counts only what came after.
    window.add(_step({"loss": 1.0}, {"loss": 1}, samples=2, tokens=16))
    window.add_wait(3.0)
    now[0] = 106.0
    with caplog.at_level("WARNING", logger="mmmae.train"):
        rec = window.record(state, epoch=0.6, lr=1e-3, grad_norm=1.0)
        assert rec["loss"] == 1.0 and rec["samples_per_s"] == 0.5 and rec["step_time_s"] == 4.0
        assert rec["data_wait_share"] == 0.75
        window.add(_step({"loss": 1.0}, {"loss": 1}, samples=2, tokens=16))
        window.add_wait(3.0)
        now[0] = 110.0
        window.record(state, epoch=0.8, lr=1e-3, grad_norm=1.0)
    assert [r.getMessage()[:3] for r in caplog.records] == ["75%"]  # once, for the second window only
