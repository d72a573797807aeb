"""Paired transforms: the same random geometry for an image and its label; photometric ones on the image only.

A sample is a dict with ``image`` (uint8 [H, W, 3] array, then a float [3, H, W] tensor in [0, 1], or with
``uint8=True`` a uint8 [3, H, W] tensor) and optionally ``label`` ([H, W] integer array or long tensor). Labels
are resized with nearest neighbour and padded with the ignore id.

The uint8 pipeline (``build_transform(..., uint8=True)``) is for feeding a GPU: resizing a 1280x720 frame in
uint8 is several times cheaper than converting it to float first (``bench/bench_loader.py``), the batch crosses
to the device at a quarter of the bytes, and the photometric augmentations are only *drawn* in the worker (with
the same random calls as the float pipeline, so a sample's draw does not depend on the pipeline) and applied on
the device by :func:`finish_images`, where they cost a fraction of a worker's time.
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
    def __init__(self, transforms, defer_photometric: bool = False):
        self.transforms = list(transforms)
        self.defer_photometric = defer_photometric

    def __call__(self, sample: dict) -> dict:
        if self.defer_photometric:
            sample["photometric"] = []  # the photometric transforms record their draws here (see finish_images)
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class ToTensor:
    """uint8 [H, W, 3] -> float [3, H, W] in [0, 1] (``uint8=True``: uint8 [3, H, W]); label -> int64 [H, W]."""

    def __init__(self, uint8: bool = False):
        self.uint8 = uint8

    def __call__(self, sample: dict) -> dict:
        image = sample["image"]
        if isinstance(image, np.ndarray):
            chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
            sample["image"] = chw.contiguous() if self.uint8 else chw.float().div_(255)
        if "label" in sample and isinstance(sample["label"], np.ndarray):
            sample["label"] = torch.from_numpy(sample["label"].astype(np.int64))
        return sample


RESIZE_MODES = ("bilinear", "bicubic")


def resize_image(image: torch.Tensor, size_hw: Tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """[..., 3, H, W] float in [0, 1] (or uint8) to ``size_hw``, antialiased. ``bicubic`` is PIL's bicubic (the
    public code resizes with PIL): torch's antialiased bicubic uses the same a = -0.5 kernel, widened when
    shrinking. uint8 goes through torch's uint8 kernels (rounded and saturated to 0..255 there)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    batched = image if image.dim() == 4 else image[None]
    out = F.interpolate(batched, size=tuple(size_hw), mode=mode, align_corners=False, antialias=True)
    if out.is_floating_point():
        out = out.clamp_(0, 1)
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


class Photometric:
    """An image-only augmentation split in two: ``draw`` (the random part, in the worker) and ``apply`` (a pure
    function of the image and the draw). Applied at once in the float pipeline; recorded in
    ``sample["photometric"]`` for :func:`finish_images` when the pipeline defers them."""

    kind = ""

    def draw(self, image):
        raise NotImplementedError

    @staticmethod
    def apply(image: torch.Tensor, params) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, sample: dict) -> dict:
        params = self.draw(sample["image"])
        if params is None:
            return sample
        if "photometric" in sample:
            sample["photometric"].append((self.kind, params))
        else:
            sample["image"] = self.apply(sample["image"], params)
        return sample


_JITTER_KERNELS = v2.ColorJitter()  # only its transform(image, params) is used: the factors come with params


class ColorJitter(Photometric):
    """Brightness, contrast, saturation, hue jitter on the image (the public source policy: .5, .5, .5, .2)."""

    kind = "jitter"

    def __init__(self, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.2, p: float = 1.0):
        self.jitter = v2.ColorJitter(brightness, contrast, saturation, hue)
        self.p = p

    def draw(self, image):
        if random.random() >= self.p:
            return None
        params = self.jitter.make_params([image])  # torchvision's own draw: the order and the four factors
        return dict(params, fn_idx=params["fn_idx"].tolist())

    @staticmethod
    def apply(image, params):
        return _JITTER_KERNELS.transform(image, params).clamp_(0, 1)


class RandomGrayscale(Photometric):
    kind = "gray"

    def __init__(self, p: float = 0.2):
        self.p = p

    def draw(self, image):
        return True if random.random() < self.p else None

    @staticmethod
    def apply(image, params):
        return TF.rgb_to_grayscale(image, num_output_channels=3)


class GaussianBlur(Photometric):
    """Blur with a ``kernel_size`` kernel and sigma ~ U(sigma) (the public policy: 3, (0.1, 2.0), always)."""

    kind = "blur"

    def __init__(self, kernel_size: int = 3, sigma: Tuple[float, float] = (0.1, 2.0), p: float = 1.0):
        self.kernel_size, self.sigma, self.p = kernel_size, sigma, p

    def draw(self, image):
        if random.random() >= self.p:
            return None
        return (self.kernel_size, random.uniform(*self.sigma))

    @staticmethod
    def apply(image, params):
        k, s = params
        return TF.gaussian_blur(image, [k, k], [s, s])


PHOTOMETRIC = {t.kind: t.apply for t in (ColorJitter, RandomGrayscale, GaussianBlur)}


def finish_images(images: torch.Tensor, photometric=None) -> torch.Tensor:
    """A batch as the model's normalisation expects it: float in [0, 1], with each sample's deferred
    photometric draws (``batch["photometric"]``, from the uint8 pipeline) applied in their order. Call it on the
    device the batch was moved to; a float batch without draws passes through."""
    x = images.float().div_(255) if images.dtype == torch.uint8 else images
    if photometric and any(photometric):
        out = []
        for image, draws in zip(x, photometric):
            for kind, params in draws:
                image = PHOTOMETRIC[kind](image, params)
            out.append(image)
        x = torch.stack(out)
    return x


def build_transform(size: Optional[Sequence[int]] = None, *, scale: Optional[Tuple[float, float]] = None,
                    crop: Optional[Sequence[int]] = None, flip: bool = False, jitter: bool = False,
                    grayscale: float = 0.0, blur: bool = False, resize: str = "bilinear",
                    uint8: bool = False) -> Compose:
    """The public configs' pipeline, as options: resize (width, height), random scale (of the resized image, or
    of the raw one when ``size`` is None), crop, flip, colour jitter, random grayscale, Gaussian blur; images
    resized with ``resize`` (bilinear | bicubic), labels with nearest neighbour. ``uint8``: the pipeline that
    feeds a GPU (module docstring): uint8 images out, photometric draws deferred to :func:`finish_images`."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    steps = [ToTensor(uint8)]
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
    return Compose(steps, defer_photometric=uint8)
