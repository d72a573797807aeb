"""Segmentation metrics: confusion matrix, IoU and mIoU (also over class subsets), and PDD (Eq. 25)."""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from ._checks import check_labels, check_tensor


class ConfusionMatrix:
    """Pixel counts ``matrix[true, predicted]`` accumulated over a whole split.

    Pixels whose label is ``ignore_index`` are skipped. A prediction outside
    [0, K) (e.g. an ignore value in a pseudo-label map) counts as a miss of the
    true class: a false negative that is nobody's false positive. As in the
    Cityscapes scripts, IoU sums TP, FP and FN over the split, and a class with
    TP + FP + FN = 0 (absent from both predictions and labels) has IoU NaN and
    is left out of every mean.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device=None):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.missed = torch.zeros(num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.matrix.zero_()
        self.missed.zero_()

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> "ConfusionMatrix":
        check_tensor("prediction", prediction, floating=False)
        check_tensor("target", target, floating=False)
        if prediction.shape != target.shape:
            raise ValueError(f"prediction has shape {tuple(prediction.shape)} but target has {tuple(target.shape)}; "
                             "resize predictions to the label resolution first")
        check_labels("target", target, self.num_classes, self.ignore_index)
        k = self.num_classes
        target = target.reshape(-1).to(self.matrix.device).long()
        prediction = prediction.reshape(-1).to(self.matrix.device).long()
        valid = target != self.ignore_index
        target, prediction = target[valid], prediction[valid]
        in_range = (prediction >= 0) & (prediction < k)
        self.matrix += torch.bincount(target[in_range] * k + prediction[in_range], minlength=k * k).view(k, k)
        self.missed += torch.bincount(target[~in_range], minlength=k)
        return self

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        if other.num_classes != self.num_classes:
            raise ValueError(f"other has {other.num_classes} classes, expected {self.num_classes}")
        self.matrix += other.matrix.to(self.matrix.device)
        self.missed += other.missed.to(self.missed.device)
        return self

    def all_reduce(self, group=None) -> "ConfusionMatrix":
        from . import collectives

        collectives.all_reduce(self.matrix, group=group)
        collectives.all_reduce(self.missed, group=group)
        return self

    # --------------------------------------------------------------- readouts
    def intersection_union(self):
        tp = self.matrix.diag()
        union = self.matrix.sum(1) + self.missed + self.matrix.sum(0) - tp
        return tp, union

    def iou(self) -> torch.Tensor:
        """Per-class IoU [K] in float64; NaN for classes absent from predictions and labels."""
        tp, union = self.intersection_union()
        iou = tp.double() / union.double()
        return torch.where(union > 0, iou, torch.full_like(iou, math.nan))

    def miou(self, classes: Optional[Sequence[int]] = None) -> float:
        """Mean IoU over ``classes`` (all by default), skipping NaN classes; NaN if none is left."""
        return mean_iou(self.iou(), classes)

    def pixel_accuracy(self) -> float:
        total = int(self.matrix.sum() + self.missed.sum())
        return float(self.matrix.diag().sum()) / total if total else math.nan

    def summary(self, class_names: Optional[Sequence[str]] = None,
                subsets: Optional[Dict[str, Iterable[int]]] = None) -> dict:
        """A JSON-ready dict: mIoU, pixel accuracy, per-class IoU (by name) and the mIoU of each named subset."""
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"class_names has {len(names)} names, expected {self.num_classes}")
        iou = self.iou()

        def clean(v):  # NaN (nothing to score) becomes None, which JSON can hold
            return None if v is None or math.isnan(v) else v
        out = {"mIoU": clean(self.miou()), "pixel_accuracy": clean(self.pixel_accuracy()),
               "IoU": {n: clean(v) for n, v in zip(names, iou.tolist())}}
        for name, indices in (subsets or {}).items():
            out[f"mIoU_{name}"] = clean(mean_iou(iou, list(indices)))
        return out

    def state_dict(self) -> dict:
        return {"matrix": self.matrix.clone(), "missed": self.missed.clone()}

    def load_state_dict(self, state: dict) -> "ConfusionMatrix":
        if tuple(state["matrix"].shape) != (self.num_classes, self.num_classes):
            raise ValueError(f"state_dict['matrix'] has shape {tuple(state['matrix'].shape)}, "
                             f"expected {(self.num_classes, self.num_classes)}")
        self.matrix = state["matrix"].to(self.matrix.device, torch.int64).clone()
        self.missed = state["missed"].to(self.missed.device, torch.int64).clone()
        return self


def mean_iou(iou: torch.Tensor, classes: Optional[Sequence[int]] = None) -> float:
    values = iou if classes is None else iou[torch.as_tensor(list(classes), dtype=torch.long, device=iou.device)]
    values = values[~torch.isnan(values)]
    return float(values.mean()) if values.numel() else math.nan


def tail_classes(source_pixel_counts: torch.Tensor, fraction: float = 0.01) -> list:
    """Classes holding less than ``fraction`` of the source pixels (the paper's tail classes)."""
    counts = torch.as_tensor(source_pixel_counts, dtype=torch.float64)
    share = counts / counts.sum()
    return torch.nonzero(share < fraction).flatten().tolist()


class PixelDiscrimination:
    """PDD of Eq. 25, accumulated over batches.

    PDD(k) = mean over pixels x of class k of cos(x, mu_k) / sum_{i != k} cos(x, mu_i).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.total = torch.zeros(num_classes, dtype=torch.float64)
        self.count = torch.zeros(num_classes, dtype=torch.int64)

    def update(self, features: torch.Tensor, labels: torch.Tensor, means: torch.Tensor) -> "PixelDiscrimination":
        check_tensor("features", features, ndim=2, floating=True)
        check_tensor("labels", labels, ndim=1, floating=False)
        check_tensor("means", means, ndim=2, floating=True)
        if means.shape != (self.num_classes, features.shape[1]):
            raise ValueError(f"means has shape {tuple(means.shape)}, expected {(self.num_classes, features.shape[1])}")
        check_labels("labels", labels, self.num_classes, self.ignore_index)
        valid = labels != self.ignore_index
        x = F.normalize(features[valid].double(), dim=1)
        y = labels[valid].long()
        cos = x @ F.normalize(means.double().to(x.device), dim=1).t()  # [N, K]
        own = cos.gather(1, y.unsqueeze(1)).squeeze(1)
        ratio = own / (cos.sum(1) - own)
        self.total += torch.zeros(self.num_classes, dtype=torch.float64, device=x.device).index_add_(0, y, ratio).cpu()
        self.count += torch.bincount(y, minlength=self.num_classes).cpu()
        return self

    def all_reduce(self, group=None) -> "PixelDiscrimination":
        from . import collectives

        collectives.all_reduce(self.total, group=group)
        collectives.all_reduce(self.count, group=group)
        return self

    def value(self) -> torch.Tensor:
        """PDD per class [K]; NaN for classes with no pixel."""
        out = self.total / self.count.double()
        return torch.where(self.count > 0, out, torch.full_like(out, math.nan))


def pdd(features: torch.Tensor, labels: torch.Tensor, means: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """PDD (Eq. 25) of one set of pixels; see :class:`PixelDiscrimination`."""
    return PixelDiscrimination(means.shape[0], ignore_index).update(features, labels, means).value()
