"""The projection head of SePiCo's contrastive term: training-only, never part of an exported segmenter."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ProjectionHead(nn.Module):
    """Two 1x1 conv + batch norm + ReLU blocks (``in_dim`` -> ``hidden`` -> ``out_dim``), output L2-normalised
    per pixel. It reads the backbone's feature map and only feeds the contrastive loss, so the segmenter (and its
    ONNX export) is the same network with or without it."""

    def __init__(self, in_dim: int, out_dim: int = 512, hidden: int = 0):
        super().__init__()
        hidden = hidden or in_dim
        if min(in_dim, out_dim, hidden) < 1:
            raise ValueError(f"projection widths must be positive, got in {in_dim}, hidden {hidden}, out {out_dim}")
        self.in_dim, self.hidden, self.out_dim = in_dim, hidden, out_dim
        self.layers = nn.Sequential(
            nn.Conv2d(in_dim, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_dim, 1, bias=False), nn.BatchNorm2d(out_dim), nn.ReLU(inplace=True))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.layers(features), dim=1)
