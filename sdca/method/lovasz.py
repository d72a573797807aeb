"""Lovász-Softmax: a convex surrogate of 1 - IoU on softmax probabilities (Berman et al., CVPR 2018)."""
from __future__ import annotations

import torch

from .._checks import check_tensor

CLASS_MODES = ("present", "all")


def _rows(probas: torch.Tensor, labels: torch.Tensor):
    """[B, C, H, W] + [B, H, W] (or [P, C] + [P]) -> [P, C] + [P]."""
    if probas.dim() == 2:
        return probas, labels.reshape(-1)
    num_classes = probas.shape[1]
    return probas.movedim(1, -1).reshape(-1, num_classes), labels.reshape(-1)


def _lovasz_rows(probas: torch.Tensor, labels: torch.Tensor, classes: str, ignore_index: int) -> torch.Tensor:
    keep = labels != ignore_index
    probas, labels = probas[keep], labels[keep]
    if probas.shape[0] == 0:
        return probas.sum() * 0.0
    num_classes = probas.shape[1]
    # Class-major [C, P] so each class's sort runs over contiguous memory (about 1.6x faster than sorting the
    # columns of [P, C] on a CPU, where the sort dominates the warm-up step).
    foreground = torch.nn.functional.one_hot(labels.long(), num_classes).to(probas.dtype).t().contiguous()
    errors = (foreground - probas.t()).abs()
    errors_sorted, order = errors.sort(dim=1, descending=True)
    fg_sorted = foreground.gather(1, order)
    # Gradient of the Lovász extension of the Jaccard loss at the sorted errors:
    # the increments of 1 - |gt ∩ top-i| / |gt ∪ top-i| as i grows.
    gts = fg_sorted.sum(1, keepdim=True)
    intersection = gts - fg_sorted.cumsum(1)
    union = gts + (1.0 - fg_sorted).cumsum(1)
    jaccard = 1.0 - intersection / union
    increments = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)
    per_class = (errors_sorted * increments).sum(1)  # [C]
    if classes == "present":
        present = foreground.sum(1) > 0
        return per_class[present].mean()
    return per_class.mean()


def lovasz_softmax(probas: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255, classes: str = "present",
                   per_image: bool = False) -> torch.Tensor:
    """Lovász-Softmax loss of ``probas`` [B, C, H, W] (softmax outputs) against ``labels`` [B, H, W].

    Pixels labelled ``ignore_index`` are skipped. ``classes="present"`` averages
    over the classes present in the labels (the public code's setting), "all"
    over every class. ``per_image=True`` averages per-image losses instead of
    one loss over the batch. Computed in float32 at least. Also accepts
    ``probas`` [P, C] with ``labels`` [P].
    """
    check_tensor("probas", probas, ndim=(2, 4), floating=True)
    check_tensor("labels", labels, floating=False)
    if classes not in CLASS_MODES:
        raise ValueError(f"classes must be one of {CLASS_MODES}, got {classes!r}")
    expected = (probas.shape[0],) if probas.dim() == 2 else (probas.shape[0],) + tuple(probas.shape[2:])
    if tuple(labels.shape) != expected:
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {expected} for probas "
                         f"of shape {tuple(probas.shape)}")
    if probas.dtype in (torch.float16, torch.bfloat16):
        probas = probas.float()
    if per_image and probas.dim() == 4:
        losses = [_lovasz_rows(*_rows(p.unsqueeze(0), l.unsqueeze(0)), classes, ignore_index)
                  for p, l in zip(probas, labels)]
        return torch.stack(losses).mean()
    return _lovasz_rows(*_rows(probas, labels), classes, ignore_index)
