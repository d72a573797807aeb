"""Pure-PyTorch reference implementations of the two SDCA kernels.

These are the contract: the C++/CUDA extension must reproduce them (values and
gradients). They are written for clarity and exactness, not speed, but they
never build an N x K x A tensor: the full-covariance quadratic form is taken one
class at a time, and the class moments bucket pixels by label.
"""
from __future__ import annotations

import torch


def closed_form_loss(q: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor,
                     tau: float, ignore_index: int = 255) -> torch.Tensor:
    """Per-pixel upper bound of Eq. 14; 0 at pixels labelled ``ignore_index``.

    z_k(q) = q.mu_k / tau + q^T Sigma_k q / (2 tau^2)
    L(q)   = logsumexp_k z_k(q) - q.mu_y / tau

    ``covariance`` is [K, A, A] (full) or [K, A] (diagonal). Inputs of lower
    precision than float32 are computed in float32. Differentiable in ``q``
    through autograd; mean and covariance are treated as constants, as they are
    running statistics, not parameters.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    valid = labels != ignore_index
    y = torch.where(valid, labels, torch.zeros_like(labels)).long()
    qf = q.to(acc)
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
