"""Diagnostics statistics against NumPy / SciPy brute force on fabricated features and labels."""
import math

import numpy as np
import pytest
import torch

from sdca.method.diagnostics import (
    class_shares,
    entropy,
    gaussian_scores,
    kl_divergence,
    masked_precision_recall,
    regularised_covariance,
)

scipy_stats = pytest.importorskip("scipy.stats")


def test_class_shares_and_kl():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, (3, 20, 30))
    labels[0, :5] = 255
    shares = class_shares(torch.from_numpy(labels), 6).numpy()
    kept = labels[labels != 255]
    np.testing.assert_allclose(shares, np.bincount(kept, minlength=6) / kept.size, rtol=1e-12)
    p, q = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))
    q[2] = 0.0  # a class q never has: finite thanks to the smoothing
    eps = 1e-6
    ps, qs = (p + eps) / (p + eps).sum(), (q + eps) / (q + eps).sum()
    assert kl_divergence(torch.from_numpy(p), torch.from_numpy(q), eps) == pytest.approx(
        scipy_stats.entropy(ps, qs), rel=1e-10)
    assert kl_divergence(torch.from_numpy(p), torch.from_numpy(p)) == pytest.approx(0.0, abs=1e-12)


def test_entropy_matches_scipy():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(5), size=(4, 7)).transpose(0, 2, 1)  # [4, K=5, 7]
    probs[0, :, 0] = [1, 0, 0, 0, 0]  # 0 log 0 = 0
    got = entropy(torch.from_numpy(probs), dim=1).numpy()
    np.testing.assert_allclose(got, scipy_stats.entropy(probs, axis=1), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("full", [True, False])
def test_gaussian_scores_match_scipy(full):
    rng = np.random.default_rng(2)
    a = 6
    mean = rng.normal(size=a)
    if full:
        m = rng.normal(size=(a, a))
        cov = m @ m.T / a + 0.1 * np.eye(a)
    else:
        cov = rng.uniform(0.2, 2.0, a)
    x = rng.normal(size=(50, a)) * 1.5 + mean
    loglik, dist = gaussian_scores(torch.from_numpy(x), torch.from_numpy(mean), torch.from_numpy(cov), ridge=1e-3)
    reg = regularised_covariance(torch.from_numpy(cov), 1e-3).numpy()
    dense = reg if full else np.diag(reg)
    # The ridge: 1e-3 x the mean variance on the diagonal.
    expected = (cov if full else np.diag(cov)) + 1e-3 * (np.trace(cov) / a if full else cov.mean()) * np.eye(a)
    np.testing.assert_allclose(dense, expected, rtol=1e-12)
    want = scipy_stats.multivariate_normal(mean, dense).logpdf(x)
    np.testing.assert_allclose(loglik.numpy(), want, rtol=1e-10)
    inv = np.linalg.inv(dense)
    want_d = np.sqrt(np.einsum("ni,ij,nj->n", x - mean, inv, x - mean))
    np.testing.assert_allclose(dist.numpy(), want_d, rtol=1e-10)


def test_alignment_improves_when_target_moves_toward_the_source_means():
    rng = np.random.default_rng(3)
    a, k = 8, 3
    means = rng.normal(size=(k, a)) * 3
    covs = np.stack([np.eye(a) * s for s in (0.5, 1.0, 2.0)])
    shift = rng.normal(size=a) * 4  # the domain gap: every target class displaced alike
    for c in range(k):
        target = rng.multivariate_normal(means[c], covs[c], 400) + shift
        scores = []
        for t in (0.0, 0.5, 1.0):  # move the target features t of the way back to the source
            moved = target - t * shift
            ll, d = gaussian_scores(torch.from_numpy(moved), torch.from_numpy(means[c]), torch.from_numpy(covs[c]))
            scores.append((float(ll.mean()), float(d.mean())))
        assert scores[0][0] < scores[1][0] < scores[2][0]  # likelihood up
        assert scores[0][1] > scores[1][1] > scores[2][1]  # distance down
        # Once aligned, target features score like source samples of that Gaussian (within sampling noise).
        source = rng.multivariate_normal(means[c], covs[c], 400)
        ll_src = float(gaussian_scores(torch.from_numpy(source), torch.from_numpy(means[c]),
                                       torch.from_numpy(covs[c]))[0].mean())
        assert abs(scores[2][0] - ll_src) < 0.1 * abs(ll_src) + 1.0


def test_masked_precision_recall_brute_force():
    rng = np.random.default_rng(4)
    k = 5
    truth = rng.integers(0, k, 2000)
    truth[:50] = 255
    masked = np.where(rng.random(2000) < 0.3, 255, np.where(rng.random(2000) < 0.7, truth, rng.integers(0, k, 2000)))
    masked[:50] = rng.integers(0, k, 50)  # labelled where the truth is unknown: left out of both
    p, r, n = masked_precision_recall(torch.from_numpy(masked), torch.from_numpy(truth), k)
    for c in range(k):
        sel = truth != 255
        labelled = sel & (masked == c)
        assert n[c] == labelled.sum()
        assert p[c].item() == pytest.approx((truth[labelled] == c).mean(), rel=1e-12)
        assert r[c].item() == pytest.approx((labelled & (truth == c)).sum() / (sel & (truth == c)).sum(), rel=1e-12)
    p, r, _ = masked_precision_recall(torch.full((10,), 255), torch.zeros(10, dtype=torch.long), 3)
    assert math.isnan(p[0]) and r[0] == 0 and math.isnan(r[1])
