"""The SDCA kernels, one Python function per op.

Each function calls the compiled extension (``torch.ops.sdca.*``, built from
csrc/) when it is loaded and has kernels for the tensors' device, and the
pure-PyTorch reference in :mod:`sdca.ops.reference` otherwise. ``backends()``
says which implementations are live; ``sdca doctor`` prints it.
"""
from __future__ import annotations

import contextlib
import os

import torch

from . import reference
from ._loader import backends, extension_error, has_ops

__all__ = ["closed_form_loss", "class_moments", "update_statistics", "merge_moments", "backends", "has_ops",
           "extension_error", "reference", "reference_only"]

merge_moments = reference.merge_moments  # K x A (x A) elementwise work: PyTorch is all it needs

# SDCA_FORCE_REFERENCE=1 runs everything on the reference kernels, e.g. to rule the extension out when a
# result looks wrong.
_force_reference = os.environ.get("SDCA_FORCE_REFERENCE", "0") == "1"


@contextlib.contextmanager
def reference_only():
    """Within this block every op uses the pure-PyTorch reference, whatever is built."""
    global _force_reference
    previous, _force_reference = _force_reference, True
    try:
        yield
    finally:
        _force_reference = previous


def _use_extension(tensor: torch.Tensor) -> bool:
    return not _force_reference and has_ops() and tensor.device.type in backends()["devices"]


def closed_form_loss(q: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor,
                     tau: float, normalize: bool = False, ignore_index: int = 255) -> torch.Tensor:
    """Per-pixel closed-form SDCA loss (Eq. 14), 0 at ignored pixels. See :func:`reference.closed_form_loss`."""
    if _use_extension(q):
        # Under no_grad (evaluation) nothing will ask for the gradient: the kernel then skips it entirely.
        wants_grad = q.requires_grad and torch.is_grad_enabled()
        loss, _ = torch.ops.sdca.closed_form_loss(q, labels, mean.detach(), covariance.detach(), float(tau),
                                                  bool(normalize), int(ignore_index), wants_grad)
        return loss
    return reference.closed_form_loss(q, labels, mean, covariance, tau, normalize, ignore_index)


def class_moments(features: torch.Tensor, labels: torch.Tensor, num_classes: int, full: bool,
                  ignore_index: int = 255, dtype: torch.dtype = torch.float64):
    """Per-class count, mean and biased covariance of one batch. See :func:`reference.class_moments`.

    With the extension, a full covariance comes back at the features' accumulation precision (the Gram
    product is the whole cost, and float32 makes it twice as fast); everything else is in ``dtype``.
    """
    if _use_extension(features):
        count, mean, cov = torch.ops.sdca.class_moments(features.detach(), labels, int(num_classes), bool(full),
                                                        int(ignore_index))
        return count, mean.to(dtype), (cov if full else cov.to(dtype))
    return reference.class_moments(features.detach(), labels, num_classes, full, ignore_index, dtype)


def update_statistics(count: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor, features: torch.Tensor,
                      labels: torch.Tensor, ignore_index: int = 255) -> None:
    """Merge one batch into running statistics in place (Eq. 3-4). See :func:`reference.update_statistics`."""
    if _use_extension(features):
        torch.ops.sdca.update_statistics(count, mean, covariance, features.detach(), labels, int(ignore_index))
    else:
        reference.update_statistics(count, mean, covariance, features.detach(), labels, ignore_index)
