"""Turning feature maps and label maps into pixel rows, the form the statistics and losses take."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from .._checks import check_tensor


def downsample_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of label maps [B, H, W] to ``size`` = (h, w).

    Uses the same ``F.interpolate(mode="nearest")`` sampling as the public code
    (the top-left pixel of each block when H/h is an integer), so masks built
    here agree with it pixel for pixel.
    """
    check_tensor("labels", labels, ndim=3, floating=False)
    h, w = int(size[0]), int(size[1])
    if tuple(labels.shape[-2:]) == (h, w):
        return labels
    # float32 holds every label value (< 2^24) exactly.
    out = F.interpolate(labels.unsqueeze(1).float(), size=(h, w), mode="nearest")
    return out.squeeze(1).to(labels.dtype)


def flatten_pixels(features: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Features [B, A, h, w] + labels [B, H, W] -> rows [B*h*w, A] + labels [B*h*w].

    Label maps larger than the feature map are nearest-downsampled to it. Pixel
    rows ([N, A] with [N]) pass through unchanged. Ignored pixels are kept, so
    rows stay aligned with their positions in the map.
    """
    if features.dim() == 2:
        return features, labels
    check_tensor("features", features, ndim=4, floating=True)
    check_tensor("labels", labels, ndim=3, floating=False)
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"features has batch size {features.shape[0]} but labels has {labels.shape[0]}")
    labels = downsample_labels(labels, features.shape[-2:])
    rows = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    return rows, labels.reshape(-1)


def majority_downsample_labels(labels: torch.Tensor, size: Sequence[int], num_classes: int, ratio: float = 0.75,
                               ignore_index: int = 255) -> torch.Tensor:
    """Label maps [B, H, W] brought to a feature map's ``size`` = (h, w) by average-pooling one-hot maps, as
    SePiCo labels its projected features: a feature pixel takes the majority class of its block when that class
    covers at least ``ratio`` of it (ignored pixels count against every class), else ``ignore_index``."""
    check_tensor("labels", labels, ndim=3, floating=False)
    h, w = int(size[0]), int(size[1])
    valid = (labels >= 0) & (labels < num_classes)
    onehot = F.one_hot(torch.where(valid, labels, num_classes).long(), num_classes + 1)[..., :num_classes]
    shares = F.adaptive_avg_pool2d(onehot.permute(0, 3, 1, 2).float(), (h, w))
    top, cls = shares.max(dim=1)
    return torch.where(top >= ratio - 1e-6, cls, torch.full_like(cls, ignore_index)).to(labels.dtype)
