"""DeepLab-v2 segmenters, their weights and checkpoints."""
from .checkpoint import atomic_save, load_model, read_checkpoint, save_checkpoint
from .deeplab import (
                      CAFFE_BGR,
                      IMAGENET,
                      ASPPClassifier,
                      DeepLabV2,
                      ModelInfo,
                      Normalization,
                      SegmentationOutput,
                      upsample_logits,
)
from .efficientnet import EfficientNetLite0, efficientnet_lite0
from .layers import FrozenBatchNorm2d, set_batchnorm_mode
from .public import import_public_checkpoint
from .registry import ARCHS, build_model, model_from_info
from .serialization import UntrustedFileError, load_torch_file
from .weights import LoadReport, load_torchvision_weights

__all__ = [
    "build_model", "load_model", "save_checkpoint", "read_checkpoint", "atomic_save", "model_from_info", "ARCHS",
    "DeepLabV2", "ASPPClassifier", "SegmentationOutput", "ModelInfo", "Normalization", "IMAGENET", "CAFFE_BGR",
    "upsample_logits", "FrozenBatchNorm2d", "set_batchnorm_mode", "LoadReport", "import_public_checkpoint",
    "load_torchvision_weights", "efficientnet_lite0", "EfficientNetLite0", "UntrustedFileError", "load_torch_file",
]
