"""sdca: domain-adaptive semantic segmentation with semantic distribution-aware contrastive adaptation.

The names below are imported on first use, so that ``sdca --help`` and ``sdca --version`` start without
loading torch.
"""
import importlib

from ._version import __version__

_EXPORTS = {
    "SemanticDistribution": "sdca.method", "estimate_semantic_distribution": "sdca.method",
    "sdca_loss": "sdca.method", "lovasz_softmax": "sdca.method", "target_mask": "sdca.method",
    "class_median_thresholds": "sdca.method", "StreamingClassMedian": "sdca.method", "pseudo_labels": "sdca.method",
    "ConfusionMatrix": "sdca.metrics", "PixelDiscrimination": "sdca.metrics", "mean_iou": "sdca.metrics",
    "pdd": "sdca.metrics", "tail_classes": "sdca.metrics",
    "build_model": "sdca.models", "load_model": "sdca.models",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sdca' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
