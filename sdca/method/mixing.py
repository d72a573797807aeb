"""Class mixing (ClassMix, as DACS uses it) and DACS's strong augmentation of the mixed image.

Every random draw comes from a ``torch.Generator`` the caller owns, so a resumed run draws what an uninterrupted
one would."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

IGNORE = 255


def class_mix_masks(labels: torch.Tensor, generator: Optional[torch.Generator] = None,
                    ignore_index: int = IGNORE) -> torch.Tensor:
    """Per source label map [B, H, W]: half of the classes present (rounded up; ``ignore_index`` excluded), chosen
    at random; the mask [B, H, W] (bool) is 1 where the label is one of them."""
    if labels.dim() != 3:
        raise ValueError(f"labels must be [B, H, W], got shape {tuple(labels.shape)}")
    masks = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    for i in range(labels.shape[0]):
        classes = torch.unique(labels[i])
        classes = classes[classes != ignore_index]
        n = classes.numel()
        if n == 0:
            continue
        pick = torch.randperm(n, generator=generator)[: (n + 1) // 2].to(classes.device)
        masks[i] = torch.isin(labels[i], classes[pick])
    return masks


def mix(mask: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``source`` where the mask [B, H, W] is set, ``target`` elsewhere; images [B, C, H, W] or maps [B, H, W]."""
    if source.shape != target.shape:
        raise ValueError(f"class mixing needs source and target of one shape, got {tuple(source.shape)} and "
                         f"{tuple(target.shape)}: give both domains the same input size in this stage")
    m = mask if source.dim() == mask.dim() else mask.unsqueeze(1)
    return torch.where(m, source, target)


def mixed_targets(mask: torch.Tensor, source_labels: torch.Tensor, pseudo_labels: torch.Tensor,
                  pseudo_weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The mixed label (source label under the mask, pseudo-label elsewhere) and weight (1 under the mask, the
    pseudo-weight elsewhere)."""
    label = mix(mask, source_labels, pseudo_labels)
    weight = mix(mask, torch.ones_like(pseudo_weight), pseudo_weight)
    return label, weight


def blur_kernel_size(length: int) -> int:
    """DACS's kernel side for an image side: a tenth of it rounded up, less one when that is even (odd)."""
    k = math.ceil(0.1 * length)
    return k if k % 2 == 1 else k - 1


def strong_augment(images: torch.Tensor, generator: Optional[torch.Generator] = None, *,
                   jitter_strength: float = 0.2, jitter_skip: float = 0.2, blur: bool = True,
                   sigma: Tuple[float, float] = (0.15, 1.15)) -> torch.Tensor:
    """DACS's strong augmentation of images [B, 3, H, W] in [0, 1] (before normalisation), per image: colour
    jitter (brightness, contrast, saturation and hue, each factor drawn within ``jitter_strength``) unless a
    uniform draw falls below ``jitter_skip`` (DACS's ``color_jitter_p`` = 0.2: applied with probability 0.8),
    then, with probability 0.5, a Gaussian blur of σ ~ U(sigma) with a kernel a tenth of the image side."""
    import torchvision.transforms.v2.functional as TF

    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    s = float(jitter_strength)
    out = []
    for img in images:
        u = torch.rand(6, generator=generator).tolist()
        if u[0] >= jitter_skip and s > 0:
            img = TF.adjust_brightness(img, 1.0 + s * (2 * u[1] - 1))
            img = TF.adjust_contrast(img, 1.0 + s * (2 * u[2] - 1))
            img = TF.adjust_saturation(img, 1.0 + s * (2 * u[3] - 1))
            img = TF.adjust_hue(img, min(0.5, s) * (2 * u[4] - 1))
        b = torch.rand(2, generator=generator).tolist()
        if blur and b[0] > 0.5:
            sd = sigma[0] + (sigma[1] - sigma[0]) * b[1]
            img = TF.gaussian_blur(img, [blur_kernel_size(img.shape[-1]), blur_kernel_size(img.shape[-2])], [sd, sd])
        out.append(img)
    return torch.stack(out).clamp_(0.0, 1.0)
