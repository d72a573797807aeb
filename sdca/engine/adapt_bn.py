"""`sdca adapt-bn`: re-estimate a checkpoint's batch-norm statistics on unlabelled target frames (AdaBN).

On SynthDrive this one pass over target frames gave most of the measured gain of adaptation (docs/results.md). It needs
no labels, no source data and no training: a robot team can run it on a folder of its own camera frames.
Models trained with frozen batch norm are converted to ordinary batch norm for the pass and back afterwards,
so the checkpoint keeps its mode; a model without batch norm (VGG-16) is refused.
"""
from __future__ import annotations

import os
import random
from typing import List, Optional, Sequence, Tuple

from torch import nn

from ..data import ImageFolder, build_transform
from ..models import FrozenBatchNorm2d, read_checkpoint, save_checkpoint, set_batchnorm_mode
from ..models.checkpoint import FORMAT, model_from_checkpoint
from .batchnorm import recompute_batchnorm

# What holds running statistics: trainable batch norm and the frozen kind (statistics as buffers).
_BATCHNORMS = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BATCHNORMS) for m in model.modules())


def adapt_batchnorm(checkpoint: str, frames: Sequence[str], out: str, *, max_frames: int = 500,
                    size: Optional[Tuple[int, int]] = None, batch_size: int = 4, seed: int = 0,
                    device: str = "cpu", progress: bool = True, trusted: bool = False) -> dict:
    """Write ``out``: ``checkpoint`` with every batch norm's running statistics re-estimated on ``frames``
    (at most ``max_frames``, a fixed random subset; brought to ``size`` or the model's training size).

    Returns a summary (frames used, unreadable ones, batch-norm layers, mode). Batches must hold more than one
    frame for the statistics to mean anything: ``batch_size`` >= 2. ``trusted``: read ``checkpoint`` with full
    unpickling (see :func:`sdca.models.read_checkpoint`).
    """
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (batch statistics of one frame are its own), got {batch_size}")
    if not frames:
        raise ValueError("adapt-bn needs target frames; none were given")
    source = read_checkpoint(checkpoint, trusted=trusted)
    model = model_from_checkpoint(source, checkpoint)
    if not has_batchnorm(model):
        raise ValueError(f"{checkpoint}: {model.info.arch} has no batch norm layers, so there are no statistics "
                         "to re-estimate (AdaBN applies to ResNet, Lite0 and the small model, not to VGG-16)")
    chosen: List[str] = list(frames)
    if len(chosen) > max_frames:
        chosen = sorted(random.Random(seed).sample(chosen, max_frames))
    size = tuple(size) if size else model.info.train_size
    if size is None:  # frames of different sizes cannot share a batch: the first frame's size for all
        from PIL import Image

        try:
            with Image.open(chosen[0]) as im:
                size = im.size
        except (OSError, ValueError, SyntaxError) as exc:
            raise ValueError(f"{chosen[0]}: cannot be read ({exc}); give the frame size (--size WxH)") from None
    frozen = any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    if frozen:
        model = set_batchnorm_mode(model, "train")
    dataset = ImageFolder.from_files(chosen, transform=build_transform(size=size))
    model.to(device)
    batches = recompute_batchnorm(model, dataset, device=device, batch_size=min(batch_size, len(chosen)),
                                  progress=progress)
    if batches == 0:
        raise ValueError(f"none of the {len(chosen)} frames could be read (e.g. {chosen[0]})")
    if frozen:
        model = set_batchnorm_mode(model, "frozen")
    layers = sum(isinstance(m, _BATCHNORMS) for m in model.modules())
    keep = source if isinstance(source, dict) and source.get("format") == FORMAT else {}
    summary = {"frames": len(chosen), "batches": batches, "layers": layers, "batchnorm": model.info.bn,
               "size": list(size) if size else None, "source_checkpoint": os.path.abspath(checkpoint)}
    # The semantic statistics (if any) describe the source features and stay; training state does not carry over.
    save_checkpoint(out, model.cpu().eval(), config=keep.get("config"), statistics=keep.get("statistics"),
                    extra=dict(keep.get("extra") or {}, stage="adapt-bn", adapt_bn=summary))
    return summary
