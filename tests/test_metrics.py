"""Evaluation metrics against hand-worked cases."""

from __future__ import annotations


import pytest
import torch

from mmmae.metrics import aggregate_views, classification_metrics, retrieval_metrics


def test_multi_view_aggregation_averages_softmax_scores() -> None:
    # Video 0: view A strongly says class 0, views B and C mildly say class 1 -> mean softmax decides.
    logits = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]])
    scores = aggregate_views(logits)
    sm = logits.softmax(-1)[0]
    assert torch.allclose(scores[0], sm.mean(0))
    # softmax([4,0,0])[0] = 0.9644; softmax([0,1,0])[0] = 0.2119 -> class 0 mean 0.4627 > class 1 mean 0.3934
    assert scores[0].argmax().item() == 0
    # Averaging logits instead would also pick 0 here; averaging argmax votes would pick 1.
    assert scores[0, 0].item() == pytest.approx((0.96439 + 2 * 0.21194) / 3, abs=1e-4)


def test_classification_metrics_hand_worked() -> None:
    scores = torch.tensor([
        [0.7, 0.2, 0.1],   # true 0: top1 hit
        [0.5, 0.4, 0.1],   # true 1: top1 miss, top2 hit
        [0.1, 0.3, 0.6],   # true 2: hit
        [0.2, 0.5, 0.3],   # true 2: miss; second
    ])
    labels = torch.tensor([0, 1, 2, 2])
    m = classification_metrics(scores, labels, topk=(1, 2))
    assert m["top1"] == pytest.approx(50.0)
    assert m["top2"] == pytest.approx(100.0)
    # per class: class0 1/1, class1 0/1, class2 1/2 -> mean 50%
    assert m["mean_class_acc"] == pytest.approx(50.0)


def _embed(vectors: list[list[float]]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(vectors, dtype=torch.float32), dim=-1)


def test_retrieval_metrics_hand_worked_with_several_captions_per_image() -> None:
    # 3 images along the axes; 6 captions, 2 per image (txt2img below).
    images = _embed([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    texts = _embed([
        [1.0, 0.1, 0.0],   # cap0 -> img0: rank 0
        [0.0, 1.0, 0.2],   # cap1 -> img0: closest to img1 -> rank 1 for t2i
        [0.1, 1.0, 0.0],   # cap2 -> img1: rank 0
        [0.0, 0.9, 1.0],   # cap3 -> img1: img2 ranks first -> rank 1
        [0.0, 0.0, 1.0],   # cap4 -> img2: rank 0
        [1.0, 0.0, 0.5],   # cap5 -> img2: img0 first -> rank 1
    ])
    txt2img = torch.tensor([0, 0, 1, 1, 2, 2])
    m = retrieval_metrics(images, texts, txt2img, block=2)
    # t2i ranks: [0, 1, 0, 1, 0, 1] -> R@1 = 50%, R@5 = R@10 = 100%; median 0.5 -> floor + 1 = 1
    assert m["t2i_r1"] == pytest.approx(50.0) and m["t2i_r5"] == 100.0 and m["t2i_r10"] == 100.0
    assert m["t2i_medr"] == 1.0
    # i2t: img0's best own caption is cap0 (sim ~0.995); captions scoring higher: none -> rank 0.
    #      img1: cap2 (0.995) is its own and the best overall -> rank 0.
    #      img2: own cap4 (1.0) -> rank 0. All hits at 1.
    assert m["i2t_r1"] == 100.0
    assert m["rsum"] == pytest.approx(100 * 3 + 50 + 100 + 100)
    assert m["r_mean"] == pytest.approx(m["rsum"] / 6)


def test_retrieval_i2t_counts_any_caption_within_k() -> None:
    # img0's captions are both far; 3 foreign captions score higher than its best -> rank 3.
    images = _embed([[1, 0], [0, 1]])
    texts = _embed([[0.2, 1.0], [0.1, 1.0], [0.9, 1.0], [0.8, 1.0], [0.85, 1.0]])
    txt2img = torch.tensor([0, 0, 1, 1, 1])
    m = retrieval_metrics(images, texts, txt2img)
    # img0 sims: caps 2,3,4 (~0.67,0.62,0.65) beat its best own (cap0 ~0.196) -> rank 3: miss@1, hit@5.
    # img1 sims: caps 0,1 (~0.98,0.995) beat its best own (cap3 ~0.78) -> rank 2.
    assert m["i2t_r1"] == 0.0 and m["i2t_r5"] == 100.0
    assert m["i2t_medr"] == 3.0  # ranks [3, 2]: median 2.5 -> floor 2 -> 1-based 3


def test_retrieval_rejects_images_without_captions() -> None:
    with pytest.raises(ValueError, match="without any caption"):
        retrieval_metrics(_embed([[1, 0], [0, 1]]), _embed([[1, 0]]), torch.tensor([0]))
