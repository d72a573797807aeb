"""Confusion matrix, IoU/mIoU against hand-counted cases, PDD against its definition."""
import math

import pytest
import torch

from sdca import ConfusionMatrix, mean_iou, pdd, tail_classes

IGNORE = 255


def test_hand_counted_case():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])
    cm = ConfusionMatrix(4).update(pred, target)
    # class 0: TP 1 (0,0); FN 1 (0,1)->1; FP 1 (1,1 gt 2 ->0); the ignored pixel's prediction is not counted
    # class 1: TP 3; FP 1; FN 0 -> 3/4.  class 2: TP 1, FN 1 -> 1/2.  class 3: absent everywhere -> NaN
    iou = cm.iou()
    assert iou[:3].tolist() == [1 / 3, 3 / 4, 1 / 2]
    assert math.isnan(iou[3])
    assert cm.miou() == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert cm.miou(classes=[1, 2]) == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert cm.pixel_accuracy() == pytest.approx(5 / 7)


def test_class_only_predicted_counts_as_zero():
    cm = ConfusionMatrix(3).update(torch.tensor([2, 0]), torch.tensor([0, 0]))
    iou = cm.iou()
    assert iou[0] == 0.5 and iou[2] == 0.0 and math.isnan(iou[1])
    assert cm.miou() == pytest.approx(0.25)


def test_out_of_range_prediction_is_a_miss():
    cm = ConfusionMatrix(2).update(torch.tensor([IGNORE, 1, 0]), torch.tensor([0, 1, 0]))
    assert cm.iou().tolist() == [0.5, 1.0]


def test_accumulation_matches_one_shot_and_merge(gen):
    preds = [torch.randint(5, (3, 8, 8), generator=gen) for _ in range(4)]
    targets = [torch.randint(6, (3, 8, 8), generator=gen) for _ in range(4)]
    targets = [torch.where(t == 5, torch.full_like(t, IGNORE), t) for t in targets]
    one = ConfusionMatrix(5).update(torch.cat(preds), torch.cat(targets))
    a, b = ConfusionMatrix(5), ConfusionMatrix(5)
    for i, (p, t) in enumerate(zip(preds, targets)):
        (a if i % 2 else b).update(p, t)
    assert torch.equal(a.merge(b).matrix, one.matrix)
    # The matrix itself against counting.
    p, t = torch.cat(preds).flatten(), torch.cat(targets).flatten()
    for i in range(5):
        for j in range(5):
            assert one.matrix[i, j] == int(((t == i) & (p == j)).sum())


def test_summary_and_subsets():
    cm = ConfusionMatrix(3).update(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]))
    s = cm.summary(["road", "car", "bus"], subsets={"tail": [2]})
    assert s["IoU"] == {"road": 1.0, "car": 0.5, "bus": 0.5}
    assert s["mIoU_tail"] == 0.5
    with pytest.raises(ValueError, match="class_names"):
        cm.summary(["road"])


def test_bad_input():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="prediction has shape"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="target contains 7"):
        cm.update(torch.zeros(2, dtype=torch.long), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="prediction"):
        cm.update(torch.zeros(2), torch.zeros(2, dtype=torch.long))


def test_tail_classes_and_mean_iou_nan():
    assert tail_classes(torch.tensor([500, 300, 5, 195])) == [2]
    assert math.isnan(mean_iou(torch.tensor([math.nan, math.nan])))


def test_pdd_against_definition(gen):
    feats = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(3, (30,), generator=gen)
    labels[:4] = IGNORE
    means = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    got = pdd(feats, labels, means)

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    for k in range(3):
        ratios = [cos(x, means[k]) / sum(cos(x, means[i]) for i in range(3) if i != k)
                  for x, y in zip(feats, labels.tolist()) if y == k]
        assert got[k].item() == pytest.approx(sum(ratios) / len(ratios), rel=1e-12)
