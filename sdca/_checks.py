"""Argument validation shared by the public functions.

Every error names the argument it is about, so that a caller several layers up
(the trainer, the CLI) can tell the user what to fix.
"""
from __future__ import annotations

from typing import Sequence

import torch


def check_tensor(name: str, value, *, ndim: int | Sequence[int] | None = None, floating: bool | None = None) -> None:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            want = " or ".join(str(d) for d in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(value.shape)}")
    if floating is True and not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if floating is False and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor, got dtype {value.dtype}")


def check_labels(name: str, labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Labels must lie in [0, num_classes) or equal ignore_index.

    This costs a pass over the labels (and a device sync on CUDA), which is why
    callers let it be switched off.
    """
    if labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"{name} contains {value}, outside [0, {num_classes}) and not the ignore index {ignore_index}"
        )


def check_positive(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 stays float64; float32, float16 and bfloat16 accumulate in float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
