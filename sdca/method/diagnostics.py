"""Statistics that tell whether adaptation works, from predictions and features (no training involved).

Class shares and their KL divergence, per-pixel entropy, the log-likelihood and Mahalanobis distance of
features under a class's Gaussian (the source distributions SDCA aligns target features to), and the
precision / recall of a masked labelling (Eq. 5 masks, Eq. 19 pseudo-labels) against ground truth.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from .._checks import check_tensor


def class_shares(labels: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """Share of each class among the labelled pixels of ``labels`` (float64 [K]; zeros when none is labelled)."""
    flat = labels.reshape(-1).long()
    flat = flat[(flat != ignore_index) & (flat >= 0) & (flat < num_classes)]
    counts = torch.bincount(flat, minlength=num_classes).double()
    return counts / counts.sum() if counts.sum() > 0 else counts


def kl_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> float:
    """KL(p || q) in nats between two distributions over classes; ``eps`` is added to every class of both (then
    renormalised) so that a class one of them never has does not make it infinite."""
    p = p.double() + eps
    q = q.double() + eps
    p, q = p / p.sum(), q / q.sum()
    return float((p * (p / q).log()).sum())


def entropy(probabilities: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Shannon entropy in nats along ``dim`` (0 log 0 = 0)."""
    p = probabilities.double()
    return -(torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))).sum(dim)


def regularised_covariance(covariance: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """``covariance`` + ridge x (mean variance) x I, full [A, A] or diagonal [A]: features of a few hundred
    frames (or L2-normalised ones) give singular covariances, whose likelihoods would be infinite."""
    cov = covariance.double()
    scale = (cov.diagonal().mean() if cov.dim() == 2 else cov.mean()).clamp_min(1e-12)
    if cov.dim() == 2:
        return cov + ridge * scale * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    return cov + ridge * scale


def gaussian_scores(x: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor,
                    ridge: float = 1e-3) -> Tuple[torch.Tensor, torch.Tensor]:
    """(log-likelihood, Mahalanobis distance) of each row of ``x`` [N, A] under N(mean, covariance + ridge),
    the covariance full [A, A] or diagonal [A]. float64."""
    check_tensor("x", x, ndim=2, floating=True)
    x, mean = x.double(), mean.double().to(x.device)
    cov = regularised_covariance(covariance.to(x.device), ridge)
    d = x - mean
    a = x.shape[1]
    if cov.dim() == 2:
        chol = torch.linalg.cholesky(cov)
        z = torch.linalg.solve_triangular(chol, d.t(), upper=False)  # [A, N]
        squared = (z * z).sum(0)
        logdet = 2 * chol.diagonal().log().sum()
    else:
        squared = (d * d / cov).sum(1)
        logdet = cov.log().sum()
    loglik = -0.5 * (squared + logdet + a * math.log(2 * math.pi))
    return loglik, squared.sqrt()


def masked_precision_recall(masked: torch.Tensor, truth: torch.Tensor, num_classes: int,
                            ignore_index: int = 255) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per class: precision (of the pixels a mask labels k, the share whose truth is k), recall (of the pixels
    whose truth is k, the share the mask labels k) and the count of pixels the mask labels k. ``masked`` holds
    ``ignore_index`` where the mask rejects a pixel; truth pixels at ``ignore_index`` are left out of both.
    NaN where a denominator is 0."""
    m, t = masked.reshape(-1).long(), truth.reshape(-1).long()
    valid = t != ignore_index
    m, t = m[valid], t[valid]
    kept = m != ignore_index
    labelled = torch.bincount(m[kept], minlength=num_classes).double()
    correct = torch.bincount(m[kept & (m == t)], minlength=num_classes).double()
    actual = torch.bincount(t, minlength=num_classes).double()
    nan = torch.full_like(labelled, math.nan)
    precision = torch.where(labelled > 0, correct / labelled.clamp_min(1), nan)
    recall = torch.where(actual > 0, correct / actual.clamp_min(1), nan)
    return precision, recall, labelled
