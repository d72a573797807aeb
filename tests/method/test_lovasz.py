"""Lovász-Softmax at hard predictions equals 1 - Jaccard counted directly."""
import pytest
import torch
import torch.nn.functional as F

from sdca import lovasz_softmax

IGNORE = 255


def counted_jaccard_loss(pred, labels, num_classes, classes="present"):
    """mean over classes of 1 - |pred==c & gt==c| / |pred==c | gt==c|, counted pixel by pixel."""
    keep = labels != IGNORE
    pred, labels = pred[keep].tolist(), labels[keep].tolist()
    losses = []
    for c in range(num_classes):
        inter = sum(1 for p, t in zip(pred, labels) if p == c and t == c)
        union = sum(1 for p, t in zip(pred, labels) if p == c or t == c)
        present = any(t == c for t in labels)
        if classes == "present" and not present:
            continue
        losses.append(1.0 - inter / union if union else 0.0)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("classes", ["present", "all"])
def test_hard_predictions_equal_counted_jaccard(gen, classes):
    K = 5
    labels = torch.randint(K - 1, (2, 7, 9), generator=gen)  # class 4 never in the labels
    labels[0, :2] = IGNORE
    pred = torch.where(torch.rand(2, 7, 9, generator=gen) < 0.6, labels.clamp(max=K - 1),
                       torch.randint(K, (2, 7, 9), generator=gen))
    probas = F.one_hot(pred, K).permute(0, 3, 1, 2).double()
    got = lovasz_softmax(probas, labels, classes=classes)
    assert got.item() == pytest.approx(counted_jaccard_loss(pred, labels, K, classes), abs=1e-12)


def test_per_image_is_mean_of_images(gen):
    K = 4
    labels = torch.randint(K, (3, 5, 6), generator=gen)
    pred = torch.randint(K, (3, 5, 6), generator=gen)
    probas = F.one_hot(pred, K).permute(0, 3, 1, 2).double()
    got = lovasz_softmax(probas, labels, per_image=True)
    expected = sum(counted_jaccard_loss(pred[i], labels[i], K) for i in range(3)) / 3
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_perfect_prediction_is_zero_and_soft_gradient_finite(gen):
    K = 3
    labels = torch.randint(K, (1, 8, 8), generator=gen)
    assert lovasz_softmax(F.one_hot(labels, K).permute(0, 3, 1, 2).float(), labels).item() == 0.0
    logits = torch.randn(2, K, 8, 8, generator=gen, requires_grad=True)
    lab = torch.randint(K, (2, 8, 8), generator=gen)
    lab[1] = IGNORE
    loss = lovasz_softmax(torch.softmax(logits, 1), lab)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_soft_predictions_bounded_by_hard_extremes(gen):
    """The Lovász extension is linear between the vertices; on [0,1] errors it lies in [0, 1]."""
    probas = torch.softmax(torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64), 1)
    labels = torch.randint(4, (2, 6, 6), generator=gen)
    value = lovasz_softmax(probas, labels).item()
    assert 0.0 < value < 1.0


def test_all_ignored_is_zero_and_bad_input():
    probas = torch.full((1, 3, 2, 2), 1 / 3, requires_grad=True)
    loss = lovasz_softmax(probas, torch.full((1, 2, 2), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(probas.grad, torch.zeros_like(probas))
    with pytest.raises(ValueError, match="labels has shape"):
        lovasz_softmax(probas, torch.zeros(1, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="classes"):
        lovasz_softmax(probas, torch.zeros(1, 2, 2, dtype=torch.long), classes="some")
