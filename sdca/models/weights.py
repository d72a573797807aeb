"""Weight import: torchvision ImageNet backbones and the public SDCA release checkpoints, with a report."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .backbones import VGG16_TORCHVISION_INDEX
from .deeplab import CAFFE_BGR, IMAGENET, DeepLabV2


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


def _read(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise ValueError(f"{path}: not a readable PyTorch weight file ({type(exc).__name__}: {exc})") from None


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


def load_torchvision_weights(model: DeepLabV2, path: str) -> LoadReport:
    """Load an ImageNet file (torchvision resnet101-*.pth, resnet50-*.pth, vgg16-*.pth, or the Caffe-converted
    vgg16-00b39a1b.pth the public VGG code uses) into the backbone.

    The classification head (fc / classifier) is ignored. For VGG-16, fc6 and fc7 of DeepLab-LargeFOV have
    no ImageNet counterpart and keep their random initialisation, as in the public code, and the model takes
    the input convention of the file (:func:`vgg16_convention`): BGR x 255 minus the Caffe mean for the
    Caffe-converted weights, RGB with ImageNet mean/std for torchvision's. Raises ValueError with the key-by-key
    report when anything else is missing, unexpected or of the wrong shape.
    """
    state = _read(path)
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
                             source_name: Optional[str] = None) -> Tuple[DeepLabV2, LoadReport]:
    """Build our model from a public SDCA checkpoint (``{'feature_extractor', 'classifier', ...}``), exactly.

    The backbone and class count are inferred from keys and shapes; DDP's ``module.`` prefix is accepted;
    frozen batch norm (no eps) or ordinary batch norm is chosen as the checkpoint was trained; the input
    normalisation is the public code's (ResNet: RGB [0, 1] ImageNet mean/std; VGG: BGR x 255 minus the Caffe
    mean). Every key must match in name and shape: anything else raises ValueError with the report.
    """
    from .registry import build_model

    name = source_name or (source if isinstance(source, str) else "<state dict>")
    ckpt = _read(source) if isinstance(source, str) else source
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
