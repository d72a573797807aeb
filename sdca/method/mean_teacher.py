"""The mean teacher of one-stage self-training (DACS, as SePiCo and DAFormer run it): the teacher's weights are
an exponential moving average of the student's, its argmax on the weak target view is the pseudo-label, and one
confidence share per batch weighs the pseudo-labelled pixels. Pure functions on tensors; the stage that drives
them is :mod:`sdca.engine.mean_teacher`."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

IGNORE = 255


def ema_alpha(step: int, alpha: float) -> float:
    """α_t = min(1 − 1/(t + 1), α) after the student's ``step``-th update (t ≥ 1): early on the teacher follows
    the student closely (α_1 = 0.5), later it averages over about 1/(1 − α) updates."""
    if step < 1:
        raise ValueError(f"step counts the student's updates from 1, got {step}")
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must lie in [0, 1), got {alpha}")
    return min(1.0 - 1.0 / (step + 1), alpha)


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, alpha: float) -> None:
    """θ_teacher ← α θ_teacher + (1 − α) θ_student for every parameter, in place. Buffers (batch-norm running
    statistics) are not averaged: DAFormer's teacher averages parameters only."""
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    if len(t_params) != len(s_params) or any(t.shape != s.shape for t, s in zip(t_params, s_params)):
        raise ValueError("teacher and student must have the same parameters (the teacher is a copy of the student)")
    if not t_params:
        return
    torch._foreach_mul_(t_params, alpha)
    torch._foreach_add_(t_params, [s.detach() for s in s_params], alpha=1.0 - alpha)


@torch.no_grad()
def pseudo_labels_and_weight(logits: torch.Tensor, threshold: float, ignore_top: int = 0,
                             ignore_bottom: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's pseudo-labels and DACS's per-pixel weight from its logits [B, K, H, W] (at label size).

    Returns (labels [B, H, W] int64: the argmax; weight [B, H, W] float32: the share of the batch's pixels whose
    max softmax is at least ``threshold``, one value for every pixel, with the first ``ignore_top`` and the last
    ``ignore_bottom`` rows set to 0; confidence [B, H, W]: the max softmax). The share is counted over the whole
    batch, ignored rows included, as DAFormer counts it. Everything stays on the device (no host read-back).
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be [B, K, H, W], got shape {tuple(logits.shape)}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    if ignore_top < 0 or ignore_bottom < 0:
        raise ValueError(f"ignored rows must be at least 0, got top {ignore_top}, bottom {ignore_bottom}")
    confidence, labels = torch.softmax(logits.detach().float(), dim=1).max(dim=1)
    share = (confidence >= threshold).float().mean()
    weight = share.expand_as(confidence).clone()
    height = weight.shape[1]
    if ignore_top:
        weight[:, :ignore_top] = 0.0
    if ignore_bottom:
        weight[:, max(0, height - ignore_bottom):] = 0.0
    return labels, weight, confidence


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                           ignore_index: int = IGNORE) -> torch.Tensor:
    """Per-pixel cross-entropy times ``weight``, averaged over every pixel (ignored ones count as 0 in the mean,
    as mmseg's weighted loss averages). ``logits`` [B, K, H, W] at the labels' size."""
    if logits.shape[-2:] != labels.shape[-2:] or weight.shape != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)}, labels {tuple(labels.shape)} and weight "
                         f"{tuple(weight.shape)} must share [B, H, W]")
    ce = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    return (ce * weight).mean()
