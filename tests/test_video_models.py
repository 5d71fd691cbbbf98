"""Video methods: VideoMAE (+ VideoMAEv2 decoder masking), OmniMAE, BEVT-style two stages.

Unit checks on the models and the data pipeline, parity with Hugging Face ``VideoMAEForPreTraining``,
and end-to-end runs of every tiny config through the real launcher (2 processes, real sample clips).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import mmmae
from conftest import FASHION_MNIST, ROOT, VIDEOS, run_tool
from mmmae.config import load_config, model_cfg
from mmmae.convert import from_hf_videomae, from_official_videomae
from mmmae.data.collate import MaskCollator, collate_dicts
from mmmae.data.registry import build_dataset
from mmmae.data.sampler import ResumableBatchSampler, SeededDataset
from mmmae.layers import patchify_video, unpatchify_video
from mmmae.masking import tube_mask
from mmmae.registry import get_spec

needs_videos = pytest.mark.skipif(not VIDEOS.is_dir(), reason="shared/data/videos not found")
needs_fmnist = pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Fashion-MNIST not installed")
TINY_LIST = ROOT / "configs" / "lists" / "tiny_kinetics.txt"
CLASSES = VIDEOS / "kinetics400_classes.txt"
# Absolute data paths for the tiny configs (their YAML paths are relative to the repo root).
VIDEO_DATA = [f"data.root={VIDEOS}", f"data.class_list={CLASSES}", f"data.train_list={TINY_LIST}"]
TINY = {"img_size": 32, "patch_size": 8, "num_frames": 4, "tubelet_size": 2}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _finite_run(run: Path, steps: int) -> list[dict]:
    rows = _metrics(run)
    assert rows[-1]["step"] == steps
    assert all(r["loss"] is not None and math.isfinite(r["loss"]) for r in rows), rows
    assert (run / "model.safetensors").is_file()
    return rows


# ----------------------------------------------------------------------------------------------------
# data pipeline


@needs_videos
def test_pipeline_tube_masks_are_constant_over_time() -> None:
    """Batches as the engine makes them (dataset, sampler, collate with the registered mask maker):
    each sample's mask is one 2-D mask repeated over every time slice, with the exact hidden count."""
    cfg = load_config("video_mae_tiny.yaml", VIDEO_DATA)
    mcfg = model_cfg(cfg.model)
    dataset = SeededDataset(build_dataset(cfg, "train", mcfg), cfg.train.seed)
    sampler = ResumableBatchSampler(len(dataset), cfg.data.batch_size, seed=0)
    collate = MaskCollator(get_spec("videomae").make_mask_fn(mcfg), seed=0)
    batches = list(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate))
    assert len(batches) == 2
    t, h, w = 2, 4, 4
    for batch in batches:
        mask = batch["mask"]
        b = cfg.data.batch_size * cfg.data.num_samples  # repeated sampling: views are samples
        assert batch["video"].shape == (b, 3, 4, 32, 32) and mask.shape == (b, t * h * w)
        per_slice = mask.view(b, t, h * w)
        assert torch.equal(per_slice, per_slice[:, :1].expand_as(per_slice))
        # VideoMAE's TubeMaskingGenerator: int(0.9 * 16) = 14 hidden per slice (MAE's rule would give 15).
        assert mcfg.mask_ratio == 0.9 and (mask.sum(1) == t * 14).all()


@needs_videos
def test_video_image_source_pairs_each_view_with_a_frame_when_no_image_source() -> None:
    cfg = load_config("bevt_temporal_tiny.yaml", [*VIDEO_DATA, "data.image_dataset=''", "data.num_samples=2"])
    ds = build_dataset(cfg, "train", model_cfg(cfg.model))
    views = ds[0]
    assert len(views) == 2
    for view in views:
        frames = view["video"].unbind(1)  # (3, H, W) each
        assert view["image"].shape == (3, 32, 32)
        assert any(torch.equal(view["image"], f) for f in frames)
    batch = collate_dicts([views])
    assert batch["video"].shape == (2, 3, 4, 32, 32) and batch["image"].shape == (2, 3, 32, 32)


# ----------------------------------------------------------------------------------------------------
# VideoMAE vs Hugging Face

HIDDEN, LAYERS, HEADS, DEC_HIDDEN, DEC_LAYERS, DEC_HEADS = 64, 2, 4, 32, 2, 4
IMG, PATCH, FRAMES, TUBELET, BATCH, RATIO = 32, 8, 4, 2, 3, 0.75
GRID = (FRAMES // TUBELET, IMG // PATCH, IMG // PATCH)


def _hf_videomae(norm_pix_loss: bool) -> torch.nn.Module:
    import transformers
    cfg = transformers.VideoMAEConfig(
        image_size=IMG, patch_size=PATCH, num_channels=3, num_frames=FRAMES, tubelet_size=TUBELET,
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=4 * HIDDEN,
        decoder_hidden_size=DEC_HIDDEN, decoder_num_hidden_layers=DEC_LAYERS,
        decoder_num_attention_heads=DEC_HEADS, decoder_intermediate_size=4 * DEC_HIDDEN, qkv_bias=True,
        use_mean_pooling=False, norm_pix_loss=norm_pix_loss, layer_norm_eps=1e-6, hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    hf = transformers.VideoMAEForPreTraining(cfg).eval()
    # VideoMAE's decoder norm has eps 1e-6 (norm_layer=partial(nn.LayerNorm, eps=1e-6)); HF builds it with
    # the LayerNorm default 1e-5. Its sin-cos tables are plain tensors computed in __init__ (nothing to fill).
    hf.decoder.norm.eps = 1e-6
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move every weight off its init, so a swapped or dropped one cannot hide
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return hf


def _our_videomae(norm_pix_loss: bool, attn_impl: str = "math", **extra) -> torch.nn.Module:
    return mmmae.create_model(
        "videomae", embed_dim=HIDDEN, depth=LAYERS, num_heads=HEADS, decoder_embed_dim=DEC_HIDDEN,
        decoder_depth=DEC_LAYERS, decoder_num_heads=DEC_HEADS, img_size=IMG, patch_size=PATCH, num_frames=FRAMES,
        tubelet_size=TUBELET, norm_pix_loss=norm_pix_loss, attn_impl=attn_impl, **extra).eval()


@pytest.mark.parametrize("attn_impl", ["math", "sdpa"])
@pytest.mark.parametrize("norm_pix", [True, False], ids=["norm_pix", "raw_pix"])
def test_videomae_matches_hf_videomae(norm_pix: bool, attn_impl: str) -> None:
    hf = _hf_videomae(norm_pix)
    ours = _our_videomae(norm_pix, attn_impl)
    converted = from_hf_videomae(hf.state_dict())
    assert set(converted) == set(ours.state_dict())
    ours.load_state_dict(converted, strict=True)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(BATCH, 3, FRAMES, IMG, IMG, generator=gen)
    mask = tube_mask(BATCH, GRID, RATIO, generator=gen)
    with torch.no_grad():
        ref = hf(pixel_values=x.transpose(1, 2), bool_masked_pos=mask)  # HF takes (B, T, C, H, W)
        out = ours({"video": x, "mask": mask})
    # HF's decoder returns the hidden tokens only, in token order.
    pred_hidden = out["pred"][mask].view(BATCH, -1, out["pred"].shape[-1])
    assert pred_hidden.shape == ref.logits.shape == (BATCH, int(mask[0].sum()), TUBELET * PATCH * PATCH * 3)
    assert torch.allclose(pred_hidden, ref.logits, atol=1e-5), (pred_hidden - ref.logits).abs().max()
    assert torch.allclose(out["loss"], ref.loss, atol=1e-5), (out["loss"].item(), ref.loss.item())


def test_official_videomae_layout_round_trips() -> None:
    """from_official_videomae on MCG-NJU's names (encoder.*, encoder_to_decoder, mask_token, decoder.blocks /
    norm / head, sin-cos tables as buffers) gives exactly our state dict."""
    from mmmae.layers import sincos_pos_embed_1d

    ours = _our_videomae(True)
    state = ours.state_dict()
    official = {}
    for k, v in state.items():
        k = k.replace("decoder.decoder_embed.", "encoder_to_decoder.").replace("decoder.mask_token", "mask_token")
        k = k.replace("decoder.decoder_blocks.", "decoder.blocks.").replace("decoder.decoder_norm.", "decoder.norm.")
        official[k.replace("decoder.decoder_pred.", "decoder.head.")] = v
    official["pos_embed"] = sincos_pos_embed_1d(DEC_HIDDEN, math.prod(GRID), interleave=True)[None]
    converted = from_official_videomae(official)
    assert set(converted) == set(state)
    assert all(torch.equal(converted[k], state[k]) for k in state)


# ----------------------------------------------------------------------------------------------------
# VideoMAEv2 decoder masking


def test_decoder_masking_reconstructs_only_kept_hidden_tokens() -> None:
    torch.manual_seed(0)
    model = mmmae.create_model("videomae", size="vit_tiny_test", decoder_mask_ratio=0.5, **TINY).eval()
    cfg = model.cfg
    gen = torch.Generator().manual_seed(3)
    b = 4
    masks = get_spec("videomae").make_mask_fn(cfg)(b, gen)
    mask, decode_mask = masks["mask"], masks["decode_mask"]
    decoded = mask & ~decode_mask
    m = int(mask[0].sum())
    assert (decoded.sum(1) == m // 2).all()  # the running cell keeps 2 of 4 cell positions
    x = torch.randn(b, 3, FRAMES, IMG, IMG, generator=gen)
    with torch.no_grad():
        out = model({"video": x, **masks})
    assert out["pred"].shape == (b, m // 2, TUBELET * PATCH * PATCH * 3)
    assert torch.equal(out["decoded"], decoded)
    target = model.target(x)[decoded].view(b, m // 2, -1)
    assert torch.allclose(out["loss"], ((out["pred"] - target) ** 2).mean(), atol=1e-6)

    def perturbed(where: torch.Tensor) -> dict[str, torch.Tensor]:
        p = patchify_video(x, PATCH, TUBELET).clone()
        p[where] = torch.randn_like(p[where]) * 3
        return {"video": unpatchify_video(p, PATCH, TUBELET, GRID), **masks}

    with torch.no_grad():
        # Pixels of hidden tokens the decoder skips touch neither input nor loss ...
        same = model(perturbed(mask & decode_mask))
        # ... while the decoded hidden tokens' pixels are the loss's targets.
        other = model(perturbed(decoded))
    assert torch.equal(same["pred"], out["pred"]) and torch.allclose(same["loss"], out["loss"], atol=1e-7)
    assert torch.equal(other["pred"], out["pred"]) and not torch.allclose(other["loss"], out["loss"])
    with pytest.raises(ValueError, match="same, non-zero number"):
        bad = decode_mask.clone()
        bad[0, decoded[0].nonzero()[0, 0]] = True
        model({"video": x, "mask": mask, "decode_mask": bad})


# ----------------------------------------------------------------------------------------------------
# OmniMAE


def test_omnimae_images_are_one_tubelet_with_the_t0_positions() -> None:
    torch.manual_seed(0)
    model = mmmae.create_model("omnimae", size="vit_tiny_test", **TINY).eval()
    make = get_spec("omnimae").make_mask_fn(model.cfg)
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, IMG, IMG, generator=gen)
    imask = make(2, gen, modality="image")["mask"]
    vmask = make(2, gen, modality="video")["mask"]
    # omnivision RandMasking: int(ratio * L) hidden: int(0.75 * 16) = 12, int(0.9 * 32) = 28 (MAE's rule: 29).
    assert imask.shape == (2, 16) and (imask.sum(1) == 12).all()
    assert vmask.shape == (2, 32) and (vmask.sum(1) == 28).all()
    with torch.no_grad():
        out_i = model({"image": img, "mask": imask})
        out_v = model({"video": torch.randn(2, 3, FRAMES, IMG, IMG, generator=gen), "mask": vmask})
    assert out_i["pred"].shape == (2, 16, TUBELET * PATCH * PATCH * 3) and torch.isfinite(out_i["loss"])
    assert out_v["pred"].shape == (2, 32, TUBELET * PATCH * PATCH * 3) and torch.isfinite(out_v["loss"])
    # An image is a static one-tubelet clip: its tokens are the t=0 tokens of a static clip, and it reads
    # only the t=0 rows of the encoder's and the decoder's position tables.
    from mmmae.video.models import image_as_tubelet_tokens

    enc = model.encoder
    static = img.unsqueeze(2).expand(-1, -1, FRAMES, -1, -1)
    with torch.no_grad():
        assert torch.allclose(image_as_tubelet_tokens(enc, img), enc.patch_embed(static)[:, :16], atol=1e-6)
        enc.pos_embed[:, 16:] = 0.0
        model.decoder.decoder_pos_embed[:, 16:] = 0.0
        again = model({"image": img, "mask": imask})
        assert torch.equal(again["pred"], out_i["pred"])
        enc.pos_embed[:, :16] = 0.0
        assert not torch.allclose(model({"image": img, "mask": imask})["pred"], out_i["pred"])


@needs_videos
@needs_fmnist
def test_omnimae_trains_on_a_mixed_image_video_stream(tmp_path: Path, dist_group: None,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from mmmae.engine.trainer import train
    from mmmae.video.models import OmniMAE

    seen: list[str] = []
    forward = OmniMAE.forward

    def spy(self: OmniMAE, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        seen.append("video" if "video" in batch else "image")
        return forward(self, batch)

    monkeypatch.setattr(OmniMAE, "forward", spy)
    cfg = load_config("omnimae_tiny.yaml", [f"data.root={VIDEOS}", f"data.image_root={FASHION_MNIST}",
                                            f"output_dir={tmp_path / 'omni'}", "train.max_steps=6",
                                            "train.log_every=1", "train.progress=false", "train.vis_every=0"])
    summary = train(cfg)
    assert summary["step"] == 6
    assert set(seen) == {"image", "video"}, seen
    rows = _finite_run(tmp_path / "omni", 6)
    assert len(rows) == 6


# ----------------------------------------------------------------------------------------------------
# BEVT


def test_bevt_inflation_keeps_static_clips_equal_to_images() -> None:
    torch.manual_seed(0)
    spatial = mmmae.create_model("bevt_spatial", size="vit_tiny_test", img_size=IMG, patch_size=PATCH,
                                 mask_patch_size=16, init_values=0.1).eval()
    video = mmmae.create_model("bevt", size="vit_tiny_test", mask_patch_size=16, init_values=0.1, **TINY).eval()
    missing, unexpected = video.load_pretrained(spatial.state_dict())
    assert missing == [] and unexpected == []
    gen = torch.Generator().manual_seed(1)
    frame = torch.randn(2, 3, IMG, IMG, generator=gen)
    clip = frame.unsqueeze(2).expand(-1, -1, FRAMES, -1, -1)
    with torch.no_grad():
        tokens_2d = spatial.encoder.patch_embed(frame)  # (B, h*w, D)
        tokens_3d = video.encoder.patch_embed(clip).view(2, GRID[0], -1, tokens_2d.shape[-1])
        for t in range(GRID[0]):
            assert torch.allclose(tokens_3d[:, t], tokens_2d, atol=1e-5)
        # Right after inflation the image stream is the spatial model: same positions, same weights.
        imask = get_spec("bevt_spatial").make_mask_fn(spatial.cfg)(2, gen)["mask"]
        ref = spatial({"image": frame, "mask": imask})
        got = video({"image": frame, "image_mask": imask})
        assert torch.allclose(got["image_pred"], ref["pred"], atol=1e-5)
        assert torch.allclose(got["image_loss"], ref["loss"], atol=1e-6)
        # The video head starts as the image head on every frame of the tubelet.
        feats = torch.randn(5, video.cfg.embed_dim, generator=gen)
        per_frame = spatial.head(feats)
        assert torch.allclose(video.video_head(feats), per_frame.repeat(1, TUBELET), atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# end to end: 2 processes through the deepspeed launcher on the real clips


def _tool(config: str, run: Path, *extra: str, procs: int = 2) -> None:
    run_tool("train.py", ["--config", config, f"output_dir={run}", "train.progress=false", *extra], procs=procs)


@pytest.mark.slow
@needs_videos
def test_videomae_tiny_two_processes_counts_the_corrupt_clip(tmp_path: Path) -> None:
    run = tmp_path / "videomae"
    _tool("video_mae_tiny.yaml", run, *VIDEO_DATA)
    rows = _finite_run(run, 8)
    assert rows[-1]["skipped_videos"] > 0
    assert list((run / "vis").glob("step_*.png"))


@pytest.mark.slow
@needs_videos
@needs_fmnist
def test_omnimae_tiny_trains_on_real_clips_and_images(tmp_path: Path) -> None:
    run = tmp_path / "omnimae"  # one plain process: the launcher is covered by the VideoMAE run above
    _tool("omnimae_tiny.yaml", run, f"data.root={VIDEOS}", f"data.image_root={FASHION_MNIST}", procs=0)
    _finite_run(run, 8)


@pytest.mark.slow
@needs_videos
@needs_fmnist
def test_bevt_two_stages(tmp_path: Path) -> None:
    spatial, temporal = tmp_path / "spatial", tmp_path / "temporal"  # the spatial stage on one plain process
    _tool("bevt_spatial_tiny.yaml", spatial, f"data.root={FASHION_MNIST}", procs=0)
    _finite_run(spatial, 8)
    _tool("bevt_temporal_tiny.yaml", temporal, *VIDEO_DATA, f"data.image_root={FASHION_MNIST}",
          f"init_from={spatial / 'model.safetensors'}")
    rows = _finite_run(temporal, 6)
    assert {"image_loss", "video_loss"} <= set(rows[-1])
    report = json.loads((temporal / "init_report.json").read_text())
    assert report["missing"] == [] and report["unexpected"] == []
