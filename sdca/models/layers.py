"""Batch-norm variants: frozen (as the public code's warm-up and adaptation stages use), trainable, synced."""
from __future__ import annotations

import torch
import torch.nn as nn

BN_MODES = ("frozen", "train", "sync")


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters, all stored as buffers (never trained).

    ``eps`` defaults to 0: the public SDCA code's FrozenBatchNorm2d adds no epsilon to the running variance,
    and its checkpoints (no ``num_batches_tracked`` keys) reproduce only with that. A batch norm frozen from
    a trained ``nn.BatchNorm2d`` keeps that layer's eps (see :meth:`from_batchnorm`).
    """

    def __init__(self, num_features: int, eps: float = 0.0):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A trained BatchNorm2d's state has num_batches_tracked, which a frozen layer has no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> "FrozenBatchNorm2d":
        frozen = cls(bn.num_features, eps=bn.eps)
        with torch.no_grad():
            if bn.affine:
                frozen.weight.copy_(bn.weight)
                frozen.bias.copy_(bn.bias)
            if bn.running_mean is not None:
                frozen.running_mean.copy_(bn.running_mean)
                frozen.running_var.copy_(bn.running_var)
        return frozen.to(bn.weight.device if bn.affine else frozen.weight.device)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def norm_layer(mode: str, eps: float | None = None):
    """The constructor torchvision's ResNet takes as ``norm_layer`` for a batch-norm mode."""
    if mode not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, got {mode!r}")
    if mode == "frozen":
        return lambda n: FrozenBatchNorm2d(n, eps=0.0 if eps is None else eps)
    return lambda n: nn.BatchNorm2d(n, eps=1e-5 if eps is None else eps)


def set_batchnorm_mode(module: nn.Module, mode: str) -> nn.Module:
    """Convert every batch norm in ``module`` to ``mode`` in place, keeping statistics and affine values."""
    if mode not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, got {mode!r}")
    if mode == "sync":
        module = set_batchnorm_mode(module, "train")
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in list(module.named_children()):
        if mode == "frozen" and isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, FrozenBatchNorm2d.from_batchnorm(child))
        elif mode == "train" and isinstance(child, (FrozenBatchNorm2d, nn.SyncBatchNorm)):
            bn = nn.BatchNorm2d(child.num_features, eps=child.eps if child.eps > 0 else 1e-5)
            with torch.no_grad():
                bn.weight.copy_(child.weight)
                bn.bias.copy_(child.bias)
                bn.running_mean.copy_(child.running_mean)
                bn.running_var.copy_(child.running_var)
            setattr(module, name, bn.to(child.weight.device))
        else:
            set_batchnorm_mode(child, mode)
    return module
