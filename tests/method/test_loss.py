"""sdca_loss against Eq. 14 written out independently, the Monte Carlo Eq. 7 and the public code's formula."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdca import sdca_loss

IGNORE = 255


def make_inputs(gen, N=40, A=6, K=4, full=True, dtype=torch.float64, ignore_share=0.25, scale=0.3):
    q = torch.randn(N, A, generator=gen, dtype=torch.float64)
    labels = torch.randint(K, (N,), generator=gen)
    labels[torch.rand(N, generator=gen) < ignore_share] = IGNORE
    mean = torch.randn(K, A, generator=gen, dtype=torch.float64)
    if full:
        root = torch.randn(K, A, A, generator=gen, dtype=torch.float64) * scale
        cov = root @ root.transpose(1, 2)  # symmetric positive semi-definite
    else:
        cov = torch.rand(K, A, generator=gen, dtype=torch.float64) * scale
    return q.to(dtype), labels, mean.to(dtype), cov.to(dtype)


def eq14_loop(q, labels, mean, cov, tau, normalize):
    """Eq. 14 pixel by pixel in float64 Python/NumPy arithmetic, no torch kernels shared with the implementation."""
    q, mean, cov = q.double().numpy(), mean.double().numpy(), cov.double().numpy()
    total, n = 0.0, 0
    for i, y in enumerate(labels.tolist()):
        if y == IGNORE:
            continue
        qi = q[i] / max(np.sqrt((q[i] ** 2).sum()), 1e-12) if normalize else q[i]
        z = []
        for k in range(mean.shape[0]):
            sigma = cov[k] if cov.ndim == 3 else np.diag(cov[k])
            z.append(qi @ mean[k] / tau + qi @ sigma @ qi / (2 * tau * tau))
        zmax = max(z)
        total += zmax + math.log(sum(math.exp(v - zmax) for v in z)) - qi @ mean[y] / tau
        n += 1
    return total / n


@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("tau", [0.1, 1.0, 7.5])
def test_matches_eq14_written_out(gen, full, normalize, tau):
    q, labels, mean, cov = make_inputs(gen, full=full)
    got = sdca_loss(q, labels, mean, cov, tau, normalize=normalize)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(eq14_loop(q, labels, mean, cov, tau, normalize), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("full", [True, False])
def test_float32_close_to_float64(gen, full):
    q, labels, mean, cov = make_inputs(gen, N=300, A=19, K=19, full=full)
    ref = sdca_loss(q, labels, mean, cov, 0.5)
    got = sdca_loss(q.float(), labels, mean.float(), cov.float(), 0.5)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("full", [True, False])
def test_upper_bounds_monte_carlo_eq7(full):
    """Eq. 7 with q+ ~ N(mu_y, Sigma_y), q_j- ~ N(mu_j, Sigma_j), j != y, estimated by sampling."""
    gen = torch.Generator().manual_seed(7)
    N, A, K, tau, M = 12, 5, 4, 0.7, 100_000
    q, labels, mean, cov = make_inputs(gen, N=N, A=A, K=K, full=full, ignore_share=0.0, scale=0.25)
    qn = F.normalize(q, dim=1)
    sigma = cov if full else torch.diag_embed(cov)
    chol = torch.linalg.cholesky(sigma + 1e-12 * torch.eye(A, dtype=torch.float64))
    bound = sdca_loss(q, labels, mean, cov, tau).item()
    per_pixel = []
    for i in range(N):
        y = int(labels[i])
        # One draw per class per sample: column y is q+, the others are the negatives.
        draws = mean + torch.einsum("kab,mkb->mka", chol, torch.randn(M, K, A, generator=gen, dtype=torch.float64))
        logits = draws @ qn[i] / tau  # [M, K]
        per_pixel.append((torch.logsumexp(logits, 1) - logits[:, y]))
    samples = torch.stack(per_pixel).mean(0)  # the pixel-averaged loss, one value per draw
    estimate, stderr = samples.mean().item(), samples.std().item() / math.sqrt(M)
    assert estimate <= bound + 4 * stderr
    # The bound is not vacuous: with these modest covariances the Jensen gap is small.
    assert bound - estimate < 0.5


@pytest.mark.parametrize("full,variant", [(True, "paper"), (False, "paper"), (False, "reference")])
def test_gradcheck(gen, full, variant):
    q, labels, mean, cov = make_inputs(gen, N=15, A=4, K=3, full=full)
    q.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: sdca_loss(x, labels, mean, cov, 0.8, variant=variant), (q,))


def test_zero_covariance_is_cross_entropy(gen):
    q, labels, mean, _ = make_inputs(gen)
    for cov in (torch.zeros(4, 6, 6, dtype=torch.float64), torch.zeros(4, 6, dtype=torch.float64)):
        got = sdca_loss(q, labels, mean, cov, 0.3, normalize=False)
        expected = F.cross_entropy(q @ mean.t() / 0.3, labels, ignore_index=IGNORE)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def public_formula(feat, labels, Mean, CoVariance, tau):
    """The public code's PixelContrastiveLoss as described in reference/public_code_facts.md, in NumPy."""
    feat, Mean, CoVariance = (t.double().numpy() for t in (feat, Mean, CoVariance))
    keep = labels.numpy() != IGNORE
    f = feat[keep]
    y = labels.numpy()[keep]
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    mu = Mean / np.linalg.norm(Mean, axis=1, keepdims=True)
    s = CoVariance / np.linalg.norm(CoVariance, axis=1, keepdims=True)
    z = f @ mu.T / tau + 0.5 * (f ** 2) @ s.T / tau ** 2
    z_max = z.max(1, keepdims=True)
    log_softmax = z - z_max - np.log(np.exp(z - z_max).sum(1, keepdims=True))
    ce = -log_softmax[np.arange(len(y)), y].mean()
    cov_term = 0.5 / tau ** 2 * ((f ** 2) * s[y]).sum(1).mean()
    return ce + cov_term


@pytest.mark.parametrize("tau", [100.0, 1.0, 0.2])
def test_reference_variant_equals_public_formula(gen, tau):
    q, labels, mean, cov = make_inputs(gen, N=60, A=8, K=5, full=False)
    got = sdca_loss(q * 5, labels, mean * 3, cov, tau, variant="reference", normalize=False)
    assert got.item() == pytest.approx(public_formula(q * 5, labels, mean * 3, cov, tau), rel=1e-12)


def test_reference_variant_at_public_tau_is_near_log_k(gen):
    """reference/: with tau = 100 the public loss is about log C."""
    q, labels, mean, cov = make_inputs(gen, N=200, A=32, K=19, full=False, ignore_share=0.0)
    got = sdca_loss(q, labels, mean, cov, 100.0, variant="reference")
    assert abs(got.item() - math.log(19)) < 0.02


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_no_labelled_pixel_gives_zero_and_zero_gradient(gen, variant):
    q, _, mean, cov = make_inputs(gen, full=False)
    q.requires_grad_(True)
    loss = sdca_loss(q, torch.full((q.shape[0],), IGNORE), mean, cov, 0.5, variant=variant)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(q.grad, torch.zeros_like(q))


def test_ignored_pixels_get_no_gradient(gen):
    q, labels, mean, cov = make_inputs(gen, full=True)
    q.requires_grad_(True)
    sdca_loss(q, labels, mean, cov, 0.5).backward()
    ignored = labels == IGNORE
    assert ignored.any() and torch.all(q.grad[ignored] == 0)
    assert torch.all(q.grad[~ignored].abs().sum(1) > 0)


def test_gradient_matches_closed_form(gen):
    """Gradient of Eq. 14 w.r.t. q (unnormalised): sum_k p_k (mu_k/tau + Sigma_k q/tau^2) - mu_y/tau, over n pixels."""
    q, labels, mean, cov = make_inputs(gen, full=True)
    tau = 0.6
    q.requires_grad_(True)
    sdca_loss(q, labels, mean, cov, tau, normalize=False).backward()
    valid = labels != IGNORE
    z = q.detach() @ mean.t() / tau + torch.einsum("na,kab,nb->nk", q.detach(), cov, q.detach()) / (2 * tau ** 2)
    p = torch.softmax(z, 1)
    sigma_q = torch.einsum("kab,nb->nka", cov, q.detach())
    grad = (p.unsqueeze(2) * (mean / tau + sigma_q / tau ** 2)).sum(1) - mean[labels.clamp(max=3)] / tau
    grad[~valid] = 0
    torch.testing.assert_close(q.grad, grad / valid.sum(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_float32(gen, half):
    q, labels, mean, cov = make_inputs(gen, N=100, A=16, K=5, full=True)
    qh, mh, ch = q.to(half), mean.to(half), cov.to(half)
    got = sdca_loss(qh, labels, mh, ch, 0.5)
    assert got.dtype == torch.float32
    expected = sdca_loss(qh.double(), labels, mh.double(), ch.double(), 0.5)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_autocast_does_not_lower_precision(gen):
    q, labels, mean, cov = make_inputs(gen, N=100, A=16, K=5, full=True, dtype=torch.float32)
    plain = sdca_loss(q, labels, mean, cov, 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = sdca_loss(q, labels, mean, cov, 0.5)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, plain)


def test_bad_input_names_argument(gen):
    q, labels, mean, cov = make_inputs(gen, full=True)
    with pytest.raises(ValueError, match="features"):
        sdca_loss(q[0], labels, mean, cov, 0.5)
    with pytest.raises(ValueError, match="features"):
        sdca_loss(q.long(), labels, mean, cov, 0.5)
    with pytest.raises(ValueError, match="labels"):
        sdca_loss(q, labels[:-1], mean, cov, 0.5)
    with pytest.raises(ValueError, match="labels"):
        sdca_loss(q, labels.double(), mean, cov, 0.5)
    with pytest.raises(ValueError, match="mean has dimension"):
        sdca_loss(q, labels, mean[:, :5], cov, 0.5)
    with pytest.raises(ValueError, match="covariance has shape"):
        sdca_loss(q, labels, mean, cov[:3], 0.5)
    with pytest.raises(ValueError, match="covariance has shape"):
        sdca_loss(q, labels, mean, cov[:, :5, :5], 0.5)
    with pytest.raises(ValueError, match="labels contains 4"):
        sdca_loss(q, torch.full_like(labels, 4), mean, cov, 0.5)
    with pytest.raises(ValueError, match="tau"):
        sdca_loss(q, labels, mean, cov, -1.0)
    with pytest.raises(ValueError, match="variant"):
        sdca_loss(q, labels, mean, cov, 0.5, variant="official")
    with pytest.raises(ValueError, match="diagonal"):
        sdca_loss(q, labels, mean, cov, 0.5, variant="reference")
