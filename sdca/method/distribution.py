"""Per-class Gaussian statistics of pixel features: the semantic distributions of Eq. 2-4."""
from __future__ import annotations

from typing import Iterable, Tuple

import torch

from .. import collectives, ops
from .._checks import check_labels, check_tensor
from .pixels import flatten_pixels

COVARIANCE_TYPES = ("full", "diag")


class SemanticDistribution:
    """Running count, mean and (biased) covariance of the features of each class.

    ``update`` merges a batch with the exact pooled formula of Eq. 3-4 (Chan et
    al.), so after any sequence of batches ``mean`` and ``covariance`` equal the
    mean and biased covariance of every pixel of the class seen so far. Pixels
    labelled ``ignore_index`` are skipped; classes absent from a batch are left
    as they are. State is kept in ``dtype`` (float64 by default: the running
    merge over hundreds of millions of pixels is where precision matters).

    Attributes: ``count`` [K] int64, ``mean`` [K, A], ``covariance`` [K, A, A]
    (``covariance="full"``) or [K, A] (``"diag"``).
    """

    def __init__(self, num_classes: int, dim: int, covariance: str = "full", *, ignore_index: int = 255,
                 dtype: torch.dtype = torch.float64, device=None, check_labels: bool = True):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if covariance not in COVARIANCE_TYPES:
            raise ValueError(f"covariance must be one of {COVARIANCE_TYPES}, got {covariance!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.num_classes = num_classes
        self.dim = dim
        self.covariance_type = covariance
        self.ignore_index = ignore_index
        self.check_labels = check_labels
        self.count = torch.zeros(num_classes, dtype=torch.int64, device=device)
        self.mean = torch.zeros(num_classes, dim, dtype=dtype, device=device)
        shape = (num_classes, dim, dim) if covariance == "full" else (num_classes, dim)
        self.covariance = torch.zeros(shape, dtype=dtype, device=device)

    # ------------------------------------------------------------------ basics
    @property
    def full(self) -> bool:
        return self.covariance_type == "full"

    @property
    def dtype(self) -> torch.dtype:
        return self.mean.dtype

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def __repr__(self) -> str:
        return (f"SemanticDistribution(num_classes={self.num_classes}, dim={self.dim}, "
                f"covariance={self.covariance_type!r}, pixels={int(self.count.sum())}, dtype={self.dtype})")

    def empty_like(self) -> "SemanticDistribution":
        return SemanticDistribution(self.num_classes, self.dim, self.covariance_type, ignore_index=self.ignore_index,
                                    dtype=self.dtype, device=self.device, check_labels=self.check_labels)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "SemanticDistribution":
        self.count = self.count.to(device).contiguous()
        self.mean = self.mean.to(device=device, dtype=dtype).contiguous()
        self.covariance = self.covariance.to(device=device, dtype=dtype).contiguous()
        return self

    # ----------------------------------------------------------------- updates
    def _check_batch(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        check_tensor("features", features, ndim=2, floating=True)
        check_tensor("labels", labels, ndim=1, floating=False)
        if features.shape[0] != labels.shape[0]:
            raise ValueError(f"features has {features.shape[0]} pixels but labels has {labels.shape[0]}")
        if features.shape[1] != self.dim:
            raise ValueError(f"features has dimension {features.shape[1]}, the distribution expects dim={self.dim}")
        if self.check_labels:
            check_labels("labels", labels, self.num_classes, self.ignore_index)

    def batch(self, features: torch.Tensor, labels: torch.Tensor) -> "SemanticDistribution":
        """The statistics of one batch alone, as a new distribution of the same kind.

        A full covariance from the compiled kernel stays at the features' precision (float32 for float32
        features) until :meth:`merge` converts it class by class; counts, means and diagonal variances are
        accumulated in float64.
        """
        self._check_batch(features, labels)
        out = self.empty_like()
        out.count, out.mean, out.covariance = ops.class_moments(
            features.to(self.device), labels.to(self.device), self.num_classes, self.full, self.ignore_index,
            self.dtype)
        return out

    def update(self, features: torch.Tensor, labels: torch.Tensor, *, sync: bool = False,
               group=None) -> "SemanticDistribution":
        """Merge the pixels ``features`` [N, A] with ``labels`` [N] into the running statistics (Eq. 3-4).

        With ``sync=True`` under torch.distributed, the batch statistics of all
        ranks are pooled first, so every rank merges the global batch and all
        ranks keep identical statistics.
        """
        if sync and collectives.active():
            return self.merge(self.batch(features, labels).all_reduce(group))
        self._check_batch(features, labels)
        # One fused kernel: batch moments and the merge, no K x A x A temporary.
        ops.update_statistics(self.count, self.mean, self.covariance, features.to(self.device),
                              labels.to(self.device), self.ignore_index)
        return self

    def merge(self, other: "SemanticDistribution") -> "SemanticDistribution":
        """Pool ``other`` into ``self``, as if ``self`` had also seen ``other``'s pixels (Eq. 3-4)."""
        if not isinstance(other, SemanticDistribution):
            raise ValueError(f"other must be a SemanticDistribution, got {type(other).__name__}")
        if (other.num_classes, other.dim, other.covariance_type) != (self.num_classes, self.dim, self.covariance_type):
            raise ValueError(
                "other has (num_classes, dim, covariance) = "
                f"{(other.num_classes, other.dim, other.covariance_type)}, expected "
                f"{(self.num_classes, self.dim, self.covariance_type)}")
        ops.merge_moments(self.count, self.mean, self.covariance, other.count, other.mean, other.covariance)
        return self

    def all_reduce(self, group=None) -> "SemanticDistribution":
        """Pool the statistics held by every rank, in place; afterwards all ranks hold the same.

        Each rank's statistics must describe different pixels (e.g. each rank's
        own batch). Uses the exact pooled formula: a global mean first, then
        the within- and between-rank scatter, so no raw second moments (and no
        cancellation) are involved. A no-op outside torch.distributed.
        """
        if not collectives.active():
            return self
        count = self.count.clone()
        collectives.all_reduce(count, group=group)
        n_local = self.count.to(self.dtype).unsqueeze(1)
        total = count.clamp_min(1).to(self.dtype).unsqueeze(1)
        mean = self.mean * n_local
        collectives.all_reduce(mean, group=group)
        mean = mean / total
        delta = self.mean - mean
        if self.full:
            scatter = n_local.unsqueeze(2) * (self.covariance + delta.unsqueeze(2) * delta.unsqueeze(1))
            collectives.all_reduce(scatter, group=group)
            cov = scatter / total.unsqueeze(2)
        else:
            scatter = n_local * (self.covariance + delta * delta)
            collectives.all_reduce(scatter, group=group)
            cov = scatter / total
        self.count, self.mean, self.covariance = count, mean, cov
        return self

    # -------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "dim": self.dim,
            "covariance_type": self.covariance_type,
            "ignore_index": self.ignore_index,
            "count": self.count.clone(),
            "mean": self.mean.clone(),
            "covariance": self.covariance.clone(),
        }

    def load_state_dict(self, state: dict) -> "SemanticDistribution":
        for key in ("count", "mean", "covariance"):
            if key not in state:
                raise ValueError(f"state_dict has no {key!r} entry")
        expected = {"count": tuple(self.count.shape), "mean": tuple(self.mean.shape),
                    "covariance": tuple(self.covariance.shape)}
        for key, shape in expected.items():
            got = tuple(state[key].shape)
            if got != shape:
                raise ValueError(f"state_dict[{key!r}] has shape {got}, expected {shape} "
                                 f"({self.covariance_type} covariance, K={self.num_classes}, A={self.dim})")
        if state.get("covariance_type", self.covariance_type) != self.covariance_type:
            raise ValueError(f"state_dict['covariance_type'] is {state['covariance_type']!r}, "
                             f"expected {self.covariance_type!r}")
        # Contiguous copies: the update kernel writes the statistics in place.
        fmt = torch.contiguous_format
        self.count = state["count"].to(device=self.device, dtype=torch.int64).clone(memory_format=fmt)
        self.mean = state["mean"].to(device=self.device, dtype=self.dtype).clone(memory_format=fmt)
        self.covariance = state["covariance"].to(device=self.device, dtype=self.dtype).clone(memory_format=fmt)
        return self

    @classmethod
    def from_state_dict(cls, state: dict, **kwargs) -> "SemanticDistribution":
        dist_ = cls(int(state["num_classes"]), int(state["dim"]), state["covariance_type"],
                    ignore_index=int(state.get("ignore_index", 255)), **kwargs)
        return dist_.load_state_dict(state)

    @classmethod
    def from_public(cls, state: dict, **kwargs) -> "SemanticDistribution":
        """Import the public research code's estimator file ({'Mean', 'CoVariance', 'Amount'}, diagonal)."""
        missing = [k for k in ("Mean", "CoVariance", "Amount") if k not in state]
        if missing:
            raise ValueError(f"not a public SDCA estimator state: missing {missing}")
        mean = torch.as_tensor(state["Mean"])
        num_classes, dim = mean.shape
        out = cls(int(num_classes), int(dim), "diag", **kwargs)
        # The public code keeps Amount in float32; round to the nearest count.
        out.load_state_dict({"count": torch.as_tensor(state["Amount"]).double().round(),
                             "mean": mean, "covariance": torch.as_tensor(state["CoVariance"])})
        return out


def estimate_semantic_distribution(batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], num_classes: int, dim: int,
                                   covariance: str = "full", *, ignore_index: int = 255,
                                   dtype: torch.dtype = torch.float64, device=None, sync: bool = False,
                                   progress=None) -> SemanticDistribution:
    """Algorithm 1, line 2: the semantic distribution over a whole (source) data set, streamed.

    ``batches`` yields ``(features, labels)``: either pixel rows ([N, A] and [N])
    or maps ([B, A, h, w] and [B, H, W]; labels are nearest-downsampled to the
    feature size as the public code does). Nothing but the running statistics is
    kept. ``progress`` is an optional callable wrapped around the iterable (e.g.
    tqdm); ``sync=True`` pools every batch across torch.distributed ranks.
    """
    result = SemanticDistribution(num_classes, dim, covariance, ignore_index=ignore_index, dtype=dtype,
                                  device=device)
    iterable = progress(batches) if progress is not None else batches
    for features, labels in iterable:
        with torch.no_grad():
            rows, row_labels = flatten_pixels(features, labels)
            result.update(rows, row_labels, sync=sync)
    return result
