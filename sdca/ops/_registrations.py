"""Fake (meta) kernels for the compiled ops, so torch.compile and export can trace them; imported only once
sdca._C has loaded."""
from __future__ import annotations

import torch


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("sdca::closed_form_loss")
def _closed_form_loss_fake(q, labels, mean, covariance, tau, normalize, ignore_index, compute_grad):
    acc = _accumulation_dtype(q.dtype)
    grad_shape = (q.shape[0], q.shape[1]) if compute_grad else (0,)
    return q.new_empty((q.shape[0],), dtype=acc), q.new_empty(grad_shape, dtype=acc)


@torch.library.register_fake("sdca::class_moments")
def _class_moments_fake(features, labels, num_classes, full, ignore_index):
    acc = _accumulation_dtype(features.dtype)
    dim = features.shape[1]
    cov_shape = (num_classes, dim, dim) if full else (num_classes, dim)
    return (features.new_empty((num_classes,), dtype=torch.int64),
            features.new_empty((num_classes, dim), dtype=torch.float64),
            features.new_empty(cov_shape, dtype=acc if full else torch.float64))

@torch.library.register_fake("sdca::update_statistics")
def _update_statistics_fake(count, mean, covariance, features, labels, ignore_index):
    return None


# Autograd is registered in C++ (csrc/closed_form_loss/closed_form_loss_autograd.cpp) under the Autograd key.
