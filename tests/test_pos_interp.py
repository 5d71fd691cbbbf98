"""Fine-tuning at another resolution or frame count: which position table each reference uses.

- MAE (facebookresearch/mae main_finetune.py): timm's ViT has a learned ``pos_embed``, initialised from
  the checkpoint's table after ``util/pos_embed.py interpolate_pos_embed`` resized it bicubically.
- VideoMAE (MCG-NJU/VideoMAE run_class_finetuning.py): the fine-tuning ViT keeps a fixed sinusoid
  table of its own grid (``use_learnable_pos_emb=False``); a checkpoint table is only resized over
  space (time kept) when the checkpoint has one, and then not used by a fixed-table model.

The expected tables are written here from the references' formulas (numpy sin-cos tables, torch
bicubic interpolation in the references' exact layout), independently of ``mmmae``'s code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import mmmae
from mmmae.config import dump_config, load_config
from mmmae.engine.optim import param_groups
from mmmae.engine.trainer import load_init_weights
from mmmae.heads import load_encoder_state, load_encoder_weights
from mmmae.layers.pos_embed import interpolate_pos_table

D = 32  # vit_tiny_test width


# ------------------------------------------------------------------------- the references' formulas


def mae_2d_sincos(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """facebookresearch/mae util/pos_embed.py get_2d_sincos_pos_embed, written out again."""
    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    w, h = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64))
    emb = np.concatenate([one_d(embed_dim // 2, w), one_d(embed_dim // 2, h)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


def mae_interpolate(pos_embed_checkpoint: torch.Tensor, num_extra_tokens: int, new_size: int) -> torch.Tensor:
    """MAE's interpolate_pos_embed on a (1, P + s*s, D) table."""
    embedding_size = pos_embed_checkpoint.shape[-1]
    orig_size = int((pos_embed_checkpoint.shape[-2] - num_extra_tokens) ** 0.5)
    extra_tokens = pos_embed_checkpoint[:, :num_extra_tokens]
    pos_tokens = pos_embed_checkpoint[:, num_extra_tokens:]
    pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, embedding_size).permute(0, 3, 1, 2)
    pos_tokens = F.interpolate(pos_tokens, size=(new_size, new_size), mode="bicubic", align_corners=False)
    pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra_tokens, pos_tokens), dim=1)


def videomae_interpolate(pos_embed_checkpoint: torch.Tensor, t: int, orig_size: int, new_size: int) -> torch.Tensor:
    """VideoMAE run_class_finetuning.py's resize of a (1, T*s*s, D) table (no extra tokens)."""
    d = pos_embed_checkpoint.shape[-1]
    pos_tokens = pos_embed_checkpoint.reshape(-1, t, orig_size, orig_size, d)
    pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, d).permute(0, 3, 1, 2)
    pos_tokens = F.interpolate(pos_tokens, size=(new_size, new_size), mode="bicubic", align_corners=False)
    pos_tokens = pos_tokens.permute(0, 2, 3, 1).reshape(-1, t, new_size, new_size, d)
    return pos_tokens.flatten(1, 3)


def videomae_sinusoid(n_position: int, d_hid: int) -> np.ndarray:
    """VideoMAE modeling_finetune.py get_sinusoid_encoding_table, written out again."""
    table = np.array([[p / np.power(10000, 2 * (j // 2) / d_hid) for j in range(d_hid)] for p in range(n_position)])
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return table


# ------------------------------------------------------------------------------- interpolate_pos_table


def test_2d_resize_is_maes_interpolate_pos_embed_with_the_cls_row_untouched() -> None:
    g = torch.Generator().manual_seed(0)
    table = torch.randn(1, 1 + 4 * 4, 8, generator=g)
    ours = interpolate_pos_table(table, (4, 4), (6, 6), num_prefix_tokens=1)
    ref = mae_interpolate(table, 1, 6)
    assert ours.shape == (1, 1 + 36, 8)
    assert torch.equal(ours[:, :1], table[:, :1])
    assert torch.allclose(ours, ref, atol=1e-6)
    # Unbatched (L, D) in, unbatched out; the same grid is left as it is (MAE resizes only when it changes).
    assert torch.allclose(interpolate_pos_table(table[0, 1:], (4, 4), (6, 6)), ref[0, 1:], atol=1e-6)
    assert torch.equal(interpolate_pos_table(table, (4, 4), (4, 4), num_prefix_tokens=1), table)


def test_2d_resize_of_maes_224_table_to_288() -> None:
    table = torch.from_numpy(mae_2d_sincos(D, 14, cls_token=True)).float()[None]
    ours = interpolate_pos_table(table, (14, 14), (18, 18), num_prefix_tokens=1)
    assert torch.allclose(ours, mae_interpolate(table, 1, 18), atol=1e-6)
    # Resizing is not rebuilding: the 18 x 18 sin-cos table is a different one.
    fresh = torch.from_numpy(mae_2d_sincos(D, 18)).float()
    assert (ours[0, 1:] - fresh).abs().max() > 0.1


def test_3d_resize_keeps_time_as_videomae() -> None:
    g = torch.Generator().manual_seed(1)
    table = torch.randn(1, 2 * 4 * 4, 8, generator=g)
    ours = interpolate_pos_table(table, (2, 4, 4), (2, 7, 7))
    assert ours.shape == (1, 2 * 49, 8)
    assert torch.allclose(ours, videomae_interpolate(table, 2, 4, 7), atol=1e-6)


def test_resize_rejects_what_the_references_cannot_do() -> None:
    table = torch.zeros(1, 2 * 16, 8)
    with pytest.raises(ValueError, match="T=2 -> T=4"):
        interpolate_pos_table(table, (2, 4, 4), (4, 4, 4))
    with pytest.raises(ValueError, match="rows"):
        interpolate_pos_table(table, (4, 4), (6, 6))
    with pytest.raises(ValueError, match="both"):
        interpolate_pos_table(table, (2, 4, 4), (6, 6))


# ------------------------------------------------------------------------ image classifier (MAE's rule)


def _mae_224() -> torch.nn.Module:
    torch.manual_seed(0)
    return mmmae.create_model("mae", size="vit_tiny_test", img_size=224, patch_size=16)


def _clf(**kw: object) -> torch.nn.Module:
    return mmmae.create_model("classifier", **{"size": "vit_tiny_test", "patch_size": 16, "num_classes": 3, **kw})


def test_classifier_at_288_gets_the_interpolated_224_table() -> None:
    clf = _clf(img_size=288)
    res = load_encoder_state(clf, _mae_224().state_dict(), source_grid=(14, 14))
    assert res.missing == [] and res.pos_embed == {"table": "learned", "source": "pretraining sin-cos",
                                                   "from_grid": [14, 14], "to_grid": [18, 18], "interpolated": True}
    # MAE: the checkpoint's (1, 1 + 196, D) table, cls row 0, resized to 18 x 18. mmmae's table has no
    # [cls] row (it adds no position to [cls], i.e. MAE's zero row), so compare the patch rows.
    ref = mae_interpolate(torch.from_numpy(mae_2d_sincos(D, 14, cls_token=True)).float()[None], 1, 18)
    pos = clf.encoder.pos_embed
    assert isinstance(pos, torch.nn.Parameter) and pos.requires_grad and pos.shape == (1, 324, D)
    assert torch.allclose(pos.detach(), ref[:, 1:], atol=1e-5)
    # MAE util/lr_decay.py: pos_embed is in no_weight_decay() and sits at layer 0 of the lr decay.
    assert "encoder.pos_embed" in clf.no_weight_decay()
    groups = param_groups(clf, 0.05, layer_decay=0.75)
    group = next(g for g in groups if "encoder.pos_embed" in g["names"])
    assert group["weight_decay"] == 0.0 and group["lr_scale"] == pytest.approx(0.75 ** (len(clf.encoder.blocks) + 1))
    assert torch.isfinite(clf({"image": torch.randn(1, 3, 288, 288)})["logits"]).all()


def test_classifier_at_the_same_grid_starts_from_the_pretraining_table() -> None:
    mae = _mae_224()
    clf = _clf(img_size=224, global_pool="token")  # keeps the final norm, so features compare 1:1
    missing, unexpected = load_encoder_weights(clf, mae.state_dict())
    assert missing == [] and unexpected == []
    assert torch.allclose(clf.encoder.pos_embed.detach()[0], torch.from_numpy(mae_2d_sincos(D, 14)).float(),
                          atol=1e-6)
    with torch.no_grad():
        x = torch.randn(2, 3, 224, 224)
        assert torch.allclose(clf.encoder.forward_features(x), mae.encoder.forward_features(x), atol=1e-5)


def test_a_stored_learned_table_is_resized_not_rebuilt() -> None:
    """Fine-tuning a fine-tuned classifier at a larger size: its trained table is the one resized."""
    g = torch.Generator().manual_seed(2)
    small = _clf(img_size=224)
    with torch.no_grad():
        small.encoder.pos_embed.add_(torch.randn(small.encoder.pos_embed.shape, generator=g))
    big = _clf(img_size=288)
    res = load_encoder_state(big, small.state_dict())
    assert res.pos_embed["source"] == "checkpoint" and res.pos_embed["from_grid"] == [14, 14]
    ref = mae_interpolate(small.encoder.pos_embed.detach(), 0, 18)
    assert torch.allclose(big.encoder.pos_embed.detach(), ref, atol=1e-5)


def test_linear_probe_keeps_the_learned_table_frozen() -> None:
    clf = _clf(img_size=288, linear_probe=True, global_pool="token")
    load_encoder_weights(clf, _mae_224().state_dict(), source_grid=(14, 14))
    assert isinstance(clf.encoder.pos_embed, torch.nn.Parameter) and not clf.encoder.pos_embed.requires_grad


def test_init_from_reads_the_pretraining_grid_from_the_runs_config(tmp_path: Path) -> None:
    run = tmp_path / "pre"
    run.mkdir()
    cfg = load_config("image_mae_tiny.yaml", ["model.img_size=224", "model.patch_size=16"])
    dump_config(cfg, run / "config.yaml")
    save_file(_mae_224().state_dict(), str(run / "model.safetensors"))
    clf = _clf(img_size=288)
    report = load_init_weights(clf, str(run / "model.safetensors"))
    assert report["missing"] == []
    assert report["pos_embed"]["from_grid"] == [14, 14] and report["pos_embed"]["to_grid"] == [18, 18]
    assert report["pos_embed"]["interpolated"] and report["pos_embed"]["grid_from"].endswith("config.yaml")
    json.dumps(report)  # the trainer writes it as init_report.json
    ref = mae_interpolate(torch.from_numpy(mae_2d_sincos(D, 14, cls_token=True)).float()[None], 1, 18)
    assert torch.allclose(clf.encoder.pos_embed.detach(), ref[:, 1:], atol=1e-5)
    # An explicit model.init_img_size wins over the run's config.
    clf = _clf(img_size=288, init_img_size=256)
    report = load_init_weights(clf, str(run / "model.safetensors"))
    assert report["pos_embed"]["from_grid"] == [16, 16] and report["pos_embed"]["grid_from"] == "model.init_img_size"


def test_pos_table_option_is_checked_and_fixed_rebuilds() -> None:
    with pytest.raises(ValueError, match="pos_table must be one of auto, learned, fixed"):
        _clf(img_size=224, pos_table="interp")
    clf = _clf(img_size=288, pos_table="fixed")
    res = load_encoder_state(clf, _mae_224().state_dict(), source_grid=(14, 14))
    assert res.pos_embed["table"] == "fixed" and not res.pos_embed["interpolated"]
    assert "pos_embed" not in dict(clf.encoder.named_parameters())
    assert torch.allclose(clf.encoder.pos_embed[0], torch.from_numpy(mae_2d_sincos(D, 18)).float(), atol=1e-6)


# ---------------------------------------------------------------------- video classifier (VideoMAE's rule)


def _video(name: str, img_size: int, num_frames: int, **kw: object) -> torch.nn.Module:
    common = {"size": "vit_tiny_test", "img_size": img_size, "patch_size": 8, "num_frames": num_frames,
              "tubelet_size": 2, "pos_embed": "sincos_1d", "cls_token": False, "qkv_bias": "qv"}
    torch.manual_seed(0)
    return mmmae.create_model(name, **{**common, **kw})


@pytest.mark.parametrize("img_size, num_frames", [(48, 4), (32, 8)])
def test_video_classifier_builds_its_own_table_at_a_new_resolution_or_frame_count(img_size: int,
                                                                                   num_frames: int) -> None:
    pre = _video("videomae", 32, 4)
    clf = _video("classifier", img_size, num_frames, num_classes=3, global_pool="avg")
    state = pre.state_dict()
    state["encoder.pos_embed"] = torch.randn(1, 2 * 16, D)  # a checkpoint that has a table: not used
    res = load_encoder_state(clf, state)
    assert res.missing == [] and "pos_embed" in res.unexpected
    assert res.pos_embed["table"] == "fixed" and not res.pos_embed["interpolated"]
    n = (num_frames // 2) * (img_size // 8) ** 2
    assert torch.allclose(clf.encoder.pos_embed[0], torch.from_numpy(videomae_sinusoid(n, D)).float(), atol=1e-5)
    assert "pos_embed" not in dict(clf.encoder.named_parameters())
