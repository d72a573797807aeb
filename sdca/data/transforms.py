"""Paired transforms: the same random geometry for an image and its label; photometric ones on the image only.

A sample is a dict with ``image`` (uint8 [H, W, 3] array or float tensor [3, H, W]) and optionally ``label``
([H, W] integer array or long tensor). Labels are resized with nearest neighbour and padded with the ignore id.
"""
from __future__ import annotations

import random
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import v2

from .labels import IGNORE_INDEX


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, sample: dict) -> dict:
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class ToTensor:
    """uint8 [H, W, 3] -> float [3, H, W] in [0, 1]; label -> int64 [H, W]."""

    def __call__(self, sample: dict) -> dict:
        image = sample["image"]
        if isinstance(image, np.ndarray):
            sample["image"] = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
        if "label" in sample and isinstance(sample["label"], np.ndarray):
            sample["label"] = torch.from_numpy(sample["label"].astype(np.int64))
        return sample


RESIZE_MODES = ("bilinear", "bicubic")


def resize_image(image: torch.Tensor, size_hw: Tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """[..., 3, H, W] float in [0, 1] to ``size_hw``, antialiased. ``bicubic`` is PIL's bicubic (the public code
    resizes with PIL): torch's antialiased bicubic uses the same a = -0.5 kernel, widened when shrinking."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    batched = image if image.dim() == 4 else image[None]
    out = F.interpolate(batched, size=tuple(size_hw), mode=mode, align_corners=False, antialias=True).clamp_(0, 1)
    return out if image.dim() == 4 else out[0]


def _resize(sample: dict, size_hw: Tuple[int, int], mode: str = "bilinear") -> dict:
    h, w = size_hw
    sample["image"] = resize_image(sample["image"], (h, w), mode)
    if "label" in sample:
        label = sample["label"][None, None].float()
        sample["label"] = F.interpolate(label, size=(h, w), mode="nearest")[0, 0].long()
    return sample


class Resize:
    """Resize to ``size`` = (width, height), as the public configs give sizes."""

    def __init__(self, size: Sequence[int], mode: str = "bilinear"):
        self.size = (int(size[0]), int(size[1]))
        self.mode = mode

    def __call__(self, sample: dict) -> dict:
        w, h = self.size
        if tuple(sample["image"].shape[-2:]) == (h, w):
            return sample
        return _resize(sample, (h, w), self.mode)

    def __repr__(self) -> str:
        return f"Resize({self.size}, {self.mode})"


class RandomScale:
    """Scale both by a factor drawn uniformly from ``scale`` = (low, high), of whatever size the image has
    (the raw file's, when no Resize precedes)."""

    def __init__(self, scale: Tuple[float, float] = (0.5, 1.5), mode: str = "bilinear"):
        self.scale = scale
        self.mode = mode

    def __call__(self, sample: dict) -> dict:
        f = random.uniform(*self.scale)
        h, w = sample["image"].shape[-2:]
        return _resize(sample, (max(1, round(h * f)), max(1, round(w * f))), self.mode)


class RandomCrop:
    """Crop ``size`` = (width, height) at a random position, padding (image 0, label ignore) if smaller."""

    def __init__(self, size: Sequence[int], ignore_index: int = IGNORE_INDEX):
        self.size = (int(size[0]), int(size[1]))
        self.ignore_index = ignore_index

    def __call__(self, sample: dict) -> dict:
        w, h = self.size
        image = sample["image"]
        ih, iw = image.shape[-2:]
        pad_h, pad_w = max(0, h - ih), max(0, w - iw)
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            if "label" in sample:
                sample["label"] = F.pad(sample["label"], (0, pad_w, 0, pad_h), value=self.ignore_index)
            ih, iw = image.shape[-2:]
        top, left = random.randint(0, ih - h), random.randint(0, iw - w)
        sample["image"] = image[:, top:top + h, left:left + w]
        if "label" in sample:
            sample["label"] = sample["label"][top:top + h, left:left + w]
        return sample


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, sample: dict) -> dict:
        if random.random() < self.p:
            sample["image"] = sample["image"].flip(-1)
            if "label" in sample:
                sample["label"] = sample["label"].flip(-1)
        return sample


class ColorJitter:
    """Brightness, contrast, saturation, hue jitter on the image (the public source policy: .5, .5, .5, .2)."""

    def __init__(self, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.2, p: float = 1.0):
        self.jitter = v2.ColorJitter(brightness, contrast, saturation, hue)
        self.p = p

    def __call__(self, sample: dict) -> dict:
        if random.random() < self.p:
            sample["image"] = self.jitter(sample["image"]).clamp_(0, 1)
        return sample


class RandomGrayscale:
    def __init__(self, p: float = 0.2):
        self.p = p

    def __call__(self, sample: dict) -> dict:
        if random.random() < self.p:
            sample["image"] = TF.rgb_to_grayscale(sample["image"], num_output_channels=3)
        return sample


class GaussianBlur:
    """Blur with a ``kernel_size`` kernel and sigma ~ U(sigma) (the public policy: 3, (0.1, 2.0), always)."""

    def __init__(self, kernel_size: int = 3, sigma: Tuple[float, float] = (0.1, 2.0), p: float = 1.0):
        self.kernel_size, self.sigma, self.p = kernel_size, sigma, p

    def __call__(self, sample: dict) -> dict:
        if random.random() < self.p:
            s = random.uniform(*self.sigma)
            sample["image"] = TF.gaussian_blur(sample["image"], [self.kernel_size] * 2, [s, s])
        return sample


def build_transform(size: Optional[Sequence[int]] = None, *, scale: Optional[Tuple[float, float]] = None,
                    crop: Optional[Sequence[int]] = None, flip: bool = False, jitter: bool = False,
                    grayscale: float = 0.0, blur: bool = False, resize: str = "bilinear") -> Compose:
    """The public configs' pipeline, as options: resize (width, height), random scale (of the resized image, or
    of the raw one when ``size`` is None), crop, flip, colour jitter, random grayscale, Gaussian blur; images
    resized with ``resize`` (bilinear | bicubic), labels with nearest neighbour."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    steps = [ToTensor()]
    if size is not None:
        steps.append(Resize(size, resize))
    if scale is not None:
        steps.append(RandomScale(scale, resize))
    if crop is not None:
        steps.append(RandomCrop(crop))
    if flip:
        steps.append(RandomHorizontalFlip())
    if jitter:
        steps.append(ColorJitter())
    if grayscale > 0:
        steps.append(RandomGrayscale(grayscale))
    if blur:
        steps.append(GaussianBlur())
    return Compose(steps)
