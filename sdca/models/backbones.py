"""Dilated backbones at output stride 8, with the public SDCA code's module names (so its keys load as is)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torchvision

from .layers import norm_layer


class ResNetBackbone(nn.Module):
    """torchvision's ResNet-50/101 with layer3 and layer4 dilated (2, 4) and no pooling head.

    Children are named as in torchvision (conv1, bn1, layer1..layer4), which is also how the public code's
    IntermediateLayerGetter names them, so both torchvision ImageNet weights and public SDCA checkpoints load
    by key.
    """

    def __init__(self, depth: int, bn: str = "frozen"):
        super().__init__()
        builders = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}
        if depth not in builders:
            raise ValueError(f"ResNet depth must be one of {sorted(builders)}, got {depth}")
        net = builders[depth](weights=None, replace_stride_with_dilation=[False, True, True], norm_layer=norm_layer(bn))
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels = 2048

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class _BasicBlock(nn.Module):
    """ResNet basic block that, unlike torchvision's, accepts dilation."""

    def __init__(self, cin: int, cout: int, stride: int, dilation: int, bn: str):
        super().__init__()
        make_norm = norm_layer(bn)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = make_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = make_norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), make_norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class SmallResNetBackbone(nn.Module):
    """A width-reduced ResNet-18 layout, dilated to stride 8: small enough to train on a laptop CPU in minutes.

    Feature dimension is 8 x ``width`` (128 at the default width 16).
    """

    def __init__(self, width: int = 16, blocks: Sequence[int] = (2, 2, 2, 2), bn: str = "frozen"):
        super().__init__()
        make_norm = norm_layer(bn)
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = make_norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [width, 2 * width, 4 * width, 8 * width]
        strides, dilations = [1, 2, 1, 1], [1, 1, 2, 4]
        layers, cin = [], width
        for cout, n, s, d in zip(widths, blocks, strides, dilations):
            layers.append(nn.Sequential(*[_BasicBlock(cin if i == 0 else cout, cout, s if i == 0 else 1, d, bn)
                                          for i in range(n)]))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.out_channels = widths[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


# VGG-16 conv layers (out channels; "M" = 2x2 max pool), as DeepLab-LargeFOV keeps them: pool4 and pool5 removed,
# conv5 dilated by 2, then fc6 and fc7 as 3x3 convolutions dilated by 4 with 1024 channels.
_VGG16_PLAN = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, 512, 512, 512]


class VGG16Backbone(nn.Sequential):
    """DeepLab-LargeFOV VGG-16 at stride 8; module indices match the public code (fc6 = 29, fc7 = 31)."""

    def __init__(self):
        layers, cin = [], 3
        for i, v in enumerate(_VGG16_PLAN):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            dilation = 2 if i >= 13 else 1  # conv5_1..conv5_3
            layers += [nn.Conv2d(cin, v, 3, padding=dilation, dilation=dilation), nn.ReLU(inplace=True)]
            cin = v
        layers += [nn.Conv2d(512, 1024, 3, padding=4, dilation=4), nn.ReLU(inplace=True),
                   nn.Conv2d(1024, 1024, 3, padding=4, dilation=4), nn.ReLU(inplace=True)]
        super().__init__(*layers)
        self.out_channels = 1024


# torchvision vgg16 `features.<i>` index -> ours (pool4 at 23 and pool5 at 30 are gone).
VGG16_TORCHVISION_INDEX = {i: i for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21)} | {24: 23, 26: 25, 28: 27}
