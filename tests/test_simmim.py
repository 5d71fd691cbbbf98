"""SimMIM's official ViT recipe: BEiT's relative position bias in the shared attention (per block and
shared), layer scale, q/v biases, no absolute table; the SimMIM init, loss and configs.

Reference figures come from microsoft/SimMIM (models/vision_transformer.py, models/simmim.py,
config.py, configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml), whose
``RelativePositionBias`` is BEiT's (microsoft/unilm beit/modeling_finetune.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import mmmae
from mmmae.config import effective_lr, load_config, model_cfg
from mmmae.encoder import MaskedEncoder, VisionEncoder
from mmmae.layers import Attention, Block, RelativePositionBias, relative_position_index, unpatchify
from mmmae.registry import get_spec, materialize

TINY = {"size": "vit_tiny_test", "img_size": 32, "patch_size": 8, "mask_patch_size": 16, "drop_path_rate": 0.0}


def _encoder(rel_pos_bias: str, attn_impl: str = "math", **kw: object) -> VisionEncoder:
    enc = VisionEncoder(32, 8, 3, 32, 2, 2, pos_embed="none", rel_pos_bias=rel_pos_bias, qkv_bias="qv",
                        init_values=0.1, mask_token=True, attn_impl=attn_impl, **kw)  # type: ignore[arg-type]
    enc.init_weights()
    return enc


def _randomize_tables(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------------------------------
# the relative position index (BEiT's layout)


def test_relative_position_index_2x2_matches_beit_formula() -> None:
    # BEiT / SimMIM RelativePositionBias on a 2x2 window: patches p0=(0,0), p1=(0,1), p2=(1,0),
    # p3=(1,1) (row-major); pair (i, j) -> (yi - yj + 1) * 3 + (xi - xj + 1); the table has
    # 3 * 3 + 3 = 12 rows; row 0 ([cls] as query) is 12 - 3 = 9, column 0 is 10, (cls, cls) 11.
    expected = torch.tensor([
        [11, 9, 9, 9, 9],
        [10, 4, 3, 1, 0],
        [10, 5, 4, 2, 1],
        [10, 7, 6, 4, 3],
        [10, 8, 7, 5, 4],
    ])
    index = relative_position_index((2, 2))
    assert index.dtype == torch.long
    assert torch.equal(index, expected)
    assert RelativePositionBias((2, 2), 3).relative_position_bias_table.shape == (12, 3)


def test_relative_position_index_non_square_grid() -> None:
    # 2x3 window: (2*2-1) * (2*3-1) + 3 = 18 rows; the row offset is multiplied by 2*Ww-1 = 5.
    # Token of patch (y, x) is 1 + 3y + x.
    index = relative_position_index((2, 3))
    assert index.shape == (7, 7)
    assert index[1, 6] == 0  # (0,0) -> (1,2): dy = -1 + 1 = 0, dx = -2 + 2 = 0
    assert index[6, 1] == 14  # (1,2) -> (0,0): dy = 2, dx = 4 -> 2 * 5 + 4
    assert index[2, 4] == 3  # (0,1) -> (1,0): dy = 0, dx = 1 + 2 = 3
    assert index[0, 3] == 15 and index[3, 0] == 16 and index[0, 0] == 17
    # Every one of the 3 * 5 patch offsets is used.
    assert sorted(index[1:, 1:].unique().tolist()) == list(range(15))


def test_official_vit_base_table_shape() -> None:
    # ViT-B/16 at 224 px: a 14x14 grid -> (27 * 27 + 3, 12) = (732, 12), as the official checkpoint's
    # encoder.rel_pos_bias.relative_position_bias_table.
    model = mmmae.create_model("simmim", size="vit_base", device="meta")
    state = model.state_dict()
    assert state["encoder.rel_pos_bias.relative_position_bias_table"].shape == (732, 12)
    assert "encoder.pos_embed" not in state and not any(k.endswith("qkv.bias") for k in state)
    assert state["encoder.blocks.0.attn.q_bias"].shape == (768,) and "encoder.blocks.0.attn.v_bias" in state
    assert state["encoder.blocks.11.ls1.gamma"].shape == (768,)
    assert not any("relative_position_index" in k for k in state)  # rebuilt, never loaded (fixed buffer)
    assert model.encoder.rel_pos_bias.relative_position_index.shape == (197, 197)


# ----------------------------------------------------------------------------------------------------
# the bias in attention


def test_relative_bias_changes_attention_and_zero_table_is_no_bias() -> None:
    torch.manual_seed(0)
    own = Attention(16, 2, qkv_bias="qv", attn_impl="math", window_size=(2, 2))
    plain = Attention(16, 2, qkv_bias="qv", attn_impl="math")
    plain.load_state_dict({k: v for k, v in own.state_dict().items() if "relative_position" not in k})
    x = torch.randn(2, 5, 16)
    assert torch.allclose(own(x), plain(x), atol=1e-6)  # the table starts at zero (BEiT / SimMIM)
    _randomize_tables(own)
    assert not torch.allclose(own(x), plain(x), atol=1e-3)
    # The table's entry for (query i, key j) is added to the logits: the same as an explicit bias.
    table, index = own.relative_position_bias_table, relative_position_index((2, 2))
    bias = torch.stack([table[index, h] for h in range(2)])[None]  # (1, heads, 5, 5)
    assert torch.allclose(own(x), plain(x, bias), atol=1e-5)


def test_attention_rejects_a_sequence_the_table_does_not_cover() -> None:
    a = Attention(16, 2, window_size=(2, 2))
    with pytest.raises(ValueError, match=r"\[cls\] \+ 4 patches; got 4 tokens"):
        a(torch.randn(1, 4, 16))


def test_shared_vs_per_block_parameter_counts() -> None:
    # 32-px images, 8-px patches: a 4x4 grid -> 7 * 7 + 3 = 52 table rows, 2 heads, depth 2.
    rows, heads, depth = 52, 2, 2
    n_none = sum(p.numel() for p in _encoder("none").parameters())
    shared, block = _encoder("shared"), _encoder("block")
    assert sum(p.numel() for p in shared.parameters()) - n_none == rows * heads
    assert sum(p.numel() for p in block.parameters()) - n_none == depth * rows * heads
    assert [k for k in shared.state_dict() if "relative" in k] == ["rel_pos_bias.relative_position_bias_table"]
    assert [k for k in block.state_dict() if "relative" in k] == [
        f"blocks.{i}.attn.relative_position_bias_table" for i in range(depth)]
    assert shared.rel_pos_bias is not None and not shared.use_rel_pos_bias
    assert block.rel_pos_bias is None and block.use_rel_pos_bias


@pytest.mark.parametrize("rel_pos_bias", ["shared", "block"])
@pytest.mark.parametrize("hide", ["mask", "ids_keep", "none"])
def test_sdpa_and_math_kernels_agree_with_the_bias(rel_pos_bias: str, hide: str) -> None:
    torch.manual_seed(0)
    a = _encoder(rel_pos_bias, "sdpa")
    b = _encoder(rel_pos_bias, "math")
    _randomize_tables(a)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    kw: dict = {}
    if hide == "mask":
        kw["mask"] = torch.zeros(2, 16, dtype=torch.bool)
        kw["mask"][:, [0, 5, 6, 11]] = True
    elif hide == "ids_keep":
        kw["ids_keep"] = torch.stack([torch.randperm(16)[:6] for _ in range(2)])
    ya, yb = a(x, **kw), b(x, **kw)
    assert torch.allclose(ya, yb, atol=1e-5)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        if na == "mask_token" and hide != "mask":
            continue  # nothing is replaced by it
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5), na
    tables = [p for n, p in a.named_parameters() if n.endswith("relative_position_bias_table")]
    assert tables and all(p.grad.abs().sum() > 0 for p in tables)


@pytest.mark.parametrize("rel_pos_bias", ["shared", "block"])
@pytest.mark.parametrize("cls_token", [True, False])
def test_kept_tokens_take_their_own_grid_positions(rel_pos_bias: str, cls_token: bool) -> None:
    # With positions only from the relative bias, keeping every token in a shuffled order must give the
    # full-grid outputs in that order: each kept token looks its bias up by its grid position.
    torch.manual_seed(0)
    enc = _encoder(rel_pos_bias, cls_token=cls_token).eval()
    _randomize_tables(enc)
    x = torch.randn(2, 3, 32, 32)
    perm = torch.stack([torch.randperm(16) for _ in range(2)])
    p = enc.num_prefix_tokens
    with torch.no_grad():
        full = enc(x)
        shuffled = enc(x, ids_keep=perm)
    expected = torch.gather(full[:, p:], 1, perm[..., None].expand(-1, -1, full.shape[-1]))
    assert torch.allclose(shuffled[:, p:], expected, atol=1e-5)
    if cls_token:
        assert torch.allclose(shuffled[:, 0], full[:, 0], atol=1e-5)
    # The bias is what places the tokens: a zero table would see only a bag of patches.
    assert not torch.allclose(full, _encoder(rel_pos_bias, cls_token=cls_token).eval()(x), atol=1e-3)


def test_bias_survives_grad_checkpointing() -> None:
    torch.manual_seed(0)
    enc = _encoder("shared").train()
    _randomize_tables(enc)
    x = torch.randn(2, 3, 32, 32)
    enc(x).pow(2).sum().backward()
    ref = enc.rel_pos_bias.relative_position_bias_table.grad.clone()
    enc.zero_grad(set_to_none=True)
    enc.set_grad_checkpointing(True)
    enc(x).pow(2).sum().backward()
    assert torch.allclose(enc.rel_pos_bias.relative_position_bias_table.grad, ref, atol=1e-6)


def test_block_passes_its_window_to_attention() -> None:
    blk = Block(16, 2, window_size=(2, 3))
    assert blk.attn.relative_position_bias_table.shape == (3 * 5 + 3, 2)  # (2*2-1) * (2*3-1) + 3 rows
    assert blk.attn.relative_position_index.shape == (7, 7)


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="rel_pos_bias must be 'none', 'shared' or 'block', got 'global'"):
        MaskedEncoder(16, 1, 2, rel_pos_bias="global")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs rel_pos_grid"):
        MaskedEncoder(16, 1, 2, rel_pos_bias="shared")
    with pytest.raises(ValueError, match="video encoder takes rel_pos_bias='none', got 'shared'"):
        VisionEncoder(32, 8, 3, 16, 1, 2, num_frames=4, rel_pos_bias="shared")
    with pytest.raises(ValueError, match="pos_embed must be 'sincos', 'sincos_1d' or 'none', got 'learned'"):
        VisionEncoder(32, 8, 3, 16, 1, 2, pos_embed="learned")
    with pytest.raises(ValueError, match=r"4x4 token grid \(1 \+ 16 tokens\); got 9 tokens"):
        _encoder("shared").forward_tokens(torch.randn(1, 8, 32))
    with pytest.raises(ValueError, match="weight_init"):
        mmmae.create_model("simmim", **{**TINY, "weight_init": "beit"})
    with pytest.raises(ValueError, match="rel_pos_bias must be 'none'"):
        mmmae.create_model("m3ae", size="vit_tiny_test", img_size=32, patch_size=8, rel_pos_bias="shared")


@pytest.mark.parametrize("rel_pos_bias", ["shared", "block"])
@pytest.mark.parametrize("weight_init", ["simmim", "mae"])
def test_meta_build_equals_eager_build(rel_pos_bias: str, weight_init: str) -> None:
    kw = {**TINY, "rel_pos_bias": rel_pos_bias, "weight_init": weight_init}
    torch.manual_seed(0)
    eager = mmmae.create_model("simmim", **kw)
    meta = mmmae.create_model("simmim", device="meta", **kw)
    torch.manual_seed(0)
    materialize(meta, "cpu")
    meta_state = meta.state_dict()
    assert eager.state_dict().keys() == meta_state.keys()
    for k, v in eager.state_dict().items():
        assert torch.equal(v, meta_state[k]), k
    meta_buffers = dict(meta.named_buffers())
    for k, v in eager.named_buffers():
        assert torch.equal(v, meta_buffers[k]), k


# ----------------------------------------------------------------------------------------------------
# the SimMIM model and recipe


def test_simmim_defaults_are_the_official_vit_recipe() -> None:
    # config.py MODEL.VIT (QKV_BIAS True, INIT_VALUES 0.1, USE_APE False, USE_RPB False,
    # USE_SHARED_RPB True), MODEL.DROP_PATH_RATE 0.1, DATA.MASK_PATCH_SIZE 32, DATA.MASK_RATIO 0.6.
    cfg = get_spec("simmim").cfg_cls()
    assert (cfg.pos_embed, cfg.rel_pos_bias, cfg.qkv_bias, cfg.init_values) == ("none", "shared", "qv", 0.1)
    assert (cfg.drop_path_rate, cfg.mask_patch_size, cfg.mask_ratio, cfg.norm_pix_loss) == (0.1, 32, 0.6, False)
    assert cfg.weight_init == "simmim"
    model = mmmae.create_model("simmim", **TINY)
    enc = model.encoder
    assert enc.pos_embed is None and enc.rel_pos_bias is not None
    assert all(torch.equal(b.ls1.gamma, torch.full((32,), 0.1)) for b in enc.blocks)
    # The old trunk stays reachable by name.
    old = mmmae.create_model("simmim", **TINY, pos_embed="sincos", rel_pos_bias="none", qkv_bias="qkv",
                             init_values=0.0, weight_init="mae")
    assert old.encoder.pos_embed.shape == (1, 16, 32) and old.encoder.rel_pos_bias is None
    assert old.encoder.blocks[0].attn.qkv.bias is not None and isinstance(old.encoder.blocks[0].ls1, torch.nn.Identity)


def test_simmim_loss_is_the_official_l1_over_masked_pixels() -> None:
    # models/simmim.py SimMIM.forward: mask repeated to pixels, l1 summed over masked pixels and
    # channels, / (mask.sum() + 1e-5) / in_chans.
    torch.manual_seed(0)
    model = mmmae.create_model("simmim", **TINY).eval()
    gen = torch.Generator().manual_seed(0)
    batch = get_spec("simmim").make_mask_fn(model.cfg)(2, gen)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        out = model({"image": x, **batch})
    rec = unpatchify(out["pred"], 8, (4, 4), 3)
    m = batch["mask"].view(2, 4, 4).repeat_interleave(8, 1).repeat_interleave(8, 2).unsqueeze(1).float()
    official = ((x - rec).abs() * m).sum() / (m.sum() + 1e-5) / 3
    assert torch.allclose(out["loss"], official, rtol=1e-5)


def _truncated_std(sigma: float, a: float) -> float:
    """Std of N(0, sigma) cut at +-a*sigma: sigma * sqrt(1 - 2 a phi(a) / (2 Phi(a) - 1))."""
    phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(a / math.sqrt(2))
    return sigma * math.sqrt(1 - 2 * a * phi / mass)


def test_simmim_init_is_the_official_init() -> None:
    # VisionTransformerForSimMIM._trunc_normal_ cuts N(0, .02) at a=-.02, b=.02 (one std) for every
    # linear / patch conv weight, [cls] and the mask token; fix_init_weight divides block i's attn.proj
    # and mlp.fc2 weights by sqrt(2 i); q/v biases and the shared table are zero, gamma 0.1.
    torch.manual_seed(0)
    model = mmmae.create_model("simmim", **{**TINY, "embed_dim": 128, "num_heads": 4})
    enc = model.encoder
    std = _truncated_std(0.02, 1.0)  # ~0.0108
    for w in (enc.blocks[0].attn.qkv.weight, enc.blocks[1].mlp.fc1.weight, enc.patch_embed.proj.weight):
        assert w.abs().max() <= 0.02
        assert abs(w.std().item() / std - 1) < 0.05
    for i, blk in enumerate(enc.blocks, start=1):
        for w in (blk.attn.proj.weight, blk.mlp.fc2.weight):
            assert w.abs().max() <= 0.02 / math.sqrt(2 * i) + 1e-9
            assert abs(w.std().item() / (std / math.sqrt(2 * i)) - 1) < 0.05
    for t in (enc.cls_token, enc.mask_token):
        assert t.abs().max() <= 0.02 and t.std() > 0
    assert all(b.attn.q_bias.abs().sum() == 0 and b.attn.qkv.bias is None for b in enc.blocks)
    assert enc.rel_pos_bias.relative_position_bias_table.abs().sum() == 0
    assert all(torch.equal(b.ls2.gamma, torch.full((128,), 0.1)) for b in enc.blocks)
    # The head is a plain nn.Conv2d left at PyTorch's init: kaiming-uniform(a=sqrt(5)) -> |w| <= 1/sqrt(fan_in).
    head = model.decoder.proj.weight
    assert head.abs().max() <= 1 / math.sqrt(128) and head.abs().max() > 0.5 / math.sqrt(128)


def test_image_simmim_config_is_the_official_recipe() -> None:
    cfg = load_config("image_simmim.yaml")
    mcfg = model_cfg(cfg.model)
    assert (mcfg.embed_dim, mcfg.depth, mcfg.num_heads, mcfg.patch_size, mcfg.img_size) == (768, 12, 12, 16, 224)
    assert (mcfg.pos_embed, mcfg.rel_pos_bias, mcfg.qkv_bias, mcfg.init_values) == ("none", "shared", "qv", 0.1)
    assert (mcfg.mask_ratio, mcfg.mask_patch_size, mcfg.drop_path_rate) == (0.6, 32, 0.1)
    # TRAIN: BASE_LR 1e-4 scaled by batch / 512, 16 GPUs x 128 -> 4e-4; AdamW (0.9, 0.999), eps 1e-8,
    # WEIGHT_DECAY 0.05, CLIP_GRAD 5.0, WARMUP_EPOCHS 10, EPOCHS 800; RandomResizedCrop scale (0.67, 1).
    assert math.isclose(effective_lr(cfg, 16), 1e-4 * 128 * 16 / 512)
    assert list(cfg.optim.betas) == [0.9, 0.999] and cfg.optim.eps == 1e-8
    assert (cfg.optim.weight_decay, cfg.optim.clip_grad, cfg.optim.warmup_epochs) == (0.05, 5.0, 10)
    assert cfg.train.epochs == 800 and cfg.data.min_scale == 0.67 and cfg.data.batch_size == 128


def test_optimizer_groups_treat_the_table_as_the_official_code() -> None:
    # optimizer.py get_pretrain_param_groups: no decay only for 1-D tensors, biases and the
    # no_weight_decay names (cls_token, mask_token, pos_embed), so the 2-D shared table is decayed,
    # and q/v biases and layer scales (1-D) are not. get_vit_layer (with num_layers = depth + 2) puts
    # rel_pos_bias in layer depth + 1, with the head.
    from mmmae.engine.optim import layer_id, param_groups
    model = mmmae.create_model("simmim", **TINY)
    decay = {n for g in param_groups(model, 0.05) if g["weight_decay"] > 0 for n in g["names"]}
    assert "encoder.rel_pos_bias.relative_position_bias_table" in decay
    assert not {"encoder.blocks.0.attn.q_bias", "encoder.blocks.0.ls1.gamma", "encoder.mask_token"} & decay
    assert layer_id("encoder.rel_pos_bias.relative_position_bias_table", 12) == 13


def test_tiny_simmim_trains_on_fashion_mnist(tmp_path: Path, fashion_mnist: Path, dist_group: None) -> None:
    from safetensors.torch import load_file

    from mmmae.engine.trainer import train
    run = tmp_path / "simmim"
    summary = train(load_config("image_simmim_tiny.yaml", [f"output_dir={run}", "train.max_steps=6",
                                                           "train.log_every=1", "train.progress=false",
                                                           "train.vis_every=0", "train.ckpt_every=6"]))
    assert summary["step"] == 6
    rows = [line for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all('"l1_loss"' in r for r in rows)
    state = load_file(str(run / "model.safetensors"))
    assert "encoder.rel_pos_bias.relative_position_bias_table" in state
    model = mmmae.create_model("simmim", size="vit_tiny_test", img_size=32, patch_size=8, mask_patch_size=16)
    model.load_state_dict(state, strict=True)
    # The table learned: it left its zero init.
    assert state["encoder.rel_pos_bias.relative_position_bias_table"].abs().sum() > 0
