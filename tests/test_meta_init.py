"""Every registered model builds on the meta device (no memory, no init) and materialises into
exactly the model an eager build gives with the same seed: fixed tables rebuilt, every weight
initialised (nothing left as uninitialised memory)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mmmae
from mmmae.registry import get_spec, materialize


def _tiny_overrides(name: str) -> dict:
    fields = {f.name: f for f in dataclasses.fields(get_spec(name).cfg_cls)}
    kw: dict = {"img_size": 32, "patch_size": 8}
    if "mask_patch_size" in fields:
        kw["mask_patch_size"] = 16
    if "num_classes" in fields:
        kw["num_classes"] = 5
    if fields["num_frames"].default > 0:
        kw["num_frames"] = 4
    return kw


def _assert_meta_equals_eager(name: str, kw: dict, what: str) -> None:
    torch.manual_seed(0)
    eager = mmmae.create_model(name, size="vit_tiny_test", **kw)
    meta = mmmae.create_model(name, size="vit_tiny_test", device="meta", **kw)
    assert all(p.is_meta for p in meta.parameters()) and all(b.is_meta for b in meta.buffers())
    torch.manual_seed(0)
    materialize(meta, "cpu")
    eager_state, meta_state = eager.state_dict(), meta.state_dict()
    assert eager_state.keys() == meta_state.keys()
    for k, v in eager_state.items():
        assert torch.equal(v, meta_state[k]), f"{what}: {k} differs after materialize"
    meta_buffers = dict(meta.named_buffers())
    for k, v in eager.named_buffers():
        assert torch.equal(v, meta_buffers[k]), f"{what}: fixed buffer {k} was not rebuilt"


@pytest.mark.parametrize("name", mmmae.list_models())
def test_meta_build_then_materialize_equals_eager_build(name: str) -> None:
    _assert_meta_equals_eager(name, _tiny_overrides(name), name)


# The structural options of each method (the ones that add, drop or reshape weights and tables), each
# built on its own: meta + materialize must equal the eager build for every one, not only the defaults.
_COMMON = [("qkv_bias", "qv"), ("qkv_bias", "none"), ("init_values", 0.1), ("drop_path_rate", 0.1)]
_IMAGE_TRUNK = [("cls_token", False), ("pos_embed", "sincos_1d"), ("pos_embed", "none"),
                ("rel_pos_bias", "shared"), ("rel_pos_bias", "block")]
_VIDEO_TRUNK = [("cls_token", False), ("pos_embed", "sincos_1d")]
VARIANTS: dict[str, list[tuple[str, object]]] = {
    "mae": _COMMON + _IMAGE_TRUNK + [("target", "hog"), ("norm_pix_loss", False)],
    "simmim": _COMMON + _IMAGE_TRUNK + [("norm_pix_loss", False)],
    "bevt_spatial": _COMMON + _IMAGE_TRUNK + [("target", "hog")],
    "classifier": _COMMON + _IMAGE_TRUNK + [("global_pool", "token"), ("linear_probe", True),
                                            ("pos_table", "learned"), ("num_frames", 4)],
    "videomae": _COMMON + _VIDEO_TRUNK + [("norm_pix_loss", False)],
    "omnimae": _COMMON + _VIDEO_TRUNK + [("norm_pix_loss", False)],
    "bevt": _COMMON + _VIDEO_TRUNK + [("pos_embed", "none"), ("target", "hog")],
    "m3ae": _COMMON + [("global_pool", "token"), ("norm_pix_loss", False)],
    "retrieval": _COMMON + [("global_pool", "token")],
}


def test_every_method_has_its_variants_listed() -> None:
    assert set(VARIANTS) == set(mmmae.list_models())


@pytest.mark.parametrize("name,key,value", [(n, k, v) for n, vs in VARIANTS.items() for k, v in vs])
def test_meta_equals_eager_for_every_variant(name: str, key: str, value: object) -> None:
    kw = {**_tiny_overrides(name), key: value}
    if key == "rel_pos_bias":
        kw["pos_embed"] = "none"  # BEiT/SimMIM: relative positions instead of an absolute table
    _assert_meta_equals_eager(name, kw, f"{name} {key}={value}")
