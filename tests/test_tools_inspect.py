"""Tools to look inside a model, on the real sample data with tiny checkpoints trained once per module:
the reconstruction viewer (tools/visualize.py), sliding-window video features (tools/extract.py
--windows/--layer) and the nearest-neighbour index (tools/extract.py --index, tools/search.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from conftest import COCO_MINI, FASHION_MNIST, ROOT, VIDEOS, run_tool, tool_module
from mmmae.config import load_config
from mmmae.visualize import MASK_FILL, image_views, video_views

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])
VAL_IMAGES = COCO_MINI / "val2017"
CAPTIONS = COCO_MINI / "annotations" / "captions_train2017.json"
GOOD_VIDEOS = ["arm_wrestling.mp4", "cleaning_pool.mp4", "applying_eye_makeup.avi", "flipping_pancake.mkv"]
VIDEO_DATA = [f"data.root={VIDEOS}", f"data.class_list={VIDEOS / 'kinetics400_classes.txt'}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, dist_group: None) -> dict[str, Path]:
    """Tiny MAE (Fashion-MNIST), VideoMAE (sample clips) and M3AE (coco-mini) runs, in process."""
    for need in (FASHION_MNIST, VIDEOS, CAPTIONS):
        if not need.exists():
            pytest.skip(f"needs the sample data at {need}")
    from mmmae.engine.trainer import train
    root = tmp_path_factory.mktemp("inspect_runs")
    common = ["train.progress=false", "train.vis_every=0", "train.log_every=2"]
    recipes = {
        "mae": ("image_mae_tiny.yaml", ["train.max_steps=4", "train.ckpt_every=4"]),
        "videomae": ("video_mae_tiny.yaml", ["train.max_steps=2", "train.ckpt_every=2", *VIDEO_DATA]),
        "m3ae": ("m3ae_tiny.yaml", ["train.max_steps=4", "train.ckpt_every=4", f"data.captions={CAPTIONS}",
                                    f"data.images={COCO_MINI / 'train2017'}"]),
    }
    out = {}
    for key, (config, extra) in recipes.items():
        train(load_config(config, [f"output_dir={root / key}", *common, *extra]))
        out[key] = root / key / "model.safetensors"
    return out


def _patches_mae(img: torch.Tensor, p: int) -> torch.Tensor:
    """MAE models_mae.py patchify: (N, 3, H, W) -> (N, L, p*p*3) via 'nchpwq->nhwpqc'."""
    n, c, h, w = img.shape
    x = img.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


# ------------------------------------------------------------------------------------- the views


def test_image_views_invert_maes_per_patch_target() -> None:
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 16, 16, generator=g)
    img = (pixels - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
    # MAE forward_loss's norm_pix_loss target: (target - mean) / (var + 1e-6) ** .5, unbiased var.
    t = _patches_mae(img, 8)
    target = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    mask = torch.tensor([[True, False, False, True], [False, True, True, True]])
    views = image_views(img, target, mask, 8, norm_pix=True)
    assert torch.allclose(views["reconstruction"], pixels, atol=1e-5)
    assert torch.allclose(views["pasted"], pixels, atol=1e-5)
    assert torch.allclose(views["original"], pixels, atol=1e-5)
    masked = views["masked"]
    assert torch.all(masked[0, :, :8, :8] == MASK_FILL) and torch.allclose(masked[0, :, :8, 8:], pixels[0, :, :8, 8:])
    # Without norm_pix the prediction is the normalised patch itself.
    plain = image_views(img, _patches_mae(img, 8), mask, 8, norm_pix=False)
    assert torch.allclose(plain["reconstruction"], pixels, atol=1e-5)


def test_video_views_invert_videomaes_per_channel_target() -> None:
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(1, 3, 4, 16, 16, generator=g)
    video = (pixels - IMAGENET_MEAN[:, None, None, None]) / IMAGENET_STD[:, None, None, None]
    # VideoMAE run_videomae_vis.py: per tubelet and channel, (x - mean) / (var(unbiased).sqrt() + 1e-6).
    sq = rearrange(pixels, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c", p0=2, p1=8, p2=8)
    norm = (sq - sq.mean(-2, keepdim=True)) / (sq.var(-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
    target = rearrange(norm, "b n p c -> b n (p c)")
    shown = torch.zeros(1, 8, dtype=torch.bool)
    shown[0, [0, 5, 6]] = True
    views = video_views(video, target, shown, 8, 2, norm_pix=True)
    assert views["reconstruction"].shape == (1, 3, 4, 16, 16)
    assert torch.allclose(views["reconstruction"], pixels, atol=1e-5)
    assert torch.all(views["masked"][0, :, :2, :8, :8] == MASK_FILL)  # token 0: frames 0-1, top-left


def test_the_epsilon_rule_per_reference_on_a_flat_tubelet() -> None:
    # A flat tubelet (std 0) predicted as +1 std: VideoMAE's std + 1e-6 gives 0.5 + 1e-6, OmniMAE's
    # (var + 1e-6) ** 0.5 gives 0.5 + 1e-3.
    pixels = torch.full((1, 3, 2, 8, 8), 0.5)
    video = (pixels - IMAGENET_MEAN[:, None, None, None]) / IMAGENET_STD[:, None, None, None]
    pred, shown = torch.ones(1, 1, 2 * 8 * 8 * 3), torch.ones(1, 1, dtype=torch.bool)
    vmae = video_views(video, pred, shown, 8, 2, norm_pix=True)["reconstruction"]
    omni = video_views(video, pred, shown, 8, 2, norm_pix=True, eps_inside_sqrt=True)["reconstruction"]
    assert torch.allclose(vmae, torch.full_like(vmae, 0.5 + 1e-6), atol=2e-7)
    assert torch.allclose(omni, torch.full_like(omni, 0.5 + 1e-3), atol=1e-6)


# ------------------------------------------------------------------------------- tools/visualize.py


def _panels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_visualize_an_image_with_a_seeded_mask(runs: dict[str, Path], tmp_path: Path) -> None:
    vis = tool_module("visualize")
    image = str(sorted(VAL_IMAGES.iterdir())[0])
    common = ["--config", "image_mae_tiny.yaml", "--checkpoint", str(runs["mae"]), "--input", image]
    for name, extra in (("a", []), ("b", []), ("c", ["--seed", "3"]), ("half", ["--mask-ratio", "0.5"])):
        assert vis.main([*common, "--out", str(tmp_path / f"{name}.png"), *extra]) == 0
    a = _panels(tmp_path / "a.png")
    # 32-px model, four panels side by side, enlarged 8x: 256 x 1024.
    assert a.shape == (256, 1024, 3)
    assert np.array_equal(a, _panels(tmp_path / "b.png")) and not np.array_equal(a, _panels(tmp_path / "c.png"))

    def hidden_patches(panel: np.ndarray) -> int:
        # the "masked" panel (second quarter) in 64-px patches (8 px x 8): flat MASK_FILL grey = hidden
        masked = panel[:, 256:512].reshape(4, 64, 4, 64, 3).transpose(0, 2, 1, 3, 4).reshape(16, -1)
        return int((masked == round(MASK_FILL * 255)).all(axis=1).sum())

    # MAE keeps int(L * (1 - r)) of L = 16 patches: 4 at 0.75 (12 hidden), 8 at 0.5.
    assert hidden_patches(a) == 12 and hidden_patches(_panels(tmp_path / "half.png")) == 8
    # The pasted panel is the original wherever a patch was visible.
    orig, pasted = a[:, :256].astype(int), a[:, 768:].astype(int)
    visible = (a[:, 256:512] != round(MASK_FILL * 255)).any(axis=2)
    assert np.abs(orig - pasted)[visible].max() <= 1


def test_visualize_a_video_as_gif_and_mp4(runs: dict[str, Path], tmp_path: Path) -> None:
    import av
    vis = tool_module("visualize")
    common = ["--config", "video_mae_tiny.yaml", "--checkpoint", str(runs["videomae"]), "--input",
              str(VIDEOS / "arm_wrestling.mp4"), *VIDEO_DATA]
    cfg = load_config("video_mae_tiny.yaml", VIDEO_DATA)
    got = vis.visualize(cfg, str(runs["videomae"]), str(VIDEOS / "arm_wrestling.mp4"), str(tmp_path / "v.gif"),
                        mask_ratio=0.5)
    # VideoMAE's tube mask hides int(0.5 * 16) = 8 of the 16 patches of each of the 2 time slices.
    assert (got["hidden"], got["tokens"], got["frames"]) == (16, 32, 4)
    gif = Image.open(tmp_path / "v.gif")
    assert gif.n_frames == 4 and gif.size == (1024, 256)
    assert vis.main([*common, "--out", str(tmp_path / "v.mp4")]) == 0
    with av.open(str(tmp_path / "v.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 4 and frames[0].shape == (256, 1024, 3)


def test_visualize_names_what_is_wrong(runs: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    vis = tool_module("visualize")
    image = str(sorted(VAL_IMAGES.iterdir())[0])
    bad_jpg, bad_mp4 = tmp_path / "broken.jpg", tmp_path / "broken.mp4"
    bad_jpg.write_bytes(b"not a jpeg at all")
    bad_mp4.write_bytes(b"\x00" * 4096)
    cases = [
        (["--config", "video_mae_tiny.yaml", "--checkpoint", str(runs["mae"]), "--input", str(VIDEOS / "arm_wrestling.mp4"),
          "--out", str(tmp_path / "x.gif")], [str(runs["mae"]), "'videomae'"]),
        (["--config", "m3ae_tiny.yaml", "--checkpoint", str(runs["mae"]), "--input", image, "--out", str(tmp_path / "x.png")],
         [str(runs["mae"]), "'m3ae'"]),
        (["--config", "image_mae_tiny.yaml", "--checkpoint", str(runs["mae"]), "--input", str(bad_jpg),
          "--out", str(tmp_path / "x.png")], [str(bad_jpg)]),
        (["--config", "video_mae_tiny.yaml", "--checkpoint", str(runs["videomae"]), "--input", str(bad_mp4),
          "--out", str(tmp_path / "x.gif")], [str(bad_mp4)]),
        (["--config", "image_mae_tiny.yaml", "--checkpoint", str(runs["mae"]), "--input", str(VIDEOS / "arm_wrestling.mp4"),
          "--out", str(tmp_path / "x.gif")], ["'mae' reconstructs images"]),
    ]
    for argv, names in cases:
        capsys.readouterr()
        assert vis.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert all(n in err for n in names), (names, err)


# ------------------------------------------------------------------------------ sliding windows


def test_window_starts_are_videomaev2s() -> None:
    from mmmae.video.extract import parse_windows, window_offsets, window_starts
    # extract_tad_feature.py: range(0, num_frames - 15, 4) (THUMOS14) and stride 16 (FineAction).
    for n in (16, 17, 31, 280, 300):
        assert window_starts(n, 16, 4) == list(range(0, n - 15, 4))
        assert window_starts(n, 16, 16) == list(range(0, n - 15, 16))
    assert len(window_starts(280, 16, 4)) == 67 and window_starts(300, 16, 16)[-1] == 272
    assert window_starts(15, 16, 4) == []
    assert window_offsets(16, 16, "videomae") == list(range(16))  # the reference: consecutive frames
    assert window_offsets(16, 4, "videomae") == [0, 4, 8, 12]
    assert parse_windows("16:4") == (16, 4)
    for bad in ("16", "16:0", "a:b", "4:2:1"):
        with pytest.raises(ValueError, match="LEN:STRIDE"):
            parse_windows(bad)
    with pytest.raises(ValueError, match="does not split"):
        window_offsets(10, 4, "videomae")


def _reference_window(path: Path, start: int, offsets: list[int], size: int) -> torch.Tensor:
    """extract_tad_feature.py's input for one window: frames / 255, F.interpolate to (S, S) bilinear."""
    from mmmae.video.decoding import open_video
    with open_video(str(path)) as reader:
        frames = reader.read([start + o for o in offsets])  # (T, H, W, 3)
    vid = frames.permute(3, 0, 1, 2).float() / 255  # (3, T, H, W), resized as 4-D: spatially
    return F.interpolate(vid, size=(size, size), mode="bilinear", align_corners=False)[None]


@pytest.fixture(scope="module")
def windows(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("windows")
    listing = out / "videos.txt"
    listing.write_text("".join(f"{v}\n" for v in [*GOOD_VIDEOS[:2], "corrupted.mp4", *GOOD_VIDEOS[2:]]))
    argv = ["--config", "video_mae_tiny.yaml", "--checkpoint", str(runs["videomae"]), "--modality", "video",
            "--input", str(listing), "--root", str(VIDEOS), "--out", str(out / "win"), "--windows", "16:8",
            "--index", "--no-progress", *VIDEO_DATA]
    assert tool_module("extract").main(argv) == 0
    return out / "win"


def test_windows_over_whole_videos(runs: dict[str, Path], windows: Path) -> None:
    import mmmae
    from mmmae.video.decoding import open_video
    rows = np.load(f"{windows}.npy")
    ids = Path(f"{windows}.ids.txt").read_text().splitlines()
    report = json.loads(Path(f"{windows}.report.json").read_text())
    expected = []
    for v in GOOD_VIDEOS:
        with open_video(str(VIDEOS / v)) as reader:
            expected += [f"{v}#{s}" for s in range(0, reader.num_frames - 15, 8)]
    assert ids == expected and rows.shape == (len(expected), 32) and rows.dtype == np.float32
    assert [s["id"] for s in report["skipped"]] == ["corrupted.mp4"]
    assert report["protocol"]["frames_per_window"] == 4 and report["protocol"]["frame_step"] == 4
    # One row recomputed the reference's way: a 16-frame window of the 4-frame model takes every 4th
    # frame; frames in [0, 1], resized bilinear; the model's pooled tokens (patch-token mean).
    model = mmmae.create_model("videomae", size="vit_tiny_test", img_size=32, patch_size=8, num_frames=4)
    from safetensors.torch import load_file
    model.load_state_dict(load_file(str(runs["videomae"])))
    model.eval()
    row = ids.index("cleaning_pool.mp4#40")
    with torch.no_grad():
        feat = model.encoder.forward_features(_reference_window(VIDEOS / "cleaning_pool.mp4", 40, [0, 4, 8, 12], 32))
    assert np.allclose(rows[row], feat.mean(dim=1)[0].numpy(), atol=1e-4)


def test_layer_takes_a_blocks_output(runs: dict[str, Path], tmp_path: Path) -> None:
    import mmmae
    from safetensors.torch import load_file

    from mmmae.video.extract import extract_windows
    cfg = load_config("video_mae_tiny.yaml", VIDEO_DATA)
    listing = tmp_path / "one.txt"
    listing.write_text("applying_eye_makeup.avi\n")
    got = {k: extract_windows(cfg, str(runs["videomae"]), str(listing), str(tmp_path / f"l{k}"), length=4, stride=80,
                              layer=k, root=str(VIDEOS), progress=False) for k in (0, -1)}
    assert got[0]["layer"] == 0 and "block 0" in got[0]["embedding"]
    model = mmmae.create_model("videomae", size="vit_tiny_test", img_size=32, patch_size=8, num_frames=4)
    model.load_state_dict(load_file(str(runs["videomae"])))
    depth = len(model.encoder.blocks)
    for k in (0, -1):
        # Block k's output = the trunk cut after block k, without the final norm; mean over tokens.
        cut = copy.deepcopy(model.encoder).eval()
        cut.blocks = cut.blocks[: (k % depth) + 1]
        cut.norm = torch.nn.Identity()
        rows = np.load(tmp_path / f"l{k}.npy")
        assert rows.shape == (3, 32)  # 164 frames: starts 0, 80, 160
        with torch.no_grad():
            want = cut.forward_features(_reference_window(VIDEOS / "applying_eye_makeup.avi", 80, [0, 1, 2, 3], 32))
        assert np.allclose(rows[1], want.mean(dim=1)[0].numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="outside the encoder's"):
        extract_windows(cfg, str(runs["videomae"]), str(listing), str(tmp_path / "bad"), length=4, stride=4,
                        layer=depth, root=str(VIDEOS), progress=False)


def test_a_window_longer_than_a_video_is_named(runs: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--config", "video_mae_tiny.yaml", "--checkpoint", str(runs["videomae"]), "--modality", "video",
            "--input", str(VIDEOS), "--out", str(tmp_path / "w"), "--windows", "4:2", "--no-progress", *VIDEO_DATA]
    assert tool_module("extract").main(argv) == 2
    err = capsys.readouterr().err
    assert "rotated_90.mov" in err and "window of 4 frames" in err and "has 3 frames" in err


# ------------------------------------------------------------------------------ the index


def _brute_force(prefix: Path, query: np.ndarray, k: int) -> tuple[list[str], np.ndarray]:
    rows = np.load(f"{prefix}.npy")
    ids = Path(f"{prefix}.ids.txt").read_text().splitlines()
    scores = rows @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return [ids[i] for i in order], scores[order]


@pytest.fixture(scope="module")
def image_index(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("index") / "coco"
    argv = ["--config", "m3ae_tiny.yaml", "--checkpoint", str(runs["m3ae"]), "--modality", "image", "--input",
            str(VAL_IMAGES), "--out", str(out / "img"), "--normalize", "--index", "--no-progress"]
    assert tool_module("extract").main(argv) == 0
    return out / "img"


def test_search_agrees_with_brute_force(image_index: Path) -> None:
    from mmmae.embedding import embed_query
    search = tool_module("search")
    meta = json.loads(Path(f"{image_index}.index.json").read_text())
    assert meta["kind"] == "flat" and meta["rows"] == 79 and meta["dim"] == 32
    assert meta["source"]["modality"] == "image" and meta["source"]["config"] == "m3ae_tiny.yaml"
    cfg = load_config("m3ae_tiny.yaml")
    image = str(sorted(VAL_IMAGES.iterdir())[5])
    for query, modality in ((image, "image"), ("a dog sitting on a couch", "text")):
        got = search.run_search(str(image_index), query, k=10)
        assert got["modality"] == modality and len(got["matches"]) == 10
        vec = embed_query(cfg, meta["source"]["checkpoint"], query, modality, normalize=True)[0].numpy()
        ids, scores = _brute_force(image_index, vec, 10)
        assert [m["id"] for m in got["matches"]] == ids
        assert np.allclose([m["score"] for m in got["matches"]], scores, atol=1e-5)
    # The image finds itself first, at cosine 1.
    first = search.run_search(str(image_index.parent), image, k=1)["matches"][0]
    assert first["id"] == Path(image).name and first["score"] == pytest.approx(1.0, abs=1e-5)


def test_ivf_index_searched_exhaustively_is_exact(runs: dict[str, Path], image_index: Path, tmp_path: Path) -> None:
    from mmmae.index import build_index, choose_index, load_index, search
    for suffix in (".npy", ".ids.txt"):
        (tmp_path / f"img{suffix}").write_bytes(Path(f"{image_index}{suffix}").read_bytes())
    meta = build_index(tmp_path / "img", {"note": "forced IVF"}, ivf_min_rows=1)
    # nlist = round(sqrt(79)) = 9, nprobe = round(sqrt(9)) = 3; the documented threshold is 10,000 rows.
    assert (meta["kind"], meta["nlist"], meta["nprobe"]) == ("ivf", 9, 3)
    assert choose_index(9_999) == {"kind": "flat"} and choose_index(10_000)["nlist"] == 100
    index, _, ids = load_index(tmp_path / "img")
    rows = np.load(tmp_path / "img.npy")
    scores, found = search(index, rows[:4], 5, nprobe=9)
    for q in range(4):
        want_ids, want_scores = _brute_force(tmp_path / "img", rows[q], 5)
        assert [ids[i] for i in found[q]] == want_ids and np.allclose(scores[q], want_scores, atol=1e-5)


def test_window_index_search_and_cli(windows: Path) -> None:
    from mmmae.video.extract import embed_window_query
    meta = json.loads(Path(f"{windows}.index.json").read_text())
    assert meta["source"]["windows"] == [16, 8] and meta["source"]["window_norm"] == "none"
    res = run_tool("search.py", ["--index", str(windows), "--query", str(VIDEOS / "cleaning_pool.mp4"), "--k", "5",
                                 *VIDEO_DATA])
    lines = [line.split("\t") for line in res.stdout.splitlines()]
    assert [int(r) for r, _, _ in lines] == [1, 2, 3, 4, 5]
    # The query is its middle 16-frame window, embedded as the rows were.
    vec = embed_window_query(load_config("video_mae_tiny.yaml", VIDEO_DATA), meta["source"]["checkpoint"],
                             str(VIDEOS / "cleaning_pool.mp4"), length=16)[0].numpy()
    ids, scores = _brute_force(windows, vec, 5)
    assert [i for _, _, i in lines] == ids
    assert np.allclose([float(s) for _, s, _ in lines], scores, rtol=1e-5, atol=1e-4)


def test_index_refusals(image_index: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mmmae.index import build_index, load_index
    search = tool_module("search")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert search.main(["--index", str(empty), "--query", "a cat"]) == 2
    assert f"no index in {empty}: the folder is empty" in capsys.readouterr().err
    (empty / "notes.txt").write_text("x")
    assert search.main(["--index", str(empty), "--query", "a cat"]) == 2
    assert "holds no *.index.json" in capsys.readouterr().err
    assert search.main(["--index", str(image_index), "--query", str(tmp_path / "missing.jpg")]) == 2
    assert "missing.jpg" in capsys.readouterr().err
    # 79 rows x 32 dims x 4 bytes = 10,112 bytes: refused with 10,000 available, when building and loading.
    with pytest.raises(MemoryError, match=r"79 rows x 32 dims"):
        build_index(image_index, {}, available=10_000)
    with pytest.raises(MemoryError, match=r"79 rows x 32 dims"):
        load_index(image_index, available=10_000)
    assert load_index(image_index, available=10_112)[0].ntotal == 79
