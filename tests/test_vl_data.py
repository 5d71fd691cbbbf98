"""Text tokenizers and image-caption data, on the real COCO-format sample in shared/data/coco-mini.

Everything runs offline: the Hugging Face tokenizer directory and the WordPiece vocab.txt are made
in tmp dirs here; open_clip's BPE vocabulary ships inside its package.
"""

from __future__ import annotations

import os

# Before anything imports transformers / huggingface_hub, which read these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import csv  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import pickle  # noqa: E402
import tarfile  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import transforms  # noqa: E402

import mmmae.vl.data as vdata  # noqa: E402
from mmmae.data.collate import collate_dicts  # noqa: E402
from mmmae.data.sampler import ResumableDistributedSampler  # noqa: E402
from mmmae.vl.data import (  # noqa: E402
    CaptionDataset,
    CaptionRecord,
    CaptionShards,
    RetrievalSplit,
    build_caption_dataset,
    expand_shard_urls,
    load_caption_source,
    load_coco_captions,
    load_karpathy,
    load_pairs_file,
)
from mmmae.vl.tokenizers import (  # noqa: E402
    HFTokenizer,
    OpenClipBPE,
    TextTokenizer,
    WordPieceTokenizer,
    build_tokenizer,
    read_vocab_txt,
)

COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini"
if not COCO.is_dir():
    COCO = Path("/work/shared/data/coco-mini")
pytestmark = pytest.mark.skipif(not COCO.is_dir(), reason="needs shared/data/coco-mini")

S = 16
EDGE_TEXTS = [
    "a dog on the cat",
    "",
    "Café naïve 東京",
    "🐶🐱 emoji 👍🏽 only",
    " ".join(["the dog runs on the grass"] * 200),  # far longer than S
]
# Tokens for the test vocabularies; CJK characters are split one per token by BERT.
WORDS = ["a", "dog", "cat", "on", "the", "runs", "grass", "cafe", "naive", "zebra", "##s", "東", "京", "."]


def _transform() -> transforms.Compose:
    return transforms.Compose([transforms.Resize(64), transforms.CenterCrop(64), transforms.ToTensor()])


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wordpiece") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved fast tokenizer whose specials are NOT at BERT's ids, so its own ids must be used."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    tokens = ["[UNK]", *WORDS, "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    out = tmp_path_factory.mktemp("hf_tok")
    fast.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def openclip_tok() -> OpenClipBPE:
    return OpenClipBPE(S)


@pytest.fixture(scope="module", params=["openclip", "hf", "wordpiece"])
def any_tok(request: pytest.FixtureRequest, openclip_tok: OpenClipBPE, hf_dir: Path, vocab_file: Path
            ) -> TextTokenizer:
    if request.param == "openclip":
        return openclip_tok
    if request.param == "hf":
        return HFTokenizer(hf_dir, S)
    return WordPieceTokenizer(vocab_file, S)


@pytest.fixture(scope="module")
def coco_train() -> list[CaptionRecord]:
    return load_coco_captions(str(COCO / "annotations" / "captions_train2017.json"), str(COCO / "train2017"))


@pytest.fixture(scope="module")
def coco_val() -> list[CaptionRecord]:
    return load_coco_captions(str(COCO / "annotations" / "captions_val2017.json"), str(COCO / "val2017"))


# ---------------------------------------------------------------------------- tokenizers

def test_shapes_and_padding_mask(any_tok: TextTokenizer) -> None:
    ids, pad = any_tok(EDGE_TEXTS)
    assert ids.shape == pad.shape == (len(EDGE_TEXTS), S)
    assert ids.dtype == torch.long and pad.dtype == torch.bool
    assert int(ids.max()) < any_tok.vocab_size and int(ids.min()) >= 0
    for i in range(len(EDGE_TEXTS)):
        n = int((~pad[i]).sum())
        # Padding is a suffix, starts right after the end token, and holds pad_id.
        assert not pad[i, :n].any() and pad[i, n:].all()
        assert ids[i, 0] == any_tok.bos_id and ids[i, n - 1] == any_tok.eos_id
        first_eos = ids[i].tolist().index(any_tok.eos_id)
        assert first_eos == n - 1
        assert (ids[i, n:] == any_tok.pad_id).all()
    assert int((~pad[1]).sum()) == 2  # "" -> start + end only
    assert not pad[4].any()  # truncated: full length, end token kept last (checked above)


def test_truncation_and_batch_of_one(any_tok: TextTokenizer) -> None:
    long = EDGE_TEXTS[4]
    ids, pad = any_tok(long)  # a lone str is one text, not len(str) characters
    assert ids.shape == (1, S) and not pad.any() and ids[0, -1] == any_tok.eos_id
    assert torch.equal(ids[0], any_tok([long, "a"])[0][0])
    empty_ids, empty_pad = any_tok([])
    assert empty_ids.shape == (0, S) and empty_pad.shape == (0, S)
    with pytest.raises(TypeError, match="text 1"):
        any_tok(["a", None])  # type: ignore[list-item]


def test_decode_and_pickle(any_tok: TextTokenizer) -> None:
    ids, pad = any_tok(["a dog on the cat", ""])
    assert any_tok.decode(ids[0], pad[0]) == "a dog on the cat"
    assert any_tok.decode(ids[0]) == "a dog on the cat"  # without the mask: cut at the end token
    assert any_tok.decode(ids[1], pad[1]) == ""
    # DataLoader workers under spawn pickle the dataset and its tokenizer.
    clone = pickle.loads(pickle.dumps(any_tok))
    assert torch.equal(clone(EDGE_TEXTS)[0], any_tok(EDGE_TEXTS)[0])


def test_openclip_specials_and_real_zero(openclip_tok: OpenClipBPE) -> None:
    assert openclip_tok.vocab_size == 49408
    assert (openclip_tok.bos_id, openclip_tok.eos_id, openclip_tok.pad_id) == (49406, 49407, 0)
    ids, pad = openclip_tok(["!?!?!"])
    # Id 0 is the real token "!" here: the mask, not the id, says what is padding.
    assert ids[0, 1] == 0 and not pad[0, 1]
    assert int((~pad[0]).sum()) == 4
    assert openclip_tok.decode(ids[0], pad[0]) == "!?!?!"
    # Same ids as open_clip's own tokenize (which pads with 0 and keeps the end token on truncation).
    from open_clip.tokenizer import SimpleTokenizer

    ref = SimpleTokenizer()(EDGE_TEXTS, context_length=S)
    assert torch.equal(openclip_tok(EDGE_TEXTS)[0], ref)


def test_wordpiece_ids_are_line_numbers(vocab_file: Path) -> None:
    lines = vocab_file.read_text(encoding="utf-8").splitlines()
    tok = WordPieceTokenizer(vocab_file, S)
    assert tok.vocab_size == len(lines)
    ids, pad = tok(["the zebras", "Café naïve 東京"])
    line = {w: i for i, w in enumerate(lines)}
    n = int((~pad[0]).sum())
    assert ids[0, :n].tolist() == [line["[CLS]"], line["the"], line["zebra"], line["##s"], line["[SEP]"]]
    # Uncased BERT strips accents and splits CJK characters.
    n = int((~pad[1]).sum())
    assert ids[1, :n].tolist() == [line[t] for t in ["[CLS]", "cafe", "naive", "東", "京", "[SEP]"]]
    assert read_vocab_txt(vocab_file)["zebra"] == lines.index("zebra")
    cased = WordPieceTokenizer(vocab_file, S, lowercase=False)
    assert cased(["Café"])[0][0, 1] == line["[UNK]"]


def test_wordpiece_matches_transformers_bert(vocab_file: Path) -> None:
    import inspect

    from transformers import BertTokenizer

    vocab = read_vocab_txt(vocab_file)
    # transformers 5 takes `vocab=` (its `vocab_file=` is ignored); 4.x takes `vocab_file=`.
    if "vocab" in inspect.signature(BertTokenizer.__init__).parameters:
        ref = BertTokenizer(vocab=vocab)
    else:
        ref = BertTokenizer(vocab_file=str(vocab_file))
    assert len(ref) == len(vocab)
    tok = WordPieceTokenizer(vocab_file, S)
    for text in EDGE_TEXTS:
        want = ref(text, truncation=True, max_length=S)["input_ids"]
        ids, pad = tok([text])
        assert ids[0, : len(want)].tolist() == want and int((~pad[0]).sum()) == len(want)


def test_hf_tokenizer_uses_its_own_specials(hf_dir: Path) -> None:
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    tok = HFTokenizer(hf_dir, S)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (ref.pad_token_id, ref.cls_token_id, ref.sep_token_id)
    assert tok.pad_id != 0 and tok.vocab_size == len(ref)
    ids, pad = tok(["a dog"])
    assert ids[0, :4].tolist() == ref("a dog")["input_ids"] and pad[0, 4:].all()
    m3ae_style = HFTokenizer(hf_dir, S, add_special_tokens=False)  # M3AE fed BERT ids without [CLS]/[SEP]
    ids, pad = m3ae_style(["a dog", ""])
    assert ids[0, :2].tolist() == ref("a dog", add_special_tokens=False)["input_ids"] and pad[1].all()


def test_build_tokenizer_dispatch(hf_dir: Path, vocab_file: Path, tmp_path: Path) -> None:
    assert isinstance(build_tokenizer("openclip", 8), OpenClipBPE)
    assert isinstance(build_tokenizer(str(hf_dir), 8), HFTokenizer)
    wp = build_tokenizer(str(vocab_file), 8)
    assert isinstance(wp, WordPieceTokenizer) and wp.max_len == 8
    for bad in ("bert-base-uncased", str(tmp_path / "nope.txt")):
        with pytest.raises(ValueError, match="openclip") as err:
            build_tokenizer(bad, 8)
        assert repr(bad) in str(err.value)
    with pytest.raises(ValueError, match="max_len"):
        build_tokenizer("openclip", 1)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="could not load"):
        build_tokenizer(str(tmp_path / "empty_dir"), 8)


# ------------------------------------------------------------------------------- sources

def test_coco_loading_matches_json(coco_train: list[CaptionRecord]) -> None:
    data = json.loads((COCO / "annotations" / "captions_train2017.json").read_text())
    assert len(coco_train) == len(data["images"])
    assert sum(len(r.captions) for r in coco_train) == len(data["annotations"])
    assert {r.image_id for r in coco_train} == {im["id"] for im in data["images"]}
    by_id = {r.image_id: r for r in coco_train}
    for ann in data["annotations"][:50]:
        assert ann["caption"].strip() in by_id[ann["image_id"]].captions
    assert all(os.path.isfile(r.image_path) for r in coco_train)


def test_dataset_modes(coco_train: list[CaptionRecord], openclip_tok: OpenClipBPE) -> None:
    all_ds = CaptionDataset(coco_train, _transform(), openclip_tok, mode="all")
    rnd = CaptionDataset(coco_train, _transform(), openclip_tok, mode="random", seed=3)
    assert len(all_ds) == 400 and len(rnd) == 80
    assert Counter(all_ds.locate(i)[0] for i in range(len(all_ds))) == Counter({i: 5 for i in range(80)})
    assert len({all_ds.locate(i) for i in range(len(all_ds))}) == 400

    picks0 = [rnd.locate(i) for i in range(80)]
    assert picks0 == [CaptionDataset(coco_train, _transform(), None, "random", seed=3).locate(i) for i in range(80)]
    rnd.set_epoch(1)
    picks1 = [rnd.locate(i) for i in range(80)]
    assert [p[0] for p in picks1] == list(range(80)) and picks1 != picks0
    assert len({p[1] for p in picks0 + picks1}) > 1

    s = rnd[5]
    img_i, cap_i = picks1[5]
    assert s["image"].shape == (3, 64, 64) and s["image"].dtype == torch.float32
    assert s["caption"] == coco_train[img_i].captions[cap_i] and s["image_id"] == coco_train[img_i].image_id
    assert s["index"] == 5 and s["skipped"] == 0
    assert s["text"].shape == s["text_pad"].shape == (S,) and s["text_pad"].dtype == torch.bool
    assert torch.equal(s["text"], openclip_tok([s["caption"]])[0][0])

    batch = next(iter(DataLoader(all_ds, batch_size=4, collate_fn=collate_dicts)))
    assert batch["image"].shape == (4, 3, 64, 64)
    assert batch["text"].shape == batch["text_pad"].shape == (4, S)
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["skipped_images"] == 0
    assert batch["caption"] == coco_train[0].captions[:4] and len(batch["image_id"]) == 4

    plain = collate_dicts([CaptionDataset(coco_train[:1], _transform(), None)[0]])
    assert "text" not in plain and "text_pad" not in plain and plain["image"].shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="mode"):
        CaptionDataset(coco_train, _transform(), None, mode="every")


def _karpathy_file(tmp_path: Path, coco_train: list[CaptionRecord], coco_val: list[CaptionRecord]) -> Path:
    images = []
    for k, rec in enumerate(coco_train + coco_val):
        folder = "train2017" if k < len(coco_train) else "val2017"
        split = ("train" if k < 60 else "restval") if folder == "train2017" else ("val" if k % 2 else "test")
        images.append({"filepath": folder, "filename": os.path.basename(rec.image_path), "split": split,
                       "cocoid": rec.image_id, "imgid": k,
                       "sentences": [{"raw": c, "tokens": c.lower().split()} for c in rec.captions]})
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_karpathy(tmp_path: Path, coco_train: list[CaptionRecord], coco_val: list[CaptionRecord]) -> None:
    path = _karpathy_file(tmp_path, coco_train, coco_val)
    train = load_karpathy(str(path), str(COCO))
    assert [r.image_id for r in train] == [r.image_id for r in coco_train]
    assert [r.captions for r in train] == [r.captions for r in coco_train]
    assert all(os.path.isfile(r.image_path) for r in train)
    assert len(load_karpathy(str(path), str(COCO), splits=("train",))) == 60
    n_test = len(load_karpathy(str(path), str(COCO), splits=("test",)))
    assert n_test == sum(1 for k in range(len(coco_val)) if (k + len(coco_train)) % 2 == 0)

    src = load_caption_source(str(path), str(COCO), split="train")
    assert src.kind == "karpathy" and len(src.records) == 80
    assert len(load_caption_source(str(path), str(COCO), split="test").records) == n_test
    with pytest.raises(ValueError, match="split"):
        load_karpathy(str(path), str(COCO), splits=("dev",))


def test_pairs_csv_and_jsonl(tmp_path: Path, coco_val: list[CaptionRecord]) -> None:
    rows = [(f"val2017/{os.path.basename(r.image_path)}", c) for r in coco_val for c in r.captions]
    rows[0] = (rows[0][0], 'A "quoted", comma-laden caption — Café 東京 🐶')
    csv_path = tmp_path / "pairs.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    jsonl_path = tmp_path / "pairs.jsonl"
    jsonl_path.write_text("\n".join(json.dumps({"image": i, "caption": c}, ensure_ascii=False) for i, c in rows)
                          + "\n\n", encoding="utf-8")
    headerless = tmp_path / "noheader.csv"
    with open(headerless, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)

    for path in (csv_path, jsonl_path, headerless):
        recs = load_pairs_file(str(path), str(COCO))
        assert len(recs) == len(coco_val) and sum(len(r.captions) for r in recs) == len(rows)
        assert recs[0].captions[0] == rows[0][1]
        assert [r.captions for r in recs[1:]] == [r.captions for r in coco_val[1:]]
        assert all(os.path.isfile(r.image_path) for r in recs)
        assert recs[0].image_id == rows[0][0]
    assert load_caption_source(str(jsonl_path), str(COCO)).kind == "pairs"
    # An empty image root means "beside the pairs file".
    (tmp_path / "val2017").symlink_to(COCO / "val2017")
    assert len(load_caption_source(str(csv_path), "").records) == len(coco_val)

    bad = tmp_path / "bad.csv"
    bad.write_text("file,text,extra\nx,y,z\n")
    with pytest.raises(ValueError, match="header"):
        load_pairs_file(str(bad), str(COCO))


def test_load_caption_source_dispatch_and_errors(tmp_path: Path) -> None:
    ann = str(COCO / "annotations" / "captions_val2017.json")
    src = load_caption_source(ann, str(COCO / "val2017"), split="val")
    assert src.kind == "coco" and len(src.records) == 79
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="data.captions") as err:
        load_caption_source(missing, str(COCO))
    assert missing in str(err.value)
    with pytest.raises(FileNotFoundError, match="data.images"):
        load_caption_source(ann, str(tmp_path / "no_images"))
    with pytest.raises(FileNotFoundError, match="data.images"):  # the dir exists but holds none of them
        load_caption_source(ann, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data.captions"):
        load_caption_source(str(tmp_path / "shard-{000..002}.tar"), "")
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match="neither COCO"):
        load_caption_source(str(odd), str(COCO))
    with pytest.raises(ValueError, match="cannot tell"):
        load_caption_source(str(COCO / "train2017" / "000000000790.jpg"), str(COCO))
    ds = build_caption_dataset(ann, str(COCO / "val2017"), _transform(), None, mode="random")
    assert isinstance(ds, CaptionDataset) and len(ds) == 79


# --------------------------------------------------------------------- unreadable images

def _bad_files(tmp_path: Path) -> list[Path]:
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((COCO / "val2017" / "000000397133.jpg").read_bytes()[:2000])
    return [garbage, truncated]


def test_unreadable_images_are_skipped_and_counted(tmp_path: Path, coco_val: list[CaptionRecord],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    bad = _bad_files(tmp_path)
    records = coco_val[:10] + [CaptionRecord(str(p), [f"bad {p.name}"], p.name) for p in bad]
    ds = CaptionDataset(records, _transform(), None, mode="random", seed=0, max_bad_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="mmmae.vl.data"):
        samples = [ds[i] for i in range(len(ds))]
    good_ids = {r.image_id for r in coco_val[:10]}
    for i in (10, 11):
        assert samples[i]["skipped"] >= 1 and samples[i]["index"] == i and samples[i]["image_id"] in good_ids
        assert samples[i]["image"].shape == (3, 64, 64) and not samples[i]["caption"].startswith("bad")
        again = ds[i]  # the replacement is deterministic
        assert again["image_id"] == samples[i]["image_id"] and torch.equal(again["image"], samples[i]["image"])
    assert all(s["skipped"] == 0 for s in samples[:10])
    assert "garbage.jpg" in caplog.text and "truncated.jpg" in caplog.text
    expected = sum(s["skipped"] for s in samples)

    # The count rides in the samples, so it survives worker processes.
    fresh = CaptionDataset(records, _transform(), None, mode="random", seed=0, max_bad_fraction=0.5)
    loader = DataLoader(fresh, batch_size=4, num_workers=2, collate_fn=collate_dicts)
    assert sum(b["skipped_images"] for b in loader) == expected >= 2

    # Evaluation lists an unreadable image and never replaces it.
    val = CaptionDataset(records, _transform(), None, mode="random", replace=False)
    flagged = val[10]
    assert flagged["valid"] is False and flagged["image"] is None and flagged["unreadable"] == str(bad[0])
    assert flagged["image_id"] == "garbage.jpg" and "skipped" not in flagged
    batch = collate_dicts([val[9], flagged])
    assert batch["image"].shape == (1, 3, 64, 64) and batch["unreadable"] == [str(bad[0])]


def test_bad_fraction_guard(tmp_path: Path, coco_val: list[CaptionRecord]) -> None:
    bad = _bad_files(tmp_path)
    only_bad = [CaptionRecord(str(p), ["x"], p.name) for p in bad]
    with pytest.raises(RuntimeError, match="every image") as err:
        CaptionDataset(only_bad, _transform(), None, max_bad_fraction=1.0)[0]
    assert "garbage.jpg" in str(err.value) or "truncated.jpg" in str(err.value)

    # A third of the images missing: fine at first, stopped once >= 20 reads show the share.
    mixed = coco_val[:4] + [CaptionRecord(str(tmp_path / f"missing{i}.jpg"), ["x"], i) for i in range(2)]
    ds = CaptionDataset(mixed, _transform(), None, mode="random", max_bad_fraction=0.1)
    with pytest.raises(RuntimeError, match="max_bad_fraction") as err:
        for epoch in range(10):
            ds.set_epoch(epoch)
            for i in range(len(ds)):
                ds[i]
    assert "missing" in str(err.value) and ds._bad.attempts >= 20


# ------------------------------------------------------------------------------------ shards

@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory, coco_val: list[CaptionRecord]) -> tuple[Path, dict]:
    """3 shards with 3 good samples each (jpg, jpeg, png) + one corrupt jpg in shard 1."""
    root = tmp_path_factory.mktemp("shards")
    truth: dict[str, str] = {}
    recs = coco_val[:9]

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    for s in range(3):
        with tarfile.open(root / f"shard-{s:03d}.tar", "w") as tar:
            for k, rec in enumerate(recs[3 * s: 3 * s + 3]):
                key = f"{s:03d}{k:03d}"
                with Image.open(rec.image_path) as im:  # small images keep the test fast
                    im = im.convert("RGB").resize((80, 60))
                    buf = io.BytesIO()
                    fmt, ext = [("JPEG", "jpg"), ("JPEG", "jpeg"), ("PNG", "png")][k]
                    im.save(buf, format=fmt)
                add(tar, f"{key}.{ext}", buf.getvalue())
                add(tar, f"{key}.txt", rec.captions[0].encode())
                truth[key] = rec.captions[0]
                if s == 1 and k == 0:
                    add(tar, "corrupt.jpg", b"\xff\xd8\xff not really a jpeg")
                    add(tar, "corrupt.txt", b"never seen")
    return root, truth


def test_shard_url_expansion(shard_dir: tuple[Path, dict]) -> None:
    root, _ = shard_dir
    names = [str(root / f"shard-{i:03d}.tar") for i in range(3)]
    assert expand_shard_urls(str(root / "shard-{000..002}.tar")) == names
    assert expand_shard_urls(str(root / "shard-*.tar")) == names
    assert expand_shard_urls(str(root / "shard-{000,002}.tar")) == [names[0], names[2]]
    assert expand_shard_urls([names[1], str(root / "shard-00[02].tar")]) == [names[1], names[0], names[2]]
    with pytest.raises(FileNotFoundError, match="shard-003"):
        expand_shard_urls(str(root / "shard-{000..003}.tar"))


def test_shards_are_read_by_index_and_skip_and_count(shard_dir: tuple[Path, dict], openclip_tok: OpenClipBPE,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    root, truth = shard_dir
    spec = str(root / "shard-{000..002}.tar")
    ds = CaptionShards(spec, _transform(), openclip_tok)
    keys = sorted(truth)
    assert ds.keys == keys[:4] + ["corrupt"] + keys[4:]  # shard order, then member order
    with caplog.at_level(logging.WARNING, logger="mmmae.vl.data"):
        samples = [ds[i] for i in range(len(ds))]
    assert [s["image_id"] for i, s in enumerate(samples) if i != 4] == keys
    assert all(s["caption"] == truth[s["image_id"]] for s in samples)
    assert [s["skipped"] for s in samples] == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0] and samples[4]["index"] == 4
    assert str(root / "shard-001.tar") + "/corrupt.jpg" in caplog.text
    assert samples[0]["image"].shape == (3, 64, 64) and samples[0]["text"].shape == (S,)
    assert torch.equal(CaptionShards(spec, _transform(), None)[4]["image"], samples[4]["image"])  # deterministic

    src = load_caption_source(spec, "")
    assert src.kind == "shards" and len(src.shards) == 3

    # The trainer's sampler splits the items over ranks (here 2 of them) and its collate counts the skip.
    seen, skipped = [], 0
    for rank in range(2):
        order = list(ResumableDistributedSampler(len(ds), num_replicas=2, rank=rank, seed=0))
        loader = DataLoader(ds, batch_size=5, sampler=order, num_workers=2 if rank else 0, collate_fn=collate_dicts)
        for b in loader:
            seen += b["image_id"]
            skipped += b["skipped_images"]
    assert sorted(set(seen)) == keys and len(seen) == 10 and skipped == 1

    val = CaptionShards(spec, _transform(), None, replace=False)
    flagged = val[4]
    assert flagged["valid"] is False and flagged["unreadable"] == str(root / "shard-001.tar") + "/corrupt.jpg"
    assert collate_dicts([val[3], flagged])["failed"][0]["index"] == 4


def test_bad_shards_are_errors_naming_the_file(tmp_path: Path) -> None:
    def shard(path: Path, members: list[tuple[str, bytes]], mode: str = "w") -> None:
        with tarfile.open(path, mode) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    shard(tmp_path / "bad.tar", [(f"{k}.{ext}", data) for k in range(3) for ext, data in
                                 (("jpg", b"nope"), ("txt", b"caption"))])
    with pytest.raises(RuntimeError, match=r"every image tried is unreadable.*bad\.tar/0\.jpg"):
        CaptionShards(str(tmp_path / "bad.tar"), _transform(), None, max_bad_fraction=1.0)[0]
    shard(tmp_path / "packed.tar.gz", [("0.txt", b"caption")], "w:gz")
    with pytest.raises(ValueError, match=r"packed\.tar\.gz is not a readable uncompressed tar"):
        CaptionShards(str(tmp_path / "packed.tar.gz"), _transform(), None)
    shard(tmp_path / "no_caption.tar", [("0.png", b"x")])
    val = CaptionShards(str(tmp_path / "no_caption.tar"), _transform(), None, replace=False)
    assert "needs an image" in val[0]["error"] and val[0]["unreadable"].endswith("no_caption.tar/0.png")


# --------------------------------------------------------------------------------- retrieval

def test_retrieval_split(coco_val: list[CaptionRecord], openclip_tok: OpenClipBPE) -> None:
    split = RetrievalSplit.from_records(coco_val)
    assert split.num_images == 79 and split.num_captions == 395 and split.txt2img.shape == (395,)
    for t in range(split.num_captions):
        i = int(split.txt2img[t])
        assert t in split.img2txt[i] and split.captions[t] in coco_val[i].captions
    assert sorted(t for ts in split.img2txt for t in ts) == list(range(395))
    assert split.image_ids == [r.image_id for r in coco_val]

    three = RetrievalSplit.from_records(coco_val, max_captions_per_image=3)
    assert three.num_captions == 3 * 79 and all(len(ts) == 3 for ts in three.img2txt)

    # Duplicate image rows (as a pairs file can give) stay one gallery image.
    dup = RetrievalSplit.from_records([coco_val[0], CaptionRecord(coco_val[0].image_path, ["extra"], 0)])
    assert dup.num_images == 1 and dup.img2txt == [[0, 1, 2, 3, 4, 5]]

    from mmmae.vl.extract import ImageFiles  # the gallery's images, read as retrieval reads them
    item = ImageFiles(split.image_paths, _transform())[3]
    assert item["image"].shape == (3, 64, 64) and item["valid"] and item["path"] == coco_val[3].image_path
    ids, pad = split.tokenize(openclip_tok, batch_size=100)
    assert ids.shape == pad.shape == (395, S)
    assert torch.equal(ids[7], openclip_tok([split.captions[7]])[0][0])


# ------------------------------------------------------------------------ image normalisation (M3AE)


def test_m3ae_normalises_with_cc12m_statistics() -> None:
    """young-geng/m3ae_public m3ae/data.py ImageTextDataset: image_normalization='cc12m' by default,
    mean (0.5762, 0.5503, 0.5213), std (0.3207, 0.3169, 0.3307), after ToTensor's [0, 1]."""
    from mmmae.config import load_config, model_cfg
    from mmmae.vl.sources import caption_image_norm, caption_transform

    assert vdata.image_stats("cc12m") == ((0.5762, 0.5503, 0.5213), (0.3207, 0.3169, 0.3307))
    assert vdata.image_stats("imagenet") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with pytest.raises(ValueError, match="cc12m, imagenet, none"):
        vdata.image_stats("laion")
    rgb = (200, 100, 30)
    flat = Image.new("RGB", (40, 50), rgb)
    cfg = load_config("m3ae_tiny.yaml")
    mcfg = model_cfg(cfg.model)
    assert caption_image_norm(cfg) == "cc12m"
    mean, std = (0.5762, 0.5503, 0.5213), (0.3207, 0.3169, 0.3307)
    want = torch.tensor([(v / 255 - m) / s for v, m, s in zip(rgb, mean, std)])
    for split in ("train", "val"):
        x = caption_transform(cfg, mcfg, split)(flat)
        assert x.shape == (3, 32, 32)
        assert torch.allclose(x, want[:, None, None].expand_as(x), atol=1e-5), split
    # Named choices; "auto" follows the data: ImageNet's statistics for a source other than captions.
    other = load_config("m3ae_tiny.yaml", ["data.caption_image_norm=imagenet"])
    assert caption_image_norm(other) == "imagenet"
    assert caption_image_norm(load_config("image_mae_tiny.yaml")) == "imagenet"
    with pytest.raises(ValueError, match="got 'laion'"):
        caption_transform(load_config("m3ae_tiny.yaml", ["data.caption_image_norm=laion"]), mcfg, "val")
