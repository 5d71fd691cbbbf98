"""Image sources on real files: an ImageFolder of COCO photos, the Fashion-MNIST idx files, MAE's
transforms."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import COCO_MINI
from mmmae.data.collate import collate_dicts
from mmmae.data.transforms import eval_transform, mae_train_transform
from mmmae.image.datasets import FashionMNIST, ImageFolder

pytestmark = pytest.mark.skipif(not COCO_MINI.is_dir(), reason="shared COCO sample not found")


def _photos(n: int) -> list[Path]:
    return sorted((COCO_MINI / "val2017").glob("*.jpg"))[:n]


def test_image_folder_with_classes_and_an_unreadable_file(tmp_path: Path) -> None:
    for i, p in enumerate(_photos(6)):
        d = tmp_path / ("cat" if i % 2 else "dog")
        d.mkdir(exist_ok=True)
        shutil.copy(p, d / p.name)
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ds = ImageFolder(tmp_path, mae_train_transform(32), max_bad_fraction=0.5)
    assert ds.classes == ["cat", "dog"] and len(ds) == 7
    broken = next(i for i, (p, _) in enumerate(ds.items) if p.name == "broken.jpg")
    sample = ds[broken]
    assert sample["skipped"] == 1 and sample["image"].shape == (3, 32, 32) and sample["label"] in (0, 1)
    batch = collate_dicts([ds[i] for i in range(len(ds))])
    assert batch["image"].shape == (7, 3, 32, 32) and batch["skipped_images"] == 1 and "skipped_videos" not in batch


def test_evaluation_never_replaces_an_unreadable_image(tmp_path: Path, dist_group: None) -> None:
    """In evaluation an unreadable image keeps its own label, is left out of the scores and listed."""
    from mmmae.config import load_config
    from mmmae.evaluation import classify

    for i, p in enumerate(_photos(6)):
        d = tmp_path / "val" / ("cat" if i % 2 else "dog")
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, d / p.name)
    broken = tmp_path / "val" / "dog" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ds = ImageFolder(tmp_path / "val", eval_transform(32), replace=False)
    i = next(i for i, (p, _) in enumerate(ds.items) if p == broken)
    sample = ds[i]
    assert sample["valid"] is False and sample["label"] == 1 and sample["unreadable"] == str(broken)
    cfg = load_config(None, ["model.name=classifier", "model.size=vit_tiny_test", "model.img_size=32",
                             "model.patch_size=8", "model.num_classes=2", "data.dataset=image_folder",
                             f"data.root={tmp_path / 'val'}", f"data.val_root={tmp_path / 'val'}",
                             "data.batch_size=4", "data.num_workers=0"])
    import mmmae
    from safetensors.torch import save_file
    model = mmmae.create_model("classifier", size="vit_tiny_test", img_size=32, patch_size=8, num_classes=2)
    save_file(model.state_dict(), str(tmp_path / "clf.safetensors"))
    report = classify(cfg, str(tmp_path / "clf.safetensors"), progress=False)
    assert report["num_evaluated"] == 6 and report["num_unreadable"] == 1
    assert [u["path"] for u in report["unreadable"]] == [str(broken)] and report["unreadable"][0]["label"] == 1


def test_image_folder_flat_is_unlabelled_and_errors_name_the_path(tmp_path: Path) -> None:
    for p in _photos(3):
        shutil.copy(p, tmp_path / p.name)
    ds = ImageFolder(tmp_path, eval_transform(48))
    assert {label for _, label in ds.items} == {-1}
    x = ds[0]["image"]
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        ImageFolder(tmp_path / "missing", eval_transform(48))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolder(tmp_path / "empty", eval_transform(48))


def test_too_many_unreadable_images_stop_with_the_file_names(tmp_path: Path) -> None:
    for p in _photos(2):
        shutil.copy(p, tmp_path / p.name)
    for i in range(25):
        (tmp_path / f"bad{i:02d}.jpg").write_bytes(b"junk")
    ds = ImageFolder(tmp_path, eval_transform(32), max_bad_fraction=0.1)
    with pytest.raises(RuntimeError, match=r"unreadable images .*bad\d\d\.jpg"):
        for i in range(len(ds)):
            ds[i]


def test_mae_transform_crops_flips_and_normalises() -> None:
    from PIL import Image
    img = Image.open(_photos(1)[0]).convert("RGB")
    tf = mae_train_transform(64)
    torch.manual_seed(0)
    a = tf(img)
    torch.manual_seed(0)
    b = tf(img)
    torch.manual_seed(1)
    c = tf(img)
    assert a.shape == (3, 64, 64) and torch.equal(a, b) and not torch.equal(a, c)
    # ImageNet normalisation: values centred near 0 rather than in [0, 1].
    assert a.min() < 0 < a.max()


def test_fashion_mnist_reads_the_real_idx_files(fashion_mnist: Path) -> None:
    train = FashionMNIST(fashion_mnist, "train", eval_transform(32, crop_pct=1.0))
    test = FashionMNIST(fashion_mnist, "test", limit=100)
    assert len(train) == 60000 and len(test) == 100
    s = train[0]
    assert s["image"].shape == (3, 32, 32) and 0 <= s["label"] < 10
    assert test[0]["image"].shape == (3, 28, 28) and test[0]["image"].max() <= 1.0
    labels = torch.tensor([int(x) for x in train.labels[:6000]])
    assert torch.bincount(labels, minlength=10).min() > 500  # the classes are balanced
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        FashionMNIST(fashion_mnist / "nowhere")
