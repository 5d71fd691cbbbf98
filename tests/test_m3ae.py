"""M3AE: the ``captions`` source and every tokenizer path offline, padding and hidden-content
invariances, unpaired (image-only / text-only) batches, pooled features, and ``m3ae_tiny.yaml``
trained from caption tar shards made of the real COCO sample."""

from __future__ import annotations

import os

# Before anything imports transformers / huggingface_hub, which read these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import math  # noqa: E402
import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import mmmae  # noqa: E402
from conftest import COCO_MINI  # noqa: E402
from mmmae.config import load_config, model_cfg  # noqa: E402
from mmmae.data.collate import MaskCollator  # noqa: E402
from mmmae.data.registry import build_dataset  # noqa: E402
from mmmae.heads import load_encoder_weights  # noqa: E402
from mmmae.layers import patchify, unpatchify  # noqa: E402
from mmmae.masking import check_mask  # noqa: E402
from mmmae.registry import build_from_cfg, get_spec  # noqa: E402
from mmmae.vl.models import M3AE, masked_token_cross_entropy, vision_encoder_state  # noqa: E402
from mmmae.vl.tokenizers import build_tokenizer  # noqa: E402

TINY = {"size": "vit_tiny_test", "img_size": 32, "patch_size": 8, "max_len": 16}
S = 16
CAPTIONS = COCO_MINI / "annotations" / "captions_train2017.json"
VAL_CAPTIONS = COCO_MINI / "annotations" / "captions_val2017.json"
needs_coco = pytest.mark.skipif(not CAPTIONS.is_file(), reason="needs shared/data/coco-mini")


def tiny(seed: int = 0, **extra: object) -> M3AE:
    torch.manual_seed(seed)
    model = mmmae.create_model("m3ae", **{**TINY, **extra})
    assert isinstance(model, M3AE)
    return model.eval()


def mask_fn(model: M3AE):  # noqa: ANN201
    return get_spec("m3ae").make_mask_fn(model.cfg)  # type: ignore[misc]


def coco_overrides(**extra: str) -> list[str]:
    base = {"data.captions": str(CAPTIONS), "data.images": str(COCO_MINI / "train2017"),
            "data.val_captions": str(VAL_CAPTIONS), "data.val_images": str(COCO_MINI / "val2017")}
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


# ------------------------------------------------------------------------------------ tokenizers

WORDS = ["a", "man", "woman", "dog", "cat", "on", "the", "with", "of", "in", "and", "is", "street", "table",
         "sitting", "standing", "people", "two", "pizza", "plate", "##s", "."]


@pytest.fixture(scope="module")
def vocab_txt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wordpiece") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face tokenizer saved to a directory, as users pass one (nothing from the hub)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[UNK]", *WORDS, "[CLS]", "[SEP]", "[PAD]", "[MASK]"])}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    out = tmp_path_factory.mktemp("hf_tok")
    fast.save_pretrained(str(out))
    return out


@needs_coco
def test_every_tokenizer_path_works_offline(vocab_txt: Path, hf_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """open_clip BPE, a saved HF tokenizer and a WordPiece vocab.txt, through the ``captions`` source,
    the collate + masks of the engine and the model, with every network connection refused."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted in an offline test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)

    for spec in ("openclip", str(hf_dir), str(vocab_txt)):
        tok = build_tokenizer(spec, S)
        cfg = load_config("m3ae_tiny.yaml", coco_overrides(**{"model.tokenizer": spec, "data.limit": "4",
                                                               "model.vocab_size": str(tok.vocab_size)}))
        mcfg = model_cfg(cfg.model)
        for split in ("train", "val"):
            ds = build_dataset(cfg, split, mcfg)
            collate = MaskCollator(get_spec("m3ae").make_mask_fn(mcfg), seed=0)  # the trainer's collate
            batch = collate([ds[i] for i in range(2)])
            assert batch["image"].shape == (2, 3, 32, 32) and batch["text"].shape == (2, S)
            assert isinstance(batch["skipped_images"], int)
            ids, pad = tok(batch["caption"])
            assert torch.equal(batch["text"], ids) and torch.equal(batch["text_pad"], pad)
            check_mask(batch["mask"], 16)
            check_mask(batch["text_mask"], S)
            torch.manual_seed(0)
            out = build_from_cfg("m3ae", mcfg)(batch)
            assert torch.isfinite(out["loss"]) and out["text_logits"].shape == (2, S, tok.vocab_size), spec
        assert len(build_dataset(cfg, "train", mcfg)) == 4  # data.limit


@needs_coco
def test_source_rejects_text_settings_the_model_cannot_take() -> None:
    cfg = load_config("m3ae_tiny.yaml", coco_overrides(**{"model.vocab_size": "1000"}))
    with pytest.raises(ValueError, match="model.vocab_size=49408"):
        build_dataset(cfg, "train", model_cfg(cfg.model))
    with pytest.raises(ValueError, match="'text.max_len' is now 'model.max_len'"):
        load_config("m3ae_tiny.yaml", coco_overrides(**{"text.max_len": "24"}))
    cfg = load_config("m3ae_tiny.yaml", coco_overrides(**{"data.val_captions": "''"}))
    with pytest.raises(ValueError, match="data.val_captions"):
        build_dataset(cfg, "val", model_cfg(cfg.model))


# ------------------------------------------------------------------------------------------ masks


def test_masks_have_exact_counts_and_follow_the_batch_modality() -> None:
    model = tiny(image_mask_ratio=0.75, text_mask_ratio=0.5)
    g = torch.Generator().manual_seed(0)
    masks = mask_fn(model)(5, g)
    assert check_mask(masks["mask"], 16) == 12 and check_mask(masks["text_mask"], S) == 8
    again = mask_fn(model)(5, torch.Generator().manual_seed(0))
    assert all(torch.equal(masks[k], again[k]) for k in masks)
    assert set(mask_fn(model)(5, g, modality="text")) == {"text_mask"}
    with pytest.raises(ValueError, match="video"):
        mask_fn(model)(5, g, modality="video")


# --------------------------------------------------------------------------------- invariances


def _pad_longer(batch: dict[str, torch.Tensor], extra: int, seed: int) -> dict[str, torch.Tensor]:
    """The same captions padded to ``S + extra`` positions, with garbage ids in every padding slot
    (old and new) and the extra positions half hidden, half visible (same hidden count per row)."""
    g = torch.Generator().manual_seed(seed)
    b, s = batch["text"].shape
    text = torch.cat([batch["text"], torch.zeros(b, extra, dtype=torch.long)], dim=1)
    pad = torch.cat([batch["text_pad"], torch.ones(b, extra, dtype=torch.bool)], dim=1)
    text = torch.where(pad, torch.randint(1, 40000, text.shape, generator=g), text)
    tail = torch.zeros(b, extra, dtype=torch.bool)
    tail[:, : extra // 2] = True
    return {**batch, "text": text, "text_pad": pad, "text_mask": torch.cat([batch["text_mask"], tail], dim=1)}


def test_padding_never_reaches_the_loss() -> None:
    model = tiny(max_len=2 * S)
    short = tiny().example_batch(3, seed=1)  # S = 16 positions, ragged padding
    short["text_pad"][1, 5:] = True  # a row whose hidden positions are mostly padding
    short["text"] = short["text"].masked_fill(short["text_pad"], 0)
    long = _pad_longer(short, S, seed=2)
    with torch.no_grad():
        a, b = model(short), model(long)
    for k in ("loss", "image_loss", "text_loss"):
        assert torch.allclose(a[k], b[k], atol=1e-5), (k, a[k], b[k])
    assert torch.allclose(a["pred"], b["pred"], atol=1e-5)
    real = ~short["text_pad"]
    assert torch.allclose(a["text_logits"][real], b["text_logits"][:, :S][real], atol=1e-4)
    # The same captions with other garbage in the padding: still the same loss.
    with torch.no_grad():
        c = model(_pad_longer(short, S, seed=3))
    assert torch.allclose(b["loss"], c["loss"], atol=1e-6)


def test_text_loss_counts_hidden_real_tokens_per_sample() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    target = torch.randint(0, 11, (3, 6), generator=g)
    valid = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 0, 1, 0, 1, 1]], dtype=torch.bool)
    ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(3, 6)
    expected = (ce[0, :2].mean() + 0.0 + ce[2][valid[2]].mean()) / 3  # the reference's per-sample mean
    assert torch.allclose(masked_token_cross_entropy(logits, target, valid), expected)


def test_hidden_text_and_patches_do_not_change_predictions() -> None:
    model = tiny()
    batch = model.example_batch(2, seed=4)
    g = torch.Generator().manual_seed(5)
    changed = dict(batch)
    tm = batch["text_mask"]
    changed["text"] = torch.where(tm, torch.randint(0, model.cfg.vocab_size, tm.shape, generator=g), batch["text"])
    patches = patchify(batch["image"], 8).clone()
    patches[batch["mask"]] = torch.randn(patches[batch["mask"]].shape, generator=g) * 4 + 2
    changed["image"] = unpatchify(patches, 8, (4, 4))
    assert not torch.equal(changed["text"], batch["text"])
    with torch.no_grad():
        a, b = model(batch), model(changed)
    assert torch.allclose(a["pred"], b["pred"], atol=1e-6)
    assert torch.allclose(a["text_logits"], b["text_logits"], atol=1e-5)
    assert not torch.allclose(a["image_loss"], b["image_loss"])
    assert not torch.allclose(a["text_loss"], b["text_loss"])


# ---------------------------------------------------------------------------- unpaired batches


def test_image_only_and_text_only_batches() -> None:
    model = tiny(image_only_weight=0.5, text_only_weight=0.3).train()
    batch = model.example_batch(2, seed=6)
    image_only = {"image": batch["image"], "mask": batch["mask"]}
    out = model(image_only)
    assert out["pred"].shape == (2, 16, 192) and "text_logits" not in out
    assert torch.allclose(out["loss"], 0.5 * out["image_loss"]) and out["text_loss"] == 0
    out["loss"].backward()
    assert model.encoder.patch_embed.proj.weight.grad is not None and model.encoder.text_embed.weight.grad is None
    model.zero_grad(set_to_none=True)

    text_only = {"text": batch["text"], "text_pad": batch["text_pad"], **mask_fn(model)(2, None, modality="text")}
    out = model(text_only)
    assert out["text_logits"].shape == (2, S, model.cfg.vocab_size) and "pred" not in out
    assert torch.allclose(out["loss"], 0.3 * out["text_loss"]) and out["image_loss"] == 0
    out["loss"].backward()
    assert model.encoder.text_embed.weight.grad is not None and model.encoder.patch_embed.proj.weight.grad is None
    # A caption that is all padding (the reference's dropped text) still gives a finite loss.
    empty = {**text_only, "text_pad": torch.ones_like(batch["text_pad"])}
    assert torch.isfinite(model(empty)["loss"])
    with pytest.raises(ValueError, match="image"):
        model({"label": torch.zeros(2)})


def test_recipe_defaults_follow_m3ae_main() -> None:
    """m3ae_main.py flags: image_loss_weight=1.0, text_loss_weight=0.1, unpaired_text_loss_weight=0.0;
    the pixel target is the normalised image's patches as they are (no per-patch normalisation)."""
    for mcfg in (tiny().cfg, model_cfg(load_config("m3ae.yaml").model)):
        weights = (mcfg.image_weight, mcfg.text_weight, mcfg.image_only_weight, mcfg.text_only_weight)
        assert weights == (1.0, 0.1, 1.0, 0.0)
        assert mcfg.norm_pix_loss is False
    model = tiny().train()
    batch = model.example_batch(2, seed=9)
    out = model(batch)
    assert torch.allclose(out["loss"], out["image_loss"] + 0.1 * out["text_loss"])
    # A text-only (unpaired) batch adds nothing by default, as the reference's weight 0.0.
    text_only = {"text": batch["text"], "text_pad": batch["text_pad"], "text_mask": batch["text_mask"]}
    out = model(text_only)
    assert out["loss"] == 0 and out["text_loss"] > 0
    # An image whose caption was dropped: the image loss at image_loss_weight.
    out = model({"image": batch["image"], "mask": batch["mask"]})
    assert torch.allclose(out["loss"], out["image_loss"])


def test_image_loss_is_the_references_patch_mse_loss() -> None:
    """m3ae/model.py patch_mse_loss(image_output, extract_patches(image, p), image_mask), written out
    again on channels-last images as the reference has them."""
    model = tiny()
    batch = model.example_batch(3, seed=10)
    with torch.no_grad():
        out = model(batch)
    p = model.cfg.patch_size
    nhwc = batch["image"].permute(0, 2, 3, 1)
    b, h, w, c = nhwc.shape
    target = nhwc.reshape(b, h // p, p, w // p, p, c).swapaxes(2, 3).reshape(b, (h // p) * (w // p), p * p * c)
    valid = out["mask"].float()
    valid_ratio = valid.sum(-1) / valid.shape[-1]
    per_patch = ((target - out["pred"]) ** 2).mean(-1)
    ref = (torch.where(valid > 0, per_patch, 0.0).mean(-1) / valid_ratio).mean()
    assert torch.allclose(out["image_loss"], ref, atol=1e-6)


# ------------------------------------------------------------------------------------- features


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_encode_image_and_text(pool: str) -> None:
    model = tiny(global_pool=pool)
    batch = model.example_batch(3, seed=7)
    with torch.no_grad():
        img = model.encode_image(batch["image"])
        txt = model.encode_text(batch["text"], batch["text_pad"])
        # Padding (its content, and how much of it) does not change the text feature.
        longer = tiny(global_pool=pool, max_len=2 * S)
        longer.load_state_dict(model.state_dict())
        padded = _pad_longer({**batch, "text_mask": torch.zeros(3, S, dtype=torch.bool)}, S, seed=8)
        txt_long = longer.encode_text(padded["text"], padded["text_pad"])
    assert img.shape == (3, 32) and txt.shape == (3, 32)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    assert torch.allclose(txt, txt_long, atol=1e-5)
    if pool == "token":  # [cls] of the final-normed image-only sequence
        assert torch.allclose(img, model.encoder.forward_features(batch["image"])[:, 0])


def test_image_encoder_transfers_to_the_classifier() -> None:
    model = tiny()
    x = torch.randn(2, 3, 32, 32)
    clf = mmmae.create_model("classifier", size="vit_tiny_test", img_size=32, patch_size=8, num_classes=3,
                             global_pool="token")
    missing, unexpected = load_encoder_weights(clf, vision_encoder_state(model.state_dict()))
    assert missing == [] and unexpected == []
    with torch.no_grad():
        # The image type embedding, folded into the patch bias, gives the pretraining features exactly.
        assert torch.allclose(clf.encoder.forward_features(x), model.encoder.forward_features(x), atol=1e-5)


# ------------------------------------------------------------------------------------- end to end


@needs_coco
def test_trains_from_caption_shards(tmp_path: Path, dist_group: None) -> None:
    """The ``captions`` source on WebDataset-style tar shards, in-process through the trainer: its
    resumable sampler draws the members by index, and a corrupt member is skipped and counted. (The
    same config on the COCO json runs through tools/train.py in test_retrieval.py.)"""
    import io
    import tarfile

    from PIL import Image
    from safetensors.torch import load_file

    from mmmae.engine.trainer import train
    from mmmae.vl.data import load_coco_captions

    records = load_coco_captions(str(CAPTIONS), str(COCO_MINI / "train2017"))[:7]

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    for s in range(2):  # 7 good samples and a corrupt one: 2 steps of 4 are one epoch, each read once
        with tarfile.open(tmp_path / f"coco-{s:03d}.tar", "w") as tar:
            for k, rec in enumerate(records[4 * s: 4 * s + 4]):
                buf = io.BytesIO()
                with Image.open(rec.image_path) as im:
                    im.convert("RGB").resize((48, 40)).save(buf, format="JPEG")
                add(tar, f"{s}{k:03d}.jpg", buf.getvalue())
                add(tar, f"{s}{k:03d}.txt", rec.captions[0].encode())
            if s == 1:
                add(tar, "broken.jpg", b"\xff\xd8\xff not a jpeg")
                add(tar, "broken.txt", b"never read")
    run = tmp_path / "run"
    cfg = load_config("m3ae_tiny.yaml", [f"data.captions={tmp_path / 'coco-{000..001}.tar'}", "data.images=''",
                                         "data.batch_size=4", f"output_dir={run}", "train.max_steps=2",
                                         "train.log_every=1", "train.ckpt_every=100", "train.vis_every=0",
                                         "train.progress=false"])
    assert train(cfg)["step"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["skipped_images"] == 1
    for r in rows:
        for k in ("loss", "image_loss", "text_loss"):
            assert k in r and math.isfinite(r[k]) and r[k] > 0, (k, r)
        assert r["loss"] == pytest.approx(r["image_loss"] + 0.1 * r["text_loss"], rel=1e-4)
    model = mmmae.create_model("m3ae", **TINY)
    model.load_state_dict(load_file(str(run / "model.safetensors")), strict=True)
    assert list((run / "vis").glob("step_*.png"))
