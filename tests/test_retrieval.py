"""Retrieval on the shared M3AE encoder: the contrastive loss and its temperature, loading an M3AE
checkpoint, the cross-rank gather, and end to end on the real COCO sample: pretrain a tiny M3AE, fine-tune
``retrieval_coco_tiny.yaml`` from it, evaluate with ``tools/eval_retrieval.py`` and extract embeddings with
``tools/extract.py`` (images, captions, and videos from the real sample clips)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import mmmae  # noqa: E402
from conftest import COCO_MINI, VIDEOS, run_tool, tool_module  # noqa: E402
from mmmae.config import load_config  # noqa: E402
from mmmae.metrics import retrieval_metrics  # noqa: E402
from mmmae.vl.retrieval import MAX_LOGIT_SCALE, RetrievalModel, clip_contrastive_loss  # noqa: E402

TINY = {"size": "vit_tiny_test", "img_size": 32, "patch_size": 8, "max_len": 16}
CAPTIONS = COCO_MINI / "annotations" / "captions_train2017.json"
VAL_CAPTIONS = COCO_MINI / "annotations" / "captions_val2017.json"
needs_coco = pytest.mark.skipif(not CAPTIONS.is_file(), reason="needs shared/data/coco-mini")
METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def tiny_retrieval(seed: int = 0, **extra: object) -> RetrievalModel:
    torch.manual_seed(seed)
    model = mmmae.create_model("retrieval", **{**TINY, "proj_dim": 24, **extra})
    assert isinstance(model, RetrievalModel)
    return model


def coco_overrides(**extra: str) -> list[str]:
    base = {"data.captions": str(CAPTIONS), "data.images": str(COCO_MINI / "train2017"),
            "data.val_captions": str(VAL_CAPTIONS), "data.val_images": str(COCO_MINI / "val2017")}
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


# ------------------------------------------------------------------------------------------- loss


def test_loss_matches_open_clip_and_is_symmetric() -> None:
    from open_clip.loss import ClipLoss

    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    scale = torch.tensor(1 / 0.07)
    ours = clip_contrastive_loss(img, txt, scale)
    assert torch.allclose(ours, ClipLoss()(img, txt, scale), atol=1e-6)
    assert torch.allclose(ours, clip_contrastive_loss(txt, img, scale), atol=1e-6)
    # Matched pairs far apart from the rest: the loss goes to 0 as the scale grows.
    eye = torch.eye(6, 16)
    assert clip_contrastive_loss(eye, eye, torch.tensor(100.0)) < 1e-6
    assert clip_contrastive_loss(eye, eye, torch.tensor(1.0)) > 1.0


def test_forward_temperature_and_towers() -> None:
    model = tiny_retrieval().train()
    batch = model.example_batch(3)
    out = model(batch)
    assert set(out) == {"loss", "contrastive_loss", "logit_scale"}
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert not out["contrastive_loss"].requires_grad and not out["logit_scale"].requires_grad
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)  # CLIP's init, temperature 0.07
    out["loss"].backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs().item() > 0
    with torch.no_grad():
        img, txt = model.encode_image(batch["image"]), model.encode_text(batch["text"], batch["text_pad"])
        assert img.shape == (3, 24) and txt.shape == (3, 24)
        assert torch.allclose(img.norm(dim=-1), torch.ones(3)) and torch.allclose(txt.norm(dim=-1), torch.ones(3))
        # The loss is CLIP's over exactly these embeddings.
        assert torch.allclose(model.eval()(batch)["loss"], clip_contrastive_loss(img, txt, torch.tensor(1 / 0.07)),
                              atol=1e-5)
        # The temperature is clamped at 100, and gets no gradient there.
        model.logit_scale.fill_(math.log(1000.0))
    model.zero_grad()
    out = model.train()(batch)
    assert out["logit_scale"].item() == pytest.approx(MAX_LOGIT_SCALE)
    out["loss"].backward()
    assert model.logit_scale.grad.abs().item() == 0.0
    with pytest.raises(ValueError, match="text"):
        model({"image": batch["image"]})


def test_frozen_encoder_trains_only_heads_and_temperature() -> None:
    model = tiny_retrieval(freeze_encoder=True, drop_path_rate=0.1).train()
    assert not model.encoder.training  # no drop path in a frozen encoder
    assert all(not p.requires_grad for p in model.encoder.parameters())
    model(model.example_batch(2))["loss"].backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == {"logit_scale", "image_proj.net.weight", "image_proj.net.bias", "text_proj.net.weight",
                   "text_proj.net.bias"}


# ------------------------------------------------------------------------------------ loading


def test_load_pretrained_from_tiny_m3ae(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from mmmae.engine.trainer import load_init_weights

    torch.manual_seed(1)
    m3ae = mmmae.create_model("m3ae", **TINY).eval()
    model = tiny_retrieval(seed=2).eval()
    heads_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    path = tmp_path / "model.safetensors"
    save_file(m3ae.state_dict(), str(path))
    report = load_init_weights(model, str(path))  # the engine's init_from path
    assert report["missing"] == [] and report["unexpected"] == [] and report["part"] == "encoder"
    for k, v in m3ae.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[k], v), k
    for k, v in model.state_dict().items():  # projections and temperature stay fresh
        if k in heads_before:
            assert torch.equal(v, heads_before[k]), k
    batch = model.example_batch(2, seed=3)
    with torch.no_grad():
        # Both towers are the M3AE encoder itself: the features before projection are M3AE's.
        assert torch.allclose(model.image_features(batch["image"]), m3ae.encode_image(batch["image"]), atol=1e-6)
        assert torch.allclose(model.text_features(batch["text"], batch["text_pad"]),
                              m3ae.encode_text(batch["text"], batch["text_pad"]), atol=1e-6)

    # An image-only encoder (MAE) loads its vision part; the text weights are reported missing.
    mae = mmmae.create_model("mae", size="vit_tiny_test", img_size=32, patch_size=8)
    missing, unexpected = tiny_retrieval().load_pretrained(mae.state_dict())
    assert set(missing) == {"encoder.text_embed.weight", "encoder.type_embed.image", "encoder.type_embed.text"}
    assert unexpected == []
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_retrieval(vocab_size=1000).load_pretrained(m3ae.state_dict())
    with pytest.raises(KeyError, match="encoder"):
        tiny_retrieval().load_pretrained({"head.weight": torch.zeros(1)})


# ------------------------------------------------------------------------- several processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toy_features(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.normalize(x @ w, dim=-1)


def _gather_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        xi, xt = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
        wi = torch.randn(5, 4, generator=g).requires_grad_()
        wt = torch.randn(5, 4, generator=g).requires_grad_()
        rows = slice(rank * 4, rank * 4 + 4)
        loss = clip_contrastive_loss(_toy_features(xi[rows], wi), _toy_features(xt[rows], wt), torch.tensor(10.0))
        loss.backward()
        for p in (wi, wt):  # what data parallelism does: average the gradients over ranks
            dist.all_reduce(p.grad)
            p.grad /= world
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        torch.save({"loss": mean_loss / world, "wi": wi.grad, "wt": wt.grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gathered_loss_equals_the_global_batch_loss(tmp_path: Path) -> None:
    """Two gloo processes with 4 pairs each give the loss and the (rank-averaged) gradient of one
    process holding all 8 pairs."""
    import torch.multiprocessing as mp

    mp.spawn(_gather_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    g = torch.Generator().manual_seed(0)
    xi, xt = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    wi = torch.randn(5, 4, generator=g).requires_grad_()
    wt = torch.randn(5, 4, generator=g).requires_grad_()
    ref = clip_contrastive_loss(_toy_features(xi, wi), _toy_features(xt, wt), torch.tensor(10.0), gather=False)
    ref.backward()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(got["loss"], ref.detach(), atol=1e-6)
        assert torch.allclose(got["wi"], wi.grad, atol=1e-6) and torch.allclose(got["wt"], wt.grad, atol=1e-6)


# ------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny M3AE pretrained on coco-mini, and the retrieval model fine-tuned from it (both through
    tools/train.py, one process)."""
    if not CAPTIONS.is_file():
        pytest.skip("needs shared/data/coco-mini")
    root = tmp_path_factory.mktemp("retrieval_runs")
    common = ["train.progress=false", "train.vis_every=0", "train.ckpt_every=100", "train.log_every=2"]
    run_tool("train.py", ["--config", "m3ae_tiny.yaml", *coco_overrides(), f"output_dir={root / 'm3ae'}",
                          "train.max_steps=4", *common])
    m3ae = root / "m3ae" / "model.safetensors"
    run_tool("train.py", ["--config", "retrieval_coco_tiny.yaml", *coco_overrides(), f"output_dir={root / 'ret'}",
                          f"init_from={m3ae}", "train.max_steps=4", *common])
    return {"root": root, "m3ae": m3ae, "retrieval": root / "ret" / "model.safetensors", "ret_dir": root / "ret"}


def _val_truth() -> tuple[list[str], dict[int, str], list[dict]]:
    data = json.loads(VAL_CAPTIONS.read_text())
    files = {img["id"]: img["file_name"] for img in data["images"]}
    return sorted(files.values()), files, data["annotations"]


@needs_coco
@pytest.mark.slow
def test_finetune_from_m3ae_loads_every_encoder_weight(runs: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    init = json.loads((runs["ret_dir"] / "init_report.json").read_text())
    assert init["missing"] == [] and init["unexpected"] == []
    rows = [json.loads(line) for line in (runs["ret_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert math.isfinite(r["contrastive_loss"]) and r["loss"] == pytest.approx(r["contrastive_loss"])
    state = load_file(str(runs["retrieval"]))
    assert {"logit_scale", "image_proj.net.weight", "text_proj.net.weight"} <= set(state)
    model = mmmae.create_model("retrieval", **TINY, proj_dim=32)
    model.load_state_dict(state, strict=True)


@needs_coco
@pytest.mark.slow
def test_eval_and_extract_agree_on_coco_mini(runs: dict[str, Path], tmp_path: Path) -> None:
    ckpt = str(runs["retrieval"])
    common = ["--config", "retrieval_coco_tiny.yaml", "--checkpoint", ckpt, *coco_overrides()]
    report_path = tmp_path / "eval.json"
    run_tool("eval_retrieval.py", [*common, "--out", str(report_path)])
    report = json.loads(report_path.read_text())
    files, file_of, anns = _val_truth()
    m = report["metrics"]
    for k in METRIC_KEYS:
        assert k in m and 0.0 <= m[k] <= (600.0 if k == "rsum" else 100.0), (k, m)
    assert m["rsum"] == pytest.approx(sum(m[k] for k in METRIC_KEYS[:6]))
    assert m["i2t_medr"] >= 1 and m["t2i_medr"] >= 1
    p = report["protocol"]
    assert p["num_images"] == p["num_images_scored"] == len(files) == 79
    assert p["num_captions"] == p["num_captions_scored"] == len(anns) == 395
    assert p["captions_per_image"] == 5 and p["format"] == "coco"
    assert report["checkpoint"] == ckpt and report["num_unreadable"] == 0 and report["unreadable"] == []

    # The same checkpoint through tools/extract.py (in this process): images of the val folder,
    # captions of the val json.
    out, extract = tmp_path / "emb", tool_module("extract")
    assert extract.main([*common, "--modality", "image", "--input", str(COCO_MINI / "val2017"),
                         "--out", str(out / "img"), "--normalize"]) == 0
    assert extract.main([*common, "--modality", "text", "--input", str(VAL_CAPTIONS), "--out", str(out / "txt"),
                         "--normalize"]) == 0
    img, txt = np.load(out / "img.npy"), np.load(out / "txt.npy")
    img_ids = (out / "img.ids.txt").read_text().splitlines()
    txt_ids = (out / "txt.ids.txt").read_text().splitlines()
    assert img.dtype == np.float32 and img.shape == (79, 32) and img_ids == files
    assert txt.dtype == np.float32 and txt.shape == (395, 32) and txt_ids == [str(a["id"]) for a in anns]
    for name in ("img", "txt"):
        rep = json.loads((out / f"{name}.report.json").read_text())
        assert rep["num_skipped"] == 0 and rep["num_embedded"] == rep["num_inputs"] and rep["unit_norm"]
    # Recall recomputed from the extracted files matches the evaluation's report.
    row_of = {f: i for i, f in enumerate(img_ids)}
    txt2img = torch.tensor([row_of[file_of[a["image_id"]]] for a in anns])
    again = retrieval_metrics(torch.from_numpy(img), torch.from_numpy(txt), txt2img)
    for k in (*METRIC_KEYS, "i2t_medr", "t2i_medr"):
        assert again[k] == pytest.approx(m[k], abs=1e-6), k


@needs_coco
@pytest.mark.slow
def test_extract_videos_into_the_joint_space(runs: dict[str, Path], tmp_path: Path) -> None:
    ckpt = str(runs["retrieval"])
    common = ["--config", "retrieval_coco_tiny.yaml", "--checkpoint", ckpt]
    run_tool("extract.py", [*common, "--modality", "video", "--input", str(VIDEOS), "--out", str(tmp_path / "vid"),
                            "--normalize"])
    vids = sorted(p.name for p in VIDEOS.iterdir() if p.suffix in (".mp4", ".avi", ".mkv", ".mov"))
    good = [v for v in vids if v != "corrupted.mp4"]
    emb = np.load(tmp_path / "vid.npy")
    ids = (tmp_path / "vid.ids.txt").read_text().splitlines()
    rep = json.loads((tmp_path / "vid.report.json").read_text())
    assert ids == good and emb.shape == (len(good), 32) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert rep["num_inputs"] == len(vids) and rep["num_embedded"] == len(good) and rep["num_skipped"] == 1
    assert rep["skipped"][0]["id"] == "corrupted.mp4" and rep["skipped"][0]["reason"]
    assert "mean over" in rep["embedding"] and rep["protocol"]["pooling"] == "mean over frames"

    # A list file (``path label`` lines under --root) gives the same rows, in list order, in process.
    from mmmae.embedding import extract
    listing = tmp_path / "videos.txt"
    listing.write_text("cleaning_pool.mp4 1\ncorrupted.mp4 0\narm_wrestling.mp4 5\n")
    cfg = load_config("retrieval_coco_tiny.yaml")
    again = extract(cfg, ckpt, "video", str(listing), str(tmp_path / "list"), normalize=True, root=str(VIDEOS),
                    progress=False)
    assert again["num_skipped"] == 1 and again["skipped"][0]["id"] == "corrupted.mp4"
    rows = np.load(tmp_path / "list.npy")
    assert (tmp_path / "list.ids.txt").read_text().splitlines() == ["cleaning_pool.mp4", "arm_wrestling.mp4"]
    assert np.allclose(rows, emb[[ids.index("cleaning_pool.mp4"), ids.index("arm_wrestling.mp4")]], atol=1e-5)


@needs_coco
@pytest.mark.slow
def test_eval_on_m3ae_and_unreadable_images(runs: dict[str, Path], tmp_path: Path) -> None:
    from mmmae.vl.evaluation import evaluate_retrieval
    from mmmae.embedding import extract

    # Straight on the M3AE checkpoint: pooled encoder features, no projection.
    cfg = load_config("m3ae_tiny.yaml", coco_overrides())
    rep = evaluate_retrieval(cfg, str(runs["m3ae"]), progress=False)
    assert all(0.0 <= rep["metrics"][k] <= 100.0 for k in METRIC_KEYS[:6])
    assert "pooled encoder feature" in rep["protocol"]["embedding"]["image"]
    # The M3AE checkpoint with the retrieval config would go through random projections: refused.
    ret_cfg = load_config("retrieval_coco_tiny.yaml", coco_overrides())
    with pytest.raises(ValueError, match="projections"):
        evaluate_retrieval(ret_cfg, str(runs["m3ae"]), progress=False)

    # A split with an unreadable image: listed and counted, left out with its captions.
    data = json.loads(VAL_CAPTIONS.read_text())
    images = data["images"][:4]
    keep = {img["id"] for img in images}
    anns = [a for a in data["annotations"] if a["image_id"] in keep]
    folder = tmp_path / "val"
    folder.mkdir()
    for img in images[:3]:
        shutil.copy(COCO_MINI / "val2017" / img["file_name"], folder / img["file_name"])
    (folder / images[3]["file_name"]).write_bytes(b"not a jpeg")
    split = tmp_path / "captions.json"
    split.write_text(json.dumps({"images": images, "annotations": anns}))
    cfg = load_config("retrieval_coco_tiny.yaml", coco_overrides(**{"data.val_captions": str(split),
                                                                   "data.val_images": str(folder)}))
    rep = evaluate_retrieval(cfg, str(runs["retrieval"]), progress=False)
    assert rep["num_unreadable"] == 1 and rep["unreadable"][0]["path"].endswith(images[3]["file_name"])
    p = rep["protocol"]
    assert (p["num_images"], p["num_images_scored"]) == (4, 3)
    assert (p["num_captions"], p["num_captions_scored"]) == (len(anns), len(anns) - 5)
    # Extraction skips the same file with its reason; blank caption lines are skipped, ids are line numbers.
    got = extract(cfg, str(runs["retrieval"]), "image", str(folder), str(tmp_path / "x" / "img"), progress=False)
    assert got["num_embedded"] == 3 and got["skipped"][0]["id"] == images[3]["file_name"]
    lines = tmp_path / "captions.txt"
    lines.write_text("a dog on a couch\n\ntwo people at a table\n")
    got = extract(cfg, str(runs["retrieval"]), "text", str(lines), str(tmp_path / "x" / "txt"), progress=False)
    assert (tmp_path / "x" / "txt.ids.txt").read_text().splitlines() == ["1", "3"]
    assert got["skipped"] == [{"id": "2", "reason": "empty caption"}]
    # Impossible pairs are refused before any input is read.
    mae_cfg = load_config("image_mae_tiny.yaml")
    with pytest.raises(ValueError, match="no text encoder"):
        extract(mae_cfg, str(runs["m3ae"]), "text", str(lines), str(tmp_path / "x" / "no"), progress=False)


@needs_coco
@pytest.mark.slow
def test_eval_reads_caption_shards_as_it_reads_files(runs: dict[str, Path], tmp_path: Path) -> None:
    """Tar shards are an evaluation source too: each sample (an image and its caption) is one gallery
    entry; a corrupt member is listed and left out; a sample without a caption is not in the gallery.
    The scores equal those of a pairs file holding the same readable images and captions."""
    import csv
    import tarfile

    from mmmae.vl.evaluation import evaluate_retrieval

    data = json.loads(VAL_CAPTIONS.read_text())
    images = data["images"][:6]
    first = {}
    for a in data["annotations"]:
        first.setdefault(a["image_id"], a["caption"].strip())

    def add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        with tarfile.open(shards / f"val-{s:03d}.tar", "w") as tar:
            for k, img in enumerate(images[3 * s:3 * s + 3]):
                key = f"{3 * s + k:06d}"
                jpeg = b"not a jpeg" if key == "000004" else (COCO_MINI / "val2017" / img["file_name"]).read_bytes()
                add(tar, f"{key}.jpg", jpeg)
                if key != "000005":  # the last sample has no caption
                    add(tar, f"{key}.txt", first[img["id"]].encode())
    ckpt = str(runs["retrieval"])
    cfg = load_config("retrieval_coco_tiny.yaml", coco_overrides(**{"data.val_captions": str(shards / "val-{000..001}.tar"),
                                                                   "data.val_images": ""}))
    rep = evaluate_retrieval(cfg, ckpt, progress=False)
    p = rep["protocol"]
    assert p["format"] == "shards" and (p["num_images"], p["num_images_scored"]) == (5, 4)
    assert (p["num_captions"], p["num_captions_scored"]) == (5, 4)
    assert rep["num_unreadable"] == 1 and rep["unreadable"][0]["path"].endswith("val-001.tar/000004.jpg")

    pairs = tmp_path / "pairs.csv"
    with open(pairs, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for img in images[:4]:
            w.writerow([img["file_name"], first[img["id"]]])
    files = evaluate_retrieval(load_config("retrieval_coco_tiny.yaml", coco_overrides(**{
        "data.val_captions": str(pairs), "data.val_images": str(COCO_MINI / "val2017")})), ckpt, progress=False)
    for k in METRIC_KEYS:
        assert rep["metrics"][k] == pytest.approx(files["metrics"][k], abs=1e-6), k
