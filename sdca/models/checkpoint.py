"""Our checkpoint format, atomic writes, and load_model for every checkpoint kind we support."""
from __future__ import annotations

from typing import Any, Optional

import torch

from .._atomic import atomic_write
from .._version import __version__
from .deeplab import DeepLabV2, ModelInfo
from .public import import_public_checkpoint, is_public_checkpoint
from .registry import model_from_info
from .serialization import load_torch_file

FORMAT = "sdca-checkpoint"
# 2: the RNG state in plain types and tensors (format 1 held NumPy's state tuple, read through the allowed NumPy
# types); otherwise the same layout. Both are read.
FORMAT_VERSION = 2


def atomic_save(obj: Any, path: str) -> None:
    """torch.save, atomically (see sdca._atomic)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(path: str, model: DeepLabV2, *, config: Optional[dict] = None,
                    statistics: Optional[dict] = None, optimizer: Optional[dict] = None,
                    scheduler: Optional[dict] = None, step: Optional[int] = None, extra: Optional[dict] = None) -> None:
    """Weights + model info (classes, palette, normalisation) + resolved config + semantic statistics +
    optimizer / scheduler / step for resume, written atomically."""
    module = model.module if hasattr(model, "module") else model
    payload = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "sdca_version": __version__,
        "model": {"info": module.info.to_dict(), "state_dict": module.state_dict()},
        "config": config, "statistics": statistics, "optimizer": optimizer, "scheduler": scheduler,
        "step": step, "extra": extra or {},
    }
    atomic_save(payload, path)


def read_checkpoint(path: str, *, trusted: bool = False) -> dict:
    """The raw checkpoint dict of any supported kind, read as weights only (see :mod:`sdca.models.serialization`);
    a clear error for anything else. ``trusted=True`` lifts the refusal of files that name other Python
    objects, for a file the user knows."""
    return load_torch_file(path, trusted=trusted, what="checkpoint")


def load_model(path: str, *, num_classes: Optional[int] = None, device="cpu", trusted: bool = False) -> DeepLabV2:
    """A ready model in eval mode from our checkpoints or a public SDCA release file.

    The model carries ``model.info`` (class names, palette, input normalisation, training size).
    ``num_classes``, when given, must match the checkpoint. ``trusted``: see :func:`read_checkpoint`.
    """
    ckpt = read_checkpoint(path, trusted=trusted)
    return model_from_checkpoint(ckpt, path, num_classes=num_classes).to(device).eval()


def model_from_checkpoint(ckpt, path: str, *, num_classes: Optional[int] = None) -> DeepLabV2:
    """The model of a checkpoint already read (:func:`read_checkpoint`): for callers that also need its
    statistics or config, so that the file is read once. ``path`` names it in errors."""
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
        info = ModelInfo.from_dict(ckpt["model"]["info"])
        if num_classes is not None and info.num_classes != num_classes:
            raise ValueError(f"{path}: the checkpoint predicts {info.num_classes} classes, expected {num_classes}")
        model = model_from_info(info)
        try:
            model.load_state_dict(ckpt["model"]["state_dict"], strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{path}: weights do not match {info.arch}: {exc}") from None
    elif is_public_checkpoint(ckpt):
        model, _ = import_public_checkpoint(ckpt, num_classes=num_classes, source_name=path)
    else:
        kind = type(ckpt).__name__ if not isinstance(ckpt, dict) else f"dict with keys {sorted(ckpt)[:5]}"
        raise ValueError(f"{path}: neither an sdca checkpoint nor a public SDCA checkpoint ({kind})")
    return model
