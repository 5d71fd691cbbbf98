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


@pytest.mark.parametrize("name", mmmae.list_models())
def test_meta_build_then_materialize_equals_eager_build(name: str) -> None:
    kw = _tiny_overrides(name)
    torch.manual_seed(0)
    eager = mmmae.create_model(name, size="vit_tiny_test", **kw)
    meta = mmmae.create_model(name, size="vit_tiny_test", device="meta", **kw)
    assert all(p.is_meta for p in meta.parameters()) and all(b.is_meta for b in meta.buffers())
    torch.manual_seed(0)
    materialize(meta, "cpu")
    eager_state, meta_state = eager.state_dict(), meta.state_dict()
    assert eager_state.keys() == meta_state.keys()
    for k, v in eager_state.items():
        assert torch.equal(v, meta_state[k]), f"{name}: {k} differs after materialize"
    meta_buffers = dict(meta.named_buffers())
    for k, v in eager.named_buffers():
        assert torch.equal(v, meta_buffers[k]), f"{name}: fixed buffer {k} was not rebuilt"
