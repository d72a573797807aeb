"""The SDCA method in PyTorch: semantic distributions, the closed-form loss, masks, Lovász-Softmax."""
from .distribution import SemanticDistribution, estimate_semantic_distribution
from .loss import sdca_loss
from .lovasz import lovasz_softmax
from .masks import StreamingClassMedian, class_median_thresholds, pseudo_labels, target_mask
from .pixels import downsample_labels, flatten_pixels

__all__ = [
    "SemanticDistribution", "estimate_semantic_distribution", "sdca_loss", "lovasz_softmax",
    "StreamingClassMedian", "class_median_thresholds", "pseudo_labels", "target_mask",
    "downsample_labels", "flatten_pixels",
]
