"""sdca: domain-adaptive semantic segmentation with semantic distribution-aware contrastive adaptation."""
from ._version import __version__
from .method import (SemanticDistribution, StreamingClassMedian, class_median_thresholds,
                     estimate_semantic_distribution, lovasz_softmax, pseudo_labels, sdca_loss, target_mask)
from .metrics import ConfusionMatrix, PixelDiscrimination, mean_iou, pdd, tail_classes
from .models import build_model, load_model

__all__ = [
    "__version__", "SemanticDistribution", "estimate_semantic_distribution", "sdca_loss", "lovasz_softmax",
    "target_mask", "class_median_thresholds", "StreamingClassMedian", "pseudo_labels",
    "ConfusionMatrix", "PixelDiscrimination", "mean_iou", "pdd", "tail_classes", "build_model", "load_model",
]
