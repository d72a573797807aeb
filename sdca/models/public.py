"""The public SDCA release checkpoints (``{'feature_extractor', 'classifier', ...}``) imported exactly."""
from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

import torch

from .deeplab import CAFFE_BGR, IMAGENET, DeepLabV2
from .registry import build_model
from .weights import LoadReport, _compare, _read


def _strip_module(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop DDP's 'module.' prefix when every key has it (as the public code does)."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def is_public_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and "feature_extractor" in obj and "classifier" in obj


def infer_public_arch(feature_extractor: Dict[str, torch.Tensor]) -> Tuple[str, str]:
    """(arch, bn mode) of a public feature-extractor state dict, from its keys."""
    if "backbone.conv1.weight" in feature_extractor:
        blocks = {int(m.group(1)) for k in feature_extractor
                  if (m := re.match(r"backbone\.layer3\.(\d+)\.", k))}
        depth = {23: 101, 6: 50}.get(len(blocks))
        if depth is None:
            raise ValueError(f"a ResNet with {len(blocks)} blocks in layer3 is neither ResNet-50 (6) nor -101 (23)")
        # Self-training checkpoints carry ordinary batch norm (with its counter); warm-up/adaptation ones frozen.
        bn = "train" if any(k.endswith("num_batches_tracked") for k in feature_extractor) else "frozen"
        return f"deeplabv2_resnet{depth}", bn
    if "backbone.0.weight" in feature_extractor and "backbone.31.weight" in feature_extractor:
        return "deeplabv2_vgg16", "frozen"
    raise ValueError("the feature extractor keys match neither the public ResNet nor the VGG-16 layout "
                     f"(first keys: {list(feature_extractor)[:3]})")


def import_public_checkpoint(source, num_classes: Optional[int] = None, class_names=None,
                             source_name: Optional[str] = None, trusted: bool = False) -> Tuple[DeepLabV2, LoadReport]:
    """Build our model from a public SDCA checkpoint (``{'feature_extractor', 'classifier', ...}``), exactly.

    The backbone and class count are inferred from keys and shapes; DDP's ``module.`` prefix is accepted;
    frozen batch norm (no eps) or ordinary batch norm is chosen as the checkpoint was trained; the input
    normalisation is the public code's (ResNet: RGB [0, 1] ImageNet mean/std; VGG: BGR x 255 minus the Caffe
    mean). Every key must match in name and shape: anything else raises ValueError with the report.
    """
    name = source_name or (source if isinstance(source, str) else "<state dict>")
    ckpt = _read(source, trusted) if isinstance(source, str) else source
    if not is_public_checkpoint(ckpt):
        raise ValueError(f"{name}: not a public SDCA checkpoint (no 'feature_extractor' and 'classifier' entries)")
    fe, cls = _strip_module(ckpt["feature_extractor"]), _strip_module(ckpt["classifier"])
    arch, bn = infer_public_arch(fe)
    if "conv2d_list.0.weight" not in cls:
        raise ValueError(f"{name}: the classifier is not an ASPP head (no conv2d_list.0.weight)")
    k = int(cls["conv2d_list.0.weight"].shape[0])
    if num_classes is not None and k != num_classes:
        raise ValueError(f"{name}: the checkpoint predicts {k} classes, expected {num_classes}")
    # Every public release was evaluated on 1024x512 inputs (Cityscapes and Cross-City frames resized, as its
    # test script does): recorded, so that an export of it carries a serving size like our own checkpoints.
    model = build_model(arch, k, bn=bn, class_names=class_names, train_size=(1024, 512),
                        normalization=CAFFE_BGR if arch == "deeplabv2_vgg16" else IMAGENET)
    incoming = {**fe, **{f"classifier.{key}": v for key, v in cls.items()}}
    report = LoadReport(source=name)
    _compare(model.state_dict(), incoming, report)
    if not report.ok:
        raise ValueError(f"{name}: does not match {arch} with {k} classes:\n{report}")
    model.load_state_dict(incoming, strict=True)
    return model, report
