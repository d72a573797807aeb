"""The SDCA kernels, one Python function per op.

Each function calls the compiled extension (``torch.ops.sdca.*``, built from
csrc/) when it is loaded and supports the inputs, and the pure-PyTorch
reference in :mod:`sdca.ops.reference` otherwise. ``backends()`` says which
implementations are live; ``sdca doctor`` prints it.
"""
from __future__ import annotations

import torch

from . import reference
from ._loader import backends, extension_error, has_ops

__all__ = ["closed_form_loss", "class_moments", "backends", "has_ops", "extension_error", "reference"]


def _use_extension(*tensors: torch.Tensor) -> bool:
    if not has_ops():
        return False
    device = tensors[0].device.type
    return device in backends()["devices"]


def closed_form_loss(q: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor,
                     tau: float, ignore_index: int = 255) -> torch.Tensor:
    """Per-pixel closed-form SDCA loss (Eq. 14), 0 at ignored pixels. See :func:`reference.closed_form_loss`."""
    if _use_extension(q):
        return torch.ops.sdca.closed_form_loss(q, labels, mean.detach(), covariance.detach(), float(tau),
                                               int(ignore_index))
    return reference.closed_form_loss(q, labels, mean, covariance, tau, ignore_index)


def class_moments(features: torch.Tensor, labels: torch.Tensor, num_classes: int, full: bool,
                  ignore_index: int = 255, dtype: torch.dtype = torch.float64):
    """Per-class count, mean and biased covariance of one batch. See :func:`reference.class_moments`."""
    if _use_extension(features):
        count, mean, cov = torch.ops.sdca.class_moments(features.detach(), labels, int(num_classes), bool(full),
                                                        int(ignore_index))
        return count, mean.to(dtype), cov.to(dtype)
    return reference.class_moments(features.detach(), labels, num_classes, full, ignore_index, dtype)
