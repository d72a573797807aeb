"""DAFormer's rare-class sampling: class probabilities softmax((1 - f) / T), and the frequencies of many seeded
draws against them."""
import numpy as np
import pytest

from sdca.data.sampling import rare_class_order, rare_class_probabilities


def test_probabilities_are_the_softmax_of_one_minus_frequency_over_temperature():
    f = np.array([0.5, 0.3, 0.15, 0.05, 0.0])
    p = rare_class_probabilities(f, 0.1)
    z = np.exp((1 - f[:4]) / 0.1)
    np.testing.assert_allclose(p[:4], z / z.sum(), rtol=1e-12)
    assert p[4] == 0.0  # a class never seen is never drawn
    with pytest.raises(ValueError, match="temperature"):
        rare_class_probabilities(f, 0.0)


def test_draw_frequencies_match_the_probabilities():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 4000, size=(40, 5)) * np.array([8, 4, 2, 1, 1])
    counts[:, 4] = 0
    counts[3, 4] = 3500  # class 4: one image has enough of it
    min_pixels = 3000
    order = rare_class_order(counts, iters=20000, seed=7, batch=2, temperature=0.5, min_pixels=min_pixels)
    assert len(order) == 40000
    eligible = [set(np.flatnonzero(counts[:, c] > min_pixels)) for c in range(5)]
    freq = counts.sum(0) / counts.sum()
    p = rare_class_probabilities(np.where([len(e) > 0 for e in eligible], freq, 0), 0.5)
    # Each draw picks a class, then an image uniformly among the class's eligible images: the expected count
    # of every image is the sum over its classes of P(c) / |eligible(c)|.
    expected = np.zeros(40)
    for c in range(5):
        for i in eligible[c]:
            expected[i] += p[c] / len(eligible[c])
    seen = np.bincount(order, minlength=40) / len(order)
    np.testing.assert_allclose(seen, expected, atol=4 * np.sqrt(expected.max() / len(order)) + 1e-4)
    assert seen[3] >= p[4]  # the one image with class 4 carries all of its draws
    assert order == rare_class_order(counts, iters=20000, seed=7, batch=2, temperature=0.5, min_pixels=min_pixels)
