"""The model contract, over every registered model (timm-style).

Models are built generically: ``size="vit_tiny_test"`` plus small overrides picked by which fields the
model's config dataclass has; the input batch is the method spec's ``example`` (its registered
``example_batch``, else random pixels of its input kind; masks from its ``make_mask_fn``, as the data
pipeline makes them).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import mmmae
from mmmae.encoder import MaskedEncoder
from mmmae.heads import ClassifierCfg, EncoderCfg, load_encoder_weights, vision_encoder_state
from mmmae.layers import patchify, patchify_video, unpatchify, unpatchify_video
from mmmae.masking import check_mask, random_mask
from mmmae.registry import build_from_cfg, get_spec, resolve_model_cfg

MODELS = mmmae.list_models()
B = 2
SIZE = "vit_tiny_test"
# Small values for whichever of these fields a model's config has.
SMALL: dict[str, Any] = {"img_size": 32, "patch_size": 8, "mask_patch_size": 16, "num_classes": 5,
                         "drop_path_rate": 0.0, "min_num_patches": 2}
# BEiT's block-wise masks (BEVT) hide a count that varies by sample; they only feed mask tokens.
VARIABLE_COUNT = {"bevt", "bevt_spatial"}


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def small_overrides(name: str) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(get_spec(name).cfg_cls)}
    out = {k: v for k, v in SMALL.items() if k in fields}
    # num_frames = 0 means "image model" in EncoderCfg: only shrink it where the model is a video model.
    if "num_frames" in fields and (_field_default(fields["num_frames"]) or 0) > 0:
        out["num_frames"] = 4
        if "tubelet_size" in fields:
            out["tubelet_size"] = 2
    return out


def build(name: str, seed: int = 0, **extra: Any) -> tuple[nn.Module, Any]:
    cfg = resolve_model_cfg(name, SIZE, **{**small_overrides(name), **extra})
    torch.manual_seed(seed)
    return build_from_cfg(name, cfg), cfg


def _pixel_key(batch: dict[str, torch.Tensor]) -> str | None:
    return "video" if "video" in batch else "image" if "image" in batch else None


def make_batch(name: str, model: nn.Module, cfg: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """The method's own example batch (its spec: inputs, masks, labels), as the engine's tools use it."""
    return get_spec(name).example(cfg, B, torch.Generator().manual_seed(seed))


def run(name: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    try:
        return model(batch)
    except KeyError as e:
        if e.args and e.args[0] not in batch:
            pytest.fail(f"{name} needs batch key {e.args[0]!r}; register an example_batch with the method")
        raise


def setup(name: str, seed: int = 0, **extra: Any) -> tuple[nn.Module, Any, dict[str, torch.Tensor]]:
    model, cfg = build(name, seed, **extra)
    return model, cfg, make_batch(name, model, cfg, seed)


def set_grad_checkpointing(model: nn.Module, enable: bool) -> None:
    fn = getattr(model, "set_grad_checkpointing", None) or model.encoder.set_grad_checkpointing  # type: ignore[union-attr]
    fn(enable)


def perturb_hidden_patches(model: nn.Module, batch: dict[str, torch.Tensor], mask: torch.Tensor,
                           value: float | None = None) -> dict[str, torch.Tensor]:
    """A copy of ``batch`` whose pixels inside the hidden patches are replaced (random, or ``value``)."""
    key = _pixel_key(batch)
    pe = model.encoder.patch_embed  # type: ignore[union-attr]
    x = batch[key]
    if key == "video":
        t = pe.tubelet_size
        p = patchify_video(x, pe.patch_size, t).clone()
        p[mask] = torch.randn_like(p[mask]) * 5 + 3 if value is None else value
        y = unpatchify_video(p, pe.patch_size, t, pe.grid_size, x.shape[1])
    else:
        p = patchify(x, pe.patch_size).clone()
        p[mask] = torch.randn_like(p[mask]) * 5 + 3 if value is None else value
        y = unpatchify(p, pe.patch_size, pe.grid_size, x.shape[1])
    return {**batch, key: y}


# ----------------------------------------------------------------------------------------------------
# registry


def test_registry_lists_the_base_models() -> None:
    assert {"mae", "simmim", "classifier", "videomae", "omnimae", "bevt_spatial", "bevt", "m3ae", "retrieval"} <= set(MODELS)


def test_unknown_model_name_lists_registered_models() -> None:
    with pytest.raises(KeyError) as e:
        mmmae.create_model("maee")
    msg = str(e.value)
    assert "'mae'" in msg and "did you mean" in msg
    for name in MODELS:
        assert name in msg


def test_unknown_override_names_nearest_key() -> None:
    with pytest.raises(KeyError) as e:
        mmmae.create_model("mae", size=SIZE, mask_ratoi=0.5)
    assert "mask_ratoi" in str(e.value) and "did you mean 'mask_ratio'" in str(e.value)


@pytest.mark.parametrize("name", MODELS)
def test_unknown_override_names_nearest_key_every_model(name: str) -> None:
    fields = [f.name for f in dataclasses.fields(get_spec(name).cfg_cls)]
    key = "embed_dim" if "embed_dim" in fields else fields[0]
    typo = key[:-2] + key[-1] + key[-2]  # swap the last two letters
    with pytest.raises(KeyError) as e:
        mmmae.create_model(name, size=SIZE, **{typo: 1})
    assert f"did you mean {key!r}" in str(e.value)


def test_unknown_size_preset() -> None:
    with pytest.raises(ValueError, match="vit_tiny_test"):
        mmmae.create_model("mae", size="vit_tiny_tset")


# ----------------------------------------------------------------------------------------------------
# forward / backward


@pytest.mark.parametrize("name", MODELS)
def test_finite_loss_and_every_parameter_gets_a_gradient(name: str) -> None:
    model, _, batch = setup(name)
    model.train()
    out = run(name, model, batch)
    loss = out["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss), f"{name}: loss {loss}"
    parts = [k for k in out if k.endswith("_loss")]
    assert parts, f"{name}: no named *_loss parts in {sorted(out)}"
    for k in parts:
        assert not out[k].requires_grad, f"{name}: {k} should be detached for logging"
    for k in ("pred", "mask"):
        if k in out:
            assert not out[k].requires_grad, f"{name}: {k} should be detached"
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: parameters without a gradient: {missing}"
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p.grad).all()]
    assert not bad, f"{name}: non-finite gradients: {bad}"


@pytest.mark.parametrize("name", MODELS)
def test_grad_checkpointing_leaves_outputs_unchanged(name: str) -> None:
    model, _, batch = setup(name)

    def outputs() -> dict[str, torch.Tensor]:
        out = run(name, model, batch)
        return {k: v.detach().clone() for k, v in out.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}

    model.eval()
    with torch.no_grad():
        ref = outputs()
        set_grad_checkpointing(model, True)
        got = outputs()
        set_grad_checkpointing(model, False)
    for k in ref:
        assert torch.allclose(ref[k], got[k], atol=1e-6), f"{name}: eval output {k} changed"

    # Checkpointing only acts in training: compare loss and gradients there too (no dropout / drop path).
    model.train()

    def loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = run(name, model, batch)["loss"]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss0, grads0 = loss_and_grads()
    set_grad_checkpointing(model, True)
    calls = []
    blocks = [m for m in model.modules() if isinstance(m, mmmae.layers.Block)]
    # A pre-hook: non-reentrant checkpointing stops its recomputation early, so post-hooks may not fire.
    hooks = [blk.register_forward_pre_hook(lambda *_: calls.append(1)) for blk in blocks]
    loss1, grads1 = loss_and_grads()
    for h in hooks:
        h.remove()
    set_grad_checkpointing(model, False)
    depth = len(model.encoder.blocks)  # type: ignore[union-attr]
    # Checkpointed encoder blocks run their forward again during backward: the flag took effect.
    assert len(calls) >= len(blocks) + depth, f"{name}: checkpointing did not recompute the encoder blocks"
    assert torch.allclose(loss0, loss1, atol=1e-6)
    assert grads0.keys() == grads1.keys()
    for n in grads0:
        assert torch.allclose(grads0[n], grads1[n], atol=1e-6, rtol=1e-5), f"{name}: grad of {n} changed"


# ----------------------------------------------------------------------------------------------------
# pretraining -> fine-tuning


@pytest.mark.parametrize("name", [n for n in MODELS if n != "classifier"])
def test_pretrained_encoder_loads_into_classifier(name: str) -> None:
    model, cfg = build(name)
    state = model.state_dict()
    if not any(k.startswith("encoder.") for k in state):
        pytest.skip(f"{name} has no encoder.* weights")
    enc_fields = {f.name for f in dataclasses.fields(EncoderCfg)} & {f.name for f in dataclasses.fields(cfg)}
    clf_fields = {f.name for f in dataclasses.fields(ClassifierCfg)}
    same = {k: getattr(cfg, k) for k in enc_fields if k in clf_fields}
    clf = mmmae.create_model("classifier", num_classes=5, **same)
    missing, unexpected = load_encoder_weights(clf, state)
    assert missing == [], f"{name}: classifier encoder keys missing from the checkpoint: {missing}"
    clf_state = clf.encoder.state_dict()
    # What a vision encoder takes from the checkpoint (multimodal encoders fold their image type
    # embedding into the patch bias; everything else is copied as is).
    expected = vision_encoder_state(state)
    if "pos_embed" not in expected and isinstance(clf.encoder.pos_embed, torch.nn.Parameter):
        # A learned table (MAE's fine-tuning) starts from the fixed table the encoder was pretrained with.
        expected["pos_embed"] = model.encoder.pos_embed
    for k, v in clf_state.items():
        assert torch.equal(v, expected[k]), f"{name}: encoder.{k} did not load"
        if f"encoder.{k}" in state and not (k == "patch_embed.proj.bias" and "encoder.type_embed.image" in state):
            assert torch.equal(v, state[f"encoder.{k}"]), f"{name}: encoder.{k} changed on the way"
    # The fine-tune model runs on the same kind of input.
    batch = make_batch(name, model, cfg)
    key = _pixel_key(batch)
    if key is not None:
        out = clf({key: batch[key], "label": torch.tensor([0, 1])})
        assert out["logits"].shape == (B, 5) and torch.isfinite(out["loss"])


def test_load_encoder_weights_rejects_state_without_encoder() -> None:
    clf = mmmae.create_model("classifier", size=SIZE, img_size=32, patch_size=8, num_classes=3)
    with pytest.raises(KeyError, match="encoder"):
        load_encoder_weights(clf, {"head.weight": torch.zeros(1)})


# ----------------------------------------------------------------------------------------------------
# masks


def _needs_mask(name: str, batch: dict[str, torch.Tensor]) -> None:
    if "mask" not in batch:
        pytest.skip(f"{name} takes no mask")


@pytest.mark.parametrize("name", MODELS)
def test_model_uses_exactly_the_given_mask(name: str) -> None:
    model, cfg, batch = setup(name)
    _needs_mask(name, batch)
    model.eval()
    with torch.no_grad():
        make_mask = get_spec(name).make_mask_fn
        for seed in (1, 2):
            if make_mask is not None:
                other = make_mask(cfg)(B, torch.Generator().manual_seed(seed))
            else:  # a different mask with the same per-sample count
                other = {"mask": batch["mask"].roll(seed, dims=1)}
            b = {**batch, **other}
            out = run(name, model, b)
            assert torch.equal(out["mask"], b["mask"]), f"{name} did not use the given mask"
        # Without a mask the model draws its own, with a common hidden count (BEiT's masks excepted).
        no_mask = {k: v for k, v in batch.items() if k != "mask"}
        out = run(name, model, no_mask)
        check_mask(out["mask"], equal_counts=name not in VARIABLE_COUNT)


@pytest.mark.parametrize("name", MODELS)
def test_hidden_patch_pixels_do_not_change_pred(name: str) -> None:
    model, _, batch = setup(name)
    _needs_mask(name, batch)
    key = _pixel_key(batch)
    pe = getattr(getattr(model, "encoder", None), "patch_embed", None)
    if key is None or pe is None or batch["mask"].shape[1] != pe.num_patches:
        pytest.skip(f"{name}: mask does not cover the pixel patches")
    model.eval()
    mask = batch["mask"]
    changed = perturb_hidden_patches(model, batch, mask)
    assert not torch.equal(changed[key], batch[key])
    # Visible patches are untouched.
    flat = patchify_video if key == "video" else patchify
    args = (pe.patch_size, pe.tubelet_size) if key == "video" else (pe.patch_size,)
    assert torch.equal(flat(changed[key], *args)[~mask], flat(batch[key], *args)[~mask])
    with torch.no_grad():
        a = run(name, model, batch)
        b = run(name, model, changed)
    # MAE drops hidden tokens; SimMIM replaces them with the mask token: either way the model never
    # sees hidden pixels, so its prediction is the same (only the target, hence the loss, differs).
    assert torch.allclose(a["pred"], b["pred"], atol=1e-6), f"{name}: hidden pixels leaked into pred"
    assert not torch.allclose(a["loss"], b["loss"])


def test_mask_token_replacement_ignores_nonfinite_hidden_tokens() -> None:
    torch.manual_seed(0)
    enc = MaskedEncoder(16, 1, 2, mask_token=True)
    enc.init_weights()
    tokens = torch.randn(2, 6, 16)
    mask = torch.tensor([[True, False, True, False, False, False], [False, False, False, True, True, False]])
    ref = enc(tokens, mask=mask)
    bad = tokens.clone()
    bad[mask] = float("nan")
    assert torch.allclose(enc(bad, mask=mask), ref)


def test_mae_ignores_nonfinite_hidden_pixels() -> None:
    # MAE drops hidden tokens before the blocks, so even NaN pixels there cannot reach pred.
    model, _, batch = setup("mae")
    model.eval()
    bad = perturb_hidden_patches(model, batch, batch["mask"], value=float("nan"))
    with torch.no_grad():
        assert torch.allclose(model(bad)["pred"], model(batch)["pred"], atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_mask_with_unequal_counts_is_rejected(name: str) -> None:
    model, _, batch = setup(name)
    _needs_mask(name, batch)
    mask = batch["mask"].clone()
    row = mask[0]
    row[(~row).nonzero()[0, 0]] = True  # hide one more token in sample 0 only
    if name in VARIABLE_COUNT:  # mask tokens replace hidden tokens in place: any count per sample works
        assert torch.equal(run(name, model, {**batch, "mask": mask})["mask"], mask)
    else:
        with pytest.raises(ValueError, match="same number"):
            run(name, model, {**batch, "mask": mask})
    with pytest.raises(ValueError, match="bool"):
        run(name, model, {**batch, "mask": batch["mask"].long()})


def test_encoder_rejects_ids_keep_and_mask_together() -> None:
    enc = MaskedEncoder(16, 1, 2, mask_token=True)
    mask = random_mask(2, 6, 0.5)
    with pytest.raises(ValueError, match="not both"):
        enc(torch.randn(2, 6, 16), ids_keep=torch.zeros(2, 3, dtype=torch.long), mask=mask)
    with pytest.raises(ValueError, match="mask token"):
        MaskedEncoder(16, 1, 2)(torch.randn(2, 6, 16), mask=mask)


# ----------------------------------------------------------------------------------------------------
# input validation


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("with_mask", [False, True])
def test_wrong_input_shape_names_expected_and_given(name: str, with_mask: bool) -> None:
    model, cfg, batch = setup(name)
    key = _pixel_key(batch)
    if key is None:
        pytest.skip(f"{name} takes no pixels")
    if not with_mask:
        batch = {k: v for k, v in batch.items() if k != "mask"}
    elif "mask" not in batch:
        pytest.skip(f"{name} takes no mask")
    x = batch[key]
    expected = ", ".join(map(str, x.shape[1:]))
    p = model.encoder.patch_embed.patch_size[0]  # type: ignore[union-attr]
    bad_size = list(x.shape)
    bad_size[-1] += p  # still a multiple of the patch size: only the model can object
    bad_chans = list(x.shape)
    bad_chans[1] = 1
    if key == "image":
        other = [B, x.shape[1], 2, *x.shape[-2:]]  # a clip given to an image model
    else:
        other = [B, x.shape[1], x.shape[2] + 2, *x.shape[-2:]]  # the wrong number of frames
    for shape in (bad_size, bad_chans, other):
        with pytest.raises(ValueError) as e:
            run(name, model, {**batch, key: torch.randn(*shape)})
        msg = str(e.value)
        assert expected in msg and str(tuple(shape)) in msg, f"{name}: unhelpful error for {tuple(shape)}: {msg}"


# ----------------------------------------------------------------------------------------------------
# the encoder interface (timm)


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates(name: str) -> None:
    model, cfg, batch = setup(name)
    key = _pixel_key(batch)
    enc = getattr(model, "encoder", None)
    if key is None or enc is None or not hasattr(enc, "forward_intermediates"):
        pytest.skip(f"{name} has no pixel encoder")
    enc.eval()
    x = batch[key]
    depth = cfg.depth
    n, d, prefix = enc.num_patches, enc.num_features, enc.num_prefix_tokens
    assert d == cfg.embed_dim
    with torch.no_grad():
        final, feats = enc.forward_intermediates(x)
        assert len(feats) == depth
        for f in feats:
            assert f.shape == (B, n, d)
        assert torch.allclose(final, enc.forward_features(x), atol=1e-6)
        assert len(enc.forward_intermediates(x, depth, intermediates_only=True)) == depth
        assert len(enc.forward_intermediates(x, list(range(depth)), intermediates_only=True)) == depth
        last = enc.forward_intermediates(x, 1, norm=True, intermediates_only=True)
        assert len(last) == 1
        assert torch.allclose(last[0], enc.forward_features(x)[:, prefix:], atol=1e-6)
        assert torch.allclose(enc.forward_intermediates(x, [-1], intermediates_only=True)[0], feats[-1])
        nchw = enc.forward_intermediates(x, [0], output_fmt="NCHW", intermediates_only=True)[0]
        assert nchw.shape == (B, d, *enc.grid_size)
        assert torch.allclose(nchw.flatten(2).transpose(1, 2), feats[0])


@pytest.mark.parametrize("name", MODELS)
def test_no_weight_decay_names_real_parameters(name: str) -> None:
    model, _ = build(name)
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert names, f"{name}: no_weight_decay() is empty"
    unknown = sorted(set(names) - set(params))
    assert not unknown, f"{name}: no_weight_decay() names non-parameters: {unknown}"
    enc = getattr(model, "encoder", None)
    if enc is not None and hasattr(enc, "no_weight_decay"):
        enc_params = dict(enc.named_parameters())
        assert set(enc.no_weight_decay()) <= set(enc_params)


def test_mae_hog_target() -> None:
    model, _, batch = setup("mae", target="hog")
    out = model(batch)
    assert out["pred"].shape == (B, 16, 3 * 9)  # 8-px patches: one 8x8 cell, 9 bins, per channel
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    with pytest.raises(ValueError, match="target"):
        build("mae", target="hug")


def test_video_encoder_names_the_shapes_it_takes() -> None:
    model = mmmae.create_model("videomae", size="vit_tiny_test", img_size=32, patch_size=8, num_frames=4)
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\) or videos of shape \(B, 3, 4, 32, 32\), got \(1, 3, 48, 48\)"):
        model.encoder.forward_features(torch.randn(1, 3, 48, 48))


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_and_pickle_round_trips(name: str, tmp_path: Path) -> None:
    """A saved state dict loads strictly into a fresh build (other seed) and a pickled model unpickles;
    both give the original's outputs on the same batch."""
    import pickle
    model, cfg, batch = setup(name, seed=0)
    model.eval()
    torch.save(model.state_dict(), tmp_path / "state.pt")
    fresh, _ = build(name, seed=1)
    fresh.eval()
    first = next(n for n, p in model.named_parameters() if p.dim() > 1)
    assert not torch.equal(fresh.get_parameter(first), model.get_parameter(first))  # another draw before loading
    result = fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    unpickled = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        torch.manual_seed(3)
        want = run(name, model, batch)
        for other in (fresh, unpickled):
            torch.manual_seed(3)
            got = run(name, other, batch)
            assert set(got) == set(want)
            for k, v in want.items():
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    assert torch.equal(got[k], v), (name, k)
