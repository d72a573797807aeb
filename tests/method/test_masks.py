"""Target masks (Eq. 5), median thresholds and pseudo-labels (Eq. 19), label downsampling."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdca import StreamingClassMedian, class_median_thresholds, pseudo_labels, target_mask
from sdca.method import downsample_labels

IGNORE = 255


def test_target_mask_thresholds_max_softmax(gen):
    logits = torch.randn(2, 5, 4, 6, generator=gen) * 3
    mask = target_mask(logits, delta=0.7)
    probs = torch.softmax(logits, 1)
    for b in range(2):
        for i in range(4):
            for j in range(6):
                p = probs[b, :, i, j]
                expected = int(p.argmax()) if p.max() >= 0.7 else IGNORE
                assert mask[b, i, j] == expected
    assert torch.all(target_mask(logits, delta=0.0) == logits.argmax(1))
    with pytest.raises(ValueError, match="delta"):
        target_mask(logits, delta=1.5)


def brute_force_medians(conf, pred, K):
    out = []
    for k in range(K):
        v = sorted(conf[pred == k].tolist())
        out.append(v[(len(v) - 1) // 2] if v else 0.0)
    return torch.tensor(out, dtype=torch.float32)


def test_median_thresholds_in_memory_and_streaming_agree_with_brute_force(gen):
    K = 6
    logits = torch.randn(5, K, 9, 11, generator=gen) * 2
    logits[:, 5] -= 100  # class 5 never predicted
    conf, pred = torch.softmax(logits, 1).max(1)
    expected = brute_force_medians(conf.flatten(), pred.flatten(), K)
    assert torch.equal(class_median_thresholds(conf, pred, K, cap=None), expected)
    assert torch.equal(class_median_thresholds(conf, pred, K), expected.clamp(max=0.9))

    stream = StreamingClassMedian(K)
    for b in range(5):
        stream.first_pass(conf[b], pred[b])
    for b in reversed(range(5)):  # the second pass may visit the data in any order
        stream.second_pass(conf[b], pred[b])
    assert torch.equal(stream.thresholds(cap=None), expected)
    assert torch.equal(stream.counts(), torch.bincount(pred.flatten(), minlength=K))


def test_streaming_median_with_ties_and_even_counts():
    conf = torch.tensor([0.5, 0.5, 0.25, 0.75, 1.0, 0.125])
    pred = torch.tensor([0, 0, 0, 0, 1, 1])
    stream = StreamingClassMedian(3)
    stream.first_pass(conf, pred)
    stream.second_pass(conf, pred)
    # class 0: sorted .25 .5 .5 .75 -> lower median .5; class 1: .125 1.0 -> .125; class 2: none -> 0
    assert stream.thresholds(cap=None).tolist() == [0.5, 0.125, 0.0]


def test_pseudo_labels_rule(gen):
    logits = torch.randn(2, 4, 5, 5, generator=gen) * 2
    thresholds = torch.tensor([0.3, 0.6, 0.9, 0.0])
    out = pseudo_labels(logits, thresholds)
    conf, pred = torch.softmax(logits, 1).max(1)
    expected = torch.where(conf >= thresholds[pred], pred, torch.full_like(pred, IGNORE))
    assert torch.equal(out, expected)
    assert (out == IGNORE).any() and (out != IGNORE).any()
    with pytest.raises(ValueError, match="thresholds"):
        pseudo_labels(logits, thresholds[:3])


def test_downsample_labels_takes_top_left_of_each_block(gen):
    labels = torch.randint(19, (2, 16, 24), generator=gen)
    small = downsample_labels(labels, (2, 3))
    assert torch.equal(small, labels[:, ::8, ::8])
    # Non-integer ratios follow F.interpolate's nearest rule.
    odd = downsample_labels(labels, (5, 7))
    assert torch.equal(odd, F.interpolate(labels[:, None].float(), size=(5, 7), mode="nearest")[:, 0].long())


def test_class_balanced_target_mask_is_the_per_class_median_rule(gen):
    logits = torch.randn(2, 5, 7, 9, generator=gen, dtype=torch.float64) * 2
    delta = 0.6
    mask = target_mask(logits, delta=delta, class_balanced=True)
    # Brute force in numpy: per predicted class, threshold = min(delta, lower median of its confidences).
    p = torch.softmax(logits, 1).numpy()
    conf, pred = p.max(1), p.argmax(1)
    expected = np.full(pred.shape, 255)
    for k in np.unique(pred):
        values = np.sort(conf[pred == k])
        threshold = min(delta, values[(len(values) - 1) // 2])
        keep = (pred == k) & (conf >= threshold)
        expected[keep] = k
    np.testing.assert_array_equal(mask.numpy(), expected)
    # Every predicted class keeps at least half of its pixels, and the rule never drops a pixel Eq. 5 keeps.
    plain = target_mask(logits, delta=delta)
    assert torch.all(mask[plain != 255] == plain[plain != 255])
    for k in np.unique(pred):
        assert (mask.numpy()[pred == k] == k).mean() >= 0.5
