"""Pure-PyTorch reference implementations of the two SDCA kernels.

These are the contract: the C++/CUDA extension must reproduce them (values and
gradients). They are written for clarity and exactness, not speed, but they
never build an N x K x A tensor: the full-covariance quadratic form is taken one
class at a time, and the class moments bucket pixels by label.
"""
from __future__ import annotations

import torch


def closed_form_loss(q: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor,
                     tau: float, normalize: bool = False, ignore_index: int = 255) -> torch.Tensor:
    """Per-pixel upper bound of Eq. 14; 0 at pixels labelled ``ignore_index``.

    z_k(q) = q.mu_k / tau + q^T Sigma_k q / (2 tau^2)
    L(q)   = logsumexp_k z_k(q) - q.mu_y / tau

    With ``normalize`` each row of q is L2-normalised first (``F.normalize``).

    ``covariance`` is [K, A, A] (full) or [K, A] (diagonal). Inputs of lower
    precision than float32 are computed in float32. Differentiable in ``q``
    through autograd; mean and covariance are treated as constants, as they are
    running statistics, not parameters.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    valid = labels != ignore_index
    y = torch.where(valid, labels, torch.zeros_like(labels)).long()
    qf = q.to(acc)
    if normalize:
        qf = torch.nn.functional.normalize(qf, dim=1)
    mu = mean.detach().to(acc)
    cov = covariance.detach().to(acc)
    z = qf @ mu.t() / tau
    if cov.dim() == 2:
        quad = (qf * qf) @ cov.t()
    else:
        quad = torch.stack([((qf @ cov[k]) * qf).sum(1) for k in range(cov.shape[0])], dim=1)
    z = z + quad / (2.0 * tau * tau)
    loss = torch.logsumexp(z, dim=1) - (qf * mu[y]).sum(1) / tau
    return torch.where(valid, loss, torch.zeros_like(loss))


def class_moments(features: torch.Tensor, labels: torch.Tensor, num_classes: int, full: bool,
                  ignore_index: int = 255, dtype: torch.dtype = torch.float64):
    """Count, mean and biased covariance of the pixels of each class in one batch.

    Returns ``(count [K] int64, mean [K, A], covariance [K, A, A] or [K, A])`` in
    ``dtype``; classes with no pixel get zeros. Pixels are bucketed by class
    (one sort), so the full covariance costs one (A x m_k)(m_k x A) product per
    present class and nothing proportional to K x N x A.
    """
    n_dim = features.shape[1]
    valid = labels != ignore_index
    x = features[valid].to(dtype)
    y = labels[valid].long()
    count = torch.bincount(y, minlength=num_classes)
    sums = x.new_zeros(num_classes, n_dim).index_add_(0, y, x)
    mean = sums / count.clamp_min(1).to(dtype).unsqueeze(1)
    centred = x - mean[y]
    if not full:
        cov = x.new_zeros(num_classes, n_dim).index_add_(0, y, centred * centred)
        cov = cov / count.clamp_min(1).to(dtype).unsqueeze(1)
        return count, mean, cov
    cov = x.new_zeros(num_classes, n_dim, n_dim)
    order = torch.argsort(y, stable=True)
    buckets = torch.split(centred[order], count.tolist())
    for k, xk in enumerate(buckets):
        if xk.shape[0]:
            cov[k] = xk.t() @ xk / xk.shape[0]
    return count, mean, cov


def merge_moments(count: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor, batch_count: torch.Tensor,
                  batch_mean: torch.Tensor, batch_covariance: torch.Tensor) -> None:
    """Eq. 3-4 in place: pool (batch_count, batch_mean, batch_covariance) into (count, mean, covariance).

    The exact pooled (Chan et al.) merge: n old and m new pixels, a = n/(n+m), b = m/(n+m),
    mu <- mu + b (mu' - mu), Sigma <- a Sigma + b Sigma' + a b (mu' - mu)(mu' - mu)^T. Classes with no new
    pixel are untouched. A full covariance is updated class by class, so no K x A x A temporary is made.
    """
    present = torch.nonzero(batch_count > 0).flatten()
    if present.numel() == 0:
        return
    dtype, device = mean.dtype, mean.device
    n = count[present].to(dtype)
    m = batch_count[present].to(device=device, dtype=dtype)
    a = (n / (n + m)).unsqueeze(1)
    b = (m / (n + m)).unsqueeze(1)
    delta = batch_mean[present].to(device=device, dtype=dtype) - mean[present]
    if covariance.dim() == 3:
        for j, k in enumerate(present.tolist()):
            aj, bj = float(a[j]), float(b[j])
            covariance[k].mul_(aj).add_(batch_covariance[k].to(device=device, dtype=dtype), alpha=bj)
            covariance[k].addr_(delta[j], delta[j], alpha=aj * bj)
    else:
        other = batch_covariance[present].to(device=device, dtype=dtype)
        covariance[present] = a * covariance[present] + b * other + (a * b) * delta * delta
    mean[present] = mean[present] + b * delta
    count[present] += batch_count[present].to(count.device)


def update_statistics(count: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor, features: torch.Tensor,
                      labels: torch.Tensor, ignore_index: int = 255) -> None:
    """One batch merged into running statistics in place: :func:`class_moments` then :func:`merge_moments`."""
    batch = class_moments(features, labels, mean.shape[0], covariance.dim() == 3, ignore_index, torch.float64)
    merge_moments(count, mean, covariance, *batch)
