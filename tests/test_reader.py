"""The one skip-and-replace reader (mmmae.data.quality.read_item), the one seed scheme
(mmmae.data.sampler.mix_seed) and the one collate (mmmae.data.collate.collate_dicts), on stand-in
readers whose bad items are known, so every figure here follows from the documented rules."""

from __future__ import annotations

import random

import pytest
import torch

from mmmae.data.collate import collate_dicts
from mmmae.data.quality import ReadFailures, read_item, replacement
from mmmae.data.sampler import mix_seed


class Unreadable(Exception):
    """The stand-in reader's error (a reader-specific error, as VideoDecodeError or PIL's OSError)."""


class Reader:
    """Items 0..size-1 whose ``bad`` ones raise; records every read."""

    def __init__(self, size: int, bad: set[int]) -> None:
        self.size, self.bad, self.calls = size, bad, []

    def __call__(self, i: int) -> str:
        self.calls.append(i)
        if i in self.bad:
            raise Unreadable(f"item {i} is broken")
        return f"value {i}"


def read(reader: Reader, index: int, *, tally: ReadFailures | None = None, **kw: object):  # noqa: ANN201
    tally = tally or ReadFailures(1.0, "Stand-in", "file")
    return read_item(index, reader.size, reader, errors=(Unreadable,), name=lambda i: f"f{i}.bin", reads=tally,
                     **kw)


def test_mix_seed_keeps_every_seed_epoch_index_apart() -> None:
    # A linear mix (seed * 1_000_003 + epoch * 10_007 + i) repeats seeds across epochs past 10_007 items.
    assert len({mix_seed(0, e, i) for e in range(3) for i in range(20_000)}) == 60_000
    assert mix_seed(1, 2) != mix_seed(2, 1) and mix_seed(0, 0, 5, "clip") != mix_seed(0, 0, 5, "caption")
    assert 0 <= mix_seed("any", None, 3) < 2 ** 63


def test_replacement_is_uniform_over_the_items_not_tried() -> None:
    size, tried = 12, [3, 0, 7, 11]
    untried = [i for i in range(size) if i not in tried]
    for attempt in range(6):
        k = random.Random(mix_seed(5, 2, 3, "replace", attempt)).randrange(len(untried))
        assert replacement(5, 2, 3, attempt, size, tried) == untried[k]
    draws = {replacement(5, e, 3, 0, size, tried) for e in range(200)}
    assert draws == set(untried)
    with pytest.raises(ValueError, match="every one of the 2 items"):
        replacement(0, 0, 0, 0, 2, [0, 1])


def test_training_replaces_deterministically_and_never_retries_an_item() -> None:
    bad = {2, 5, 6, 9, 13}
    reader = Reader(16, bad)
    got = read(reader, 5, seed=3, epoch=1)
    assert got.item not in bad and got.value == f"value {got.item}" and got.valid
    assert reader.calls[0] == 5 and len(set(reader.calls)) == len(reader.calls)
    assert got.skipped == len(reader.calls) - 1 == sum(c in bad for c in reader.calls)
    assert got.fields() == {"skipped": got.skipped}
    # Each replacement follows the rule from (seed, epoch, index, attempt) and the items tried so far.
    for attempt in range(1, len(reader.calls)):
        assert reader.calls[attempt] == replacement(3, 1, 5, attempt - 1, 16, reader.calls[:attempt])
    # The same call in another process, after other failures there, reads the same items.
    other = ReadFailures(1.0, "Stand-in", "file")
    for i in (9, 13):
        other.failed(i, f"f{i}.bin", "seen before")
    again = Reader(16, bad)
    assert read(again, 5, seed=3, epoch=1, tally=other).item == got.item and again.calls == reader.calls
    good = Reader(16, bad)
    assert read(good, 4, seed=3, epoch=1).skipped == 0 and good.calls == [4]


def test_the_tally_and_the_retry_limit_stop_with_the_file_names() -> None:
    with pytest.raises(RuntimeError, match=r"every file tried is unreadable .*f0\.bin"):
        read(Reader(3, {0, 1, 2}), 0)
    with pytest.raises(RuntimeError, match=r"item 0: no readable file after 3 tries; unreadable so far: f"):
        read(Reader(40, set(range(39))), 0, max_retries=2)
    tally = ReadFailures(0.1, "Stand-in", "file", min_attempts=4)
    reader = Reader(8, {1, 3})
    with pytest.raises(RuntimeError, match=r"max_bad_fraction=0.1.*f1\.bin"):
        for i in range(8):
            read(reader, i, tally=tally)

    def buggy(i: int) -> str:
        raise KeyError("a bug, not bad data")
    with pytest.raises(KeyError):  # only the reader's own error means an unreadable input
        read_item(0, 4, buggy, errors=(Unreadable,), name=str, reads=ReadFailures(1.0, "Stand-in"))


def test_evaluation_never_replaces_it_marks_the_item() -> None:
    reader = Reader(4, {2})
    tally = ReadFailures(0.0, "Stand-in", "file")
    got = read(reader, 2, tally=tally, replace=False)
    assert reader.calls == [2] and got.value is None and got.item == 2 and not got.valid
    assert got.fields() == {"valid": False, "unreadable": "f2.bin", "error": "Unreadable: item 2 is broken"}
    assert tally.attempts == 0  # evaluation lists bad files; it never stops on them
    assert read(reader, 1, replace=False).fields() == {"valid": True, "unreadable": None, "error": None}


def test_collate_stacks_views_keeps_strings_and_names_the_skip_counter() -> None:
    views = [[{"video": torch.full((2,), float(i)), "label": i, "index": i, "skipped": int(k == 0 and i == 1)}
              for k in range(2)] for i in range(3)]
    batch = collate_dicts(views)
    assert batch["video"].shape == (6, 2) and batch["index"].tolist() == [0, 0, 1, 1, 2, 2]
    assert batch["skipped_videos"] == 1 and "skipped" not in batch and "failed" not in batch
    pairs = [{"image": torch.zeros(3), "caption": c, "image_id": i, "skipped": 2} for c, i in (("a", 7), ("b", "k"))]
    batch = collate_dicts(pairs)
    assert batch["caption"] == ["a", "b"] and batch["image_id"] == [7, "k"] and batch["skipped_images"] == 4
    with pytest.raises(ValueError, match="empty batch"):
        collate_dicts([])


def test_collate_sets_unreadable_samples_aside() -> None:
    def sample(i: int, ok: bool) -> dict:
        return {"video": torch.full((2, 3), float(i)) if ok else None, "label": 10 + i, "index": i,
                "path": f"v{i}.mp4", "valid": ok, "unreadable": None if ok else f"v{i}.mp4",
                "error": None if ok else f"broken {i}"}
    batch = collate_dicts([sample(0, True), sample(1, False), sample(2, True)])
    assert batch["video"][:, 0, 0].tolist() == [0.0, 2.0] and batch["label"].tolist() == [10, 12]
    assert batch["path"] == ["v0.mp4", "v2.mp4"] and batch["valid"].dtype == torch.bool and batch["valid"].all()
    assert batch["unreadable"] == ["v1.mp4"]
    assert batch["failed"] == [{"path": "v1.mp4", "index": 1, "label": 11, "error": "broken 1"}]
    none = collate_dicts([sample(3, False)])
    assert none["video"] is None and none["label"] is None and none["valid"].numel() == 0
    assert none["failed"][0]["index"] == 3
    # A reader without a verdict field marks an unreadable input by leaving it None.
    files = collate_dicts([{"image": None, "index": 0, "error": "OSError: x"},
                           {"image": torch.ones(3), "index": 1, "error": None}])
    assert files["index"].tolist() == [1] and files["failed"] == [{"index": 0, "error": "OSError: x"}]


@pytest.mark.parametrize("config, overrides, split", [
    ("image_mae_tiny.yaml", [], "train"),  # fashion_mnist
    ("linprobe_fashion_mnist_tiny.yaml", [], "val"),
    ("video_mae_tiny.yaml", [], "train"),  # video_list
    ("finetune_kinetics_tiny.yaml", [], "val"),  # video_list test views
    ("m3ae_tiny.yaml", [], "train"),  # captions
])
def test_data_limit_keeps_the_first_items_of_every_source(config: str, overrides: list[str], split: str,
                                                          fashion_mnist: object) -> None:
    """``data.limit`` is applied once, by build_dataset, whatever the source: the first N items of the
    unlimited split, in order."""
    from conftest import VIDEOS
    from mmmae.config import load_config, model_cfg
    from mmmae.data.registry import build_dataset

    common = [f"data.root={VIDEOS}"] if "video" in config or "kinetics" in config else []
    full_cfg = load_config(config, [*common, *overrides])
    cut_cfg = load_config(config, [*common, *overrides, "data.limit=2"])
    full = build_dataset(full_cfg, split, model_cfg(full_cfg.model))
    cut = build_dataset(cut_cfg, split, model_cfg(cut_cfg.model))
    assert len(full) > 2 and len(cut) == 2
    for i in range(2):
        a, b = full[i], cut[i]
        a, b = (a[0], b[0]) if isinstance(a, list) else (a, b)
        key = next(k for k in ("video", "image") if k in a)
        assert a.get("label") == b.get("label") and a.get("index") == b.get("index") == i
        assert a[key] is not None and a[key].shape == b[key].shape
