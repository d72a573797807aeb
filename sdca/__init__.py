"""sdca: domain-adaptive semantic segmentation with semantic distribution-aware contrastive adaptation.

The names below are imported on first use, so that ``sdca --help`` and ``sdca --version`` start without
loading torch.
"""
from ._lazy import lazy_exports
from ._version import __version__

_EXPORTS = {
    "SemanticDistribution": "sdca.method", "estimate_semantic_distribution": "sdca.method",
    "sdca_loss": "sdca.method", "lovasz_softmax": "sdca.method", "target_mask": "sdca.method",
    "class_median_thresholds": "sdca.method", "StreamingClassMedian": "sdca.method", "pseudo_labels": "sdca.method",
    "ConfusionMatrix": "sdca.metrics", "PixelDiscrimination": "sdca.metrics", "mean_iou": "sdca.metrics",
    "pdd": "sdca.metrics", "tail_classes": "sdca.metrics",
    "build_model": "sdca.models", "load_model": "sdca.models",
}

__all__ = ["__version__"] + list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
