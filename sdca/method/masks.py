"""Which pixels get a label: target masks (Eq. 5) and class-wise pseudo-label thresholds (Eq. 19)."""
from __future__ import annotations

import torch

from .._checks import check_tensor


def _confidence(logits: torch.Tensor):
    """Max softmax probability and its class over dim 1, computed in float32 or better."""
    check_tensor("logits", logits, ndim=(2, 3, 4), floating=True)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.softmax(logits.detach().to(dtype), dim=1).max(dim=1)


def target_mask(logits: torch.Tensor, delta: float = 0.9, ignore_index: int = 255,
                class_balanced: bool = False) -> torch.Tensor:
    """Eq. 5: argmax class where its softmax probability is at least ``delta``, else ``ignore_index``.

    ``class_balanced``: each class's threshold is min(delta, the median confidence of the pixels predicted as
    it in this batch) -- Eq. 19's rule applied per batch -- so that classes the model is never 90% sure of
    still get target pixels instead of the loss seeing only the confident majority classes.
    ``logits`` is [B, K, h, w] (or [N, K]); the result has the shape without the class dim, int64.
    """
    if not 0.0 <= float(delta) <= 1.0:
        raise ValueError(f"delta must lie in [0, 1], got {delta}")
    confidence, prediction = _confidence(logits)
    threshold = delta
    if class_balanced:
        medians = class_median_thresholds(confidence, prediction, logits.shape[1], cap=None)
        threshold = medians.to(confidence.dtype).clamp(max=delta)[prediction]
    return torch.where(confidence >= threshold, prediction, torch.full_like(prediction, ignore_index))


def class_median_thresholds(confidence: torch.Tensor, prediction: torch.Tensor, num_classes: int,
                            cap: float | None = 0.9) -> torch.Tensor:
    """Eq. 19 in memory: for each class, the median max-probability over the pixels predicted as it.

    The median is the lower one (``torch.median``: the ((n-1)//2)-th smallest).
    The public code caps it at 0.9 (``cap``, None for no cap); a class never
    predicted gets 0. For whole data sets use :class:`StreamingClassMedian`.
    """
    check_tensor("confidence", confidence, floating=True)
    check_tensor("prediction", prediction, floating=False)
    if confidence.shape != prediction.shape:
        raise ValueError(f"confidence has shape {tuple(confidence.shape)} but prediction has {tuple(prediction.shape)}")
    conf = confidence.reshape(-1)
    if conf.dtype != torch.float64:  # float64 stays exact (a rounded median could exclude its own pixel)
        conf = conf.float()
    pred = prediction.reshape(-1)
    out = torch.zeros(num_classes, dtype=conf.dtype, device=conf.device)
    for k in range(num_classes):
        values = conf[pred == k]
        if values.numel():
            out[k] = values.median()
    return out.clamp(max=cap) if cap is not None else out


class StreamingClassMedian:
    """Exact per-class median of float32 confidences over a data set too large for memory, in two passes.

    Non-negative float32 values sort like their bit patterns read as integers,
    so pass 1 histograms the upper 16 bits per class, which locates the bucket
    holding the median, and pass 2 histograms the lower 16 bits of the values
    in that bucket, which pins the exact value. Memory is 2 x K x 65536 counts,
    whatever the data set size; the result equals :func:`class_median_thresholds`.

    Usage: feed every batch to ``first_pass``, then every batch again (same
    data, any order) to ``second_pass``, then read ``thresholds()``. The
    histograms are sums, so ``all_reduce`` after each pass pools DDP ranks.
    """

    BINS = 1 << 16

    def __init__(self, num_classes: int, device=None):
        self.num_classes = num_classes
        self.high = torch.zeros(num_classes * self.BINS, dtype=torch.int64, device=device)
        self.low = torch.zeros(num_classes * self.BINS, dtype=torch.int64, device=device)
        self._bucket = None  # [K] upper-16-bit bucket holding each class's median
        self._rank = None  # [K] rank of the median inside that bucket

    @staticmethod
    def _bits(confidence: torch.Tensor) -> torch.Tensor:
        conf = confidence.detach().reshape(-1).float()
        if conf.numel() and bool((conf < 0).any()):
            raise ValueError("confidence must be non-negative")
        return conf.view(torch.int32).long()

    def _prediction(self, prediction: torch.Tensor) -> torch.Tensor:
        pred = prediction.detach().reshape(-1).long()
        if pred.numel() and bool(((pred < 0) | (pred >= self.num_classes)).any()):
            raise ValueError(f"prediction must lie in [0, {self.num_classes})")
        return pred

    def first_pass(self, confidence: torch.Tensor, prediction: torch.Tensor) -> None:
        bits, pred = self._bits(confidence), self._prediction(prediction)
        self.high += torch.bincount(pred * self.BINS + (bits >> 16), minlength=self.high.numel())
        self._bucket = None

    def _locate(self) -> None:
        hist = self.high.view(self.num_classes, self.BINS)
        counts = hist.sum(1)
        rank = ((counts - 1).clamp_min(0)) // 2
        cumulative = hist.cumsum(1)
        bucket = (cumulative <= rank.unsqueeze(1)).sum(1)
        before = torch.where(bucket > 0, cumulative.gather(1, (bucket - 1).clamp_min(0).unsqueeze(1)).squeeze(1),
                             torch.zeros_like(bucket))
        self._bucket, self._rank, self._counts = bucket, rank - before, counts

    def second_pass(self, confidence: torch.Tensor, prediction: torch.Tensor) -> None:
        if self._bucket is None:
            self._locate()
        bits, pred = self._bits(confidence), self._prediction(prediction)
        keep = (bits >> 16) == self._bucket[pred]
        self.low += torch.bincount(pred[keep] * self.BINS + (bits[keep] & 0xFFFF), minlength=self.low.numel())

    def counts(self) -> torch.Tensor:
        """Pixels predicted as each class (after the first pass)."""
        return self.high.view(self.num_classes, self.BINS).sum(1)

    def thresholds(self, cap: float | None = 0.9) -> torch.Tensor:
        if self._bucket is None:
            self._locate()
        hist = self.low.view(self.num_classes, self.BINS)
        low = (hist.cumsum(1) <= self._rank.unsqueeze(1)).sum(1)
        bits = ((self._bucket << 16) | low).to(torch.int32)
        values = bits.view(torch.float32).clone()
        values[self._counts == 0] = 0.0
        return values.clamp(max=cap) if cap is not None else values

    def all_reduce(self, group=None) -> None:
        from .. import collectives

        if collectives.active():
            collectives.all_reduce(self.high, group=group)
            collectives.all_reduce(self.low, group=group)
            self._bucket = None


def pseudo_labels(logits: torch.Tensor, thresholds: torch.Tensor, ignore_index: int = 255,
                  probabilities: bool = False) -> torch.Tensor:
    """Eq. 19's labelling rule: argmax class where its probability is at least that class's threshold.

    ``probabilities=True``: ``logits`` already holds softmax probabilities (the exact values the thresholds
    were computed from, so a pixel at its class's median is kept).
    """
    if probabilities:
        check_tensor("logits", logits, ndim=(2, 3, 4), floating=True)
        confidence, prediction = logits.detach().max(dim=1)
    else:
        confidence, prediction = _confidence(logits)
    thresholds = thresholds.to(device=confidence.device, dtype=confidence.dtype)
    if thresholds.dim() != 1 or thresholds.shape[0] != logits.shape[1]:
        raise ValueError(f"thresholds must have shape ({logits.shape[1]},), got {tuple(thresholds.shape)}")
    keep = confidence >= thresholds[prediction]
    return torch.where(keep, prediction, torch.full_like(prediction, ignore_index))
