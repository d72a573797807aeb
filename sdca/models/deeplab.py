"""DeepLab-v2: a dilated backbone and an ASPP head of four parallel dilated 3x3 convolutions, summed."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class SegmentationOutput(NamedTuple):
    """Pixel features [B, A, h, w] and class logits [B, K, h, w], both at the output stride (8; 16 for Lite0 by default)."""

    features: torch.Tensor
    logits: torch.Tensor


@dataclass(frozen=True)
class Normalization:
    """How a model expects its input: ``(image[channel_order] * scale - mean) / std``, from RGB in [0, 1]."""

    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    scale: float = 1.0
    channel_order: str = "RGB"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Float RGB images in [0, 1], [B, 3, H, W] -> the model's input."""
        if self.channel_order == "BGR":
            images = images.flip(1)
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images * self.scale - mean) / std

    def to_dict(self) -> dict:
        return asdict(self)


IMAGENET = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# The Caffe VGG-16 convention the public code's VGG models use: BGR, 0..255, mean subtracted (BGR order).
CAFFE_BGR = Normalization(mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0), scale=255.0, channel_order="BGR")


@dataclass
class ModelInfo:
    """What a deployed model needs beside its weights."""

    arch: str
    num_classes: int
    class_names: List[str]
    palette: List[Tuple[int, int, int]]
    normalization: Normalization = IMAGENET
    ignore_index: int = 255
    train_size: Optional[Tuple[int, int]] = None  # (width, height) the model was trained at
    bn: str = "frozen"
    extra: dict = field(default_factory=dict)  # builder options (e.g. width of the small backbone)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["palette"] = [list(c) for c in self.palette]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelInfo":
        d = dict(d)
        d["normalization"] = Normalization(**{k: tuple(v) if isinstance(v, list) else v
                                              for k, v in d["normalization"].items()})
        d["palette"] = [tuple(c) for c in d["palette"]]
        if d.get("train_size") is not None:
            d["train_size"] = tuple(d["train_size"])
        return cls(**d)


class ASPPClassifier(nn.Module):
    """Four parallel 3x3 convolutions with dilation = padding = 6, 12, 18, 24, outputs summed (DeepLab-v2).

    Module names (``conv2d_list.{0..3}``) match the public code's ASPP_Classifier_V2.
    """

    def __init__(self, in_channels: int, num_classes: int, dilations: Sequence[int] = (6, 12, 18, 24)):
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d, bias=True) for d in dilations)
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1:]:
            out = out + conv(x)
        return out


class DeepLabV2(nn.Module):
    """``model(images)`` -> :class:`SegmentationOutput` (features and logits at the output stride).

    ``images`` are already normalised (see ``model.info.normalization``). Upsampling the logits to the input
    size is a separate step (:func:`upsample_logits`), so that training can use low-resolution outputs and export
    can put it in the graph.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, info: ModelInfo,
                 aspp_dilations: Sequence[int] = (6, 12, 18, 24)):
        super().__init__()
        self.backbone = backbone
        self.classifier = ASPPClassifier(backbone.out_channels, num_classes, aspp_dilations)
        self.info = info

    @property
    def feature_dim(self) -> int:
        return self.backbone.out_channels

    @property
    def num_classes(self) -> int:
        return self.classifier.conv2d_list[0].out_channels

    def forward(self, images: torch.Tensor) -> SegmentationOutput:
        features = self.backbone(images)
        return SegmentationOutput(features, self.classifier(features))

    def parameter_groups(self):
        """(backbone parameters, head parameters): the head takes 10x the learning rate in the paper's SGD."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        head = [p for p in self.classifier.parameters() if p.requires_grad]
        return backbone, head


def upsample_logits(logits: torch.Tensor, size: Sequence[int], align_corners: bool = True) -> torch.Tensor:
    """Bilinear resize of logits to ``size`` = (H, W); align_corners=True as the public code trains and tests."""
    # Sizes pass through as given (no int()): under torch.export they are symbolic, and int() would pin them.
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=align_corners)
