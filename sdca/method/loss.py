"""The SDCA contrastive loss in closed form (Eq. 13-16)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from .._checks import accumulation_dtype, check_positive, check_tensor
from .._checks import check_labels as _check_labels

VARIANTS = ("paper", "reference")


def _check_statistics(features: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor) -> None:
    check_tensor("mean", mean, ndim=2, floating=True)
    check_tensor("covariance", covariance, ndim=(2, 3), floating=True)
    num_classes, dim = mean.shape
    if dim != features.shape[1]:
        raise ValueError(f"mean has dimension A={dim} but features has A={features.shape[1]}")
    expected = [(num_classes, dim), (num_classes, dim, dim)]
    if tuple(covariance.shape) not in expected:
        raise ValueError(f"covariance has shape {tuple(covariance.shape)}, expected {expected[1]} (full) "
                         f"or {expected[0]} (diagonal) for mean of shape {tuple(mean.shape)}")


def sdca_loss(features: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor,
              tau: float, variant: str = "paper", normalize: bool = True, ignore_index: int = 255,
              check_labels: bool = True) -> torch.Tensor:
    """Mean over non-ignored pixels of the closed-form upper bound L-bar of Eq. 14.

    ``features`` [N, A] are pixel embeddings q, ``labels`` [N] their classes
    (``ignore_index`` skipped), ``mean`` [K, A] and ``covariance`` [K, A, A]
    (full) or [K, A] (diagonal, told apart by shape) the class statistics, which
    are treated as constants.

    - ``variant="paper"``: q is L2-normalised first when ``normalize`` is true,
      then L-bar = logsumexp_k(q.mu_k/tau + q^T Sigma_k q/(2 tau^2)) - q.mu_y/tau.
    - ``variant="reference"``: the public research code's value: q and every
      mu_k are L2-normalised, the diagonal variance vector of each class is
      L2-normalised too, then the same closed form (its cross-entropy plus its
      covariance term); ``normalize`` is ignored and ``covariance`` must be
      diagonal.

    With no labelled pixel the result is 0 with a zero gradient. float16 and
    bfloat16 inputs are computed in float32 (autocast is switched off inside).
    ``check_labels=False`` skips the label-range check (a device sync on CUDA).
    """
    check_tensor("features", features, ndim=2, floating=True)
    check_tensor("labels", labels, ndim=1, floating=False)
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but features has {features.shape[0]} pixels")
    _check_statistics(features, mean, covariance)
    tau = check_positive("tau", tau)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if check_labels:
        _check_labels("labels", labels, mean.shape[0], ignore_index)

    acc = accumulation_dtype(features)
    with torch.autocast(device_type=features.device.type, enabled=False):
        # features keep their dtype: the kernels convert per tile, so no full-size float32 copy is made.
        mean = mean.detach().to(device=features.device, dtype=acc)
        covariance = covariance.detach().to(device=features.device, dtype=acc)
        labels = labels.to(features.device)
        if variant == "reference":
            if covariance.dim() != 2:
                raise ValueError("variant='reference' reproduces the public code, which keeps diagonal variances: "
                                 f"covariance must have shape {tuple(mean.shape)}, got {tuple(covariance.shape)}")
            mean = F.normalize(mean, dim=1)
            covariance = F.normalize(covariance, dim=1)
            normalize = True
        per_pixel = ops.closed_form_loss(features, labels, mean, covariance, tau, normalize, ignore_index)
        # Ignored pixels contribute exactly 0 (value and gradient), so summing all
        # N and dividing by the labelled count needs no host sync.
        n_valid = (labels != ignore_index).sum().clamp_min(1)
        return per_pixel.sum() / n_valid
