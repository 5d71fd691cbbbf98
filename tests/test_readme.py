"""The README's "Adding a method" block runs as written, and the method and source it registers train
through the config, the source spec and the method spec like the packaged ones."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from mmmae.config import ConfigError, load_config, model_cfg
from mmmae.data.collate import collate_dicts
from mmmae.data.registry import SOURCES, build_dataset
from mmmae.registry import MODELS, build_from_cfg, get_spec


def _adding_a_method_block() -> str:
    section = (ROOT / "README.md").read_text().split("## Adding a method", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section shows one python block"
    assert len(blocks[0].splitlines()) <= 40, "the contract fits in 40 lines"
    return blocks[0]


@pytest.fixture
def registered() -> None:
    exec(compile(_adding_a_method_block(), "README.md#adding-a-method", "exec"), {})
    try:
        yield
    finally:
        MODELS.pop("tiny_mae", None)
        SOURCES.pop("noise", None)


def test_the_readme_method_trains_from_a_config(registered: None, tmp_path: Path) -> None:
    yaml = tmp_path / "tiny.yaml"
    yaml.write_text("model: {name: tiny_mae, size: vit_tiny_test, img_size: 32, patch_size: 8}\n"
                    "data: {dataset: noise, length: 6, batch_size: 3}\n")
    cfg = load_config(yaml)
    mcfg = model_cfg(cfg.model)
    assert (mcfg.embed_dim, mcfg.mask_ratio, cfg.data.length) == (32, 0.75, 6)
    model = build_from_cfg("tiny_mae", mcfg)
    items = build_dataset(cfg, "train", mcfg)
    batch = collate_dicts([items[i] for i in range(3)])
    batch.update(get_spec("tiny_mae").make_mask_fn(mcfg)(3, torch.Generator().manual_seed(0)))
    assert batch["mask"].shape == (3, 16) and int(batch["mask"].sum()) == 3 * 12  # 75% of 16 patches
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert out["pred"].shape == (3, 16, 8 * 8 * 3) and losses[-1] < losses[0]
    # The typed blocks: a key the source lacks, and a source the method does not take, are refused.
    with pytest.raises(ConfigError, match="data.lenght.*did you mean data.length"):
        load_config(yaml, ["data.lenght=3"])
    other = tmp_path / "video.yaml"
    other.write_text("model: {name: tiny_mae, size: vit_tiny_test}\ndata: {dataset: video_list}\n")
    with pytest.raises(ConfigError, match="'tiny_mae' takes image input, but data.dataset='video_list' yields video"):
        load_config(other)
