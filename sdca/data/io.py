"""Reading images and label maps with errors that name the file; atomic PNG writes."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from .._atomic import atomic_write
from .frames import IMAGE_EXTENSIONS  # noqa: F401 (re-exported: the data sets' extension list)


class CorruptImageError(ValueError):
    """An image or label file that cannot be decoded (truncated, empty, not an image)."""


def read_rgb(path: str) -> np.ndarray:
    """[H, W, 3] uint8 RGB. Raises FileNotFoundError or CorruptImageError naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()  # decodes fully, so truncation is caught here and not in a worker later
            return np.array(im.convert("RGB"))  # a writable copy: tensors are made from it
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise CorruptImageError(f"cannot decode image {path}: {exc}") from None


def read_label(path: str) -> np.ndarray:
    """A single-channel label PNG as [H, W] integers (8- or 16-bit, or palette indices)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"label not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGB", "RGBA"):
                raise CorruptImageError(f"label {path} has colour channels (mode {im.mode}); expected one channel "
                                        "of class ids (use a colour mapping for colour-coded labels)")
            return np.array(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise CorruptImageError(f"cannot decode label {path}: {exc}") from None


def read_color_label(path: str) -> np.ndarray:
    """[H, W, 3] uint8 colours of a colour-coded label image."""
    return read_rgb(path)


def read_png16_first_channel(path: str) -> np.ndarray:
    """The first (R) channel of a 16-bit PNG at full depth, as SYNTHIA stores class ids.

    Pillow reduces 16-bit colour PNGs to 8 bits, so OpenCV reads these (it returns BGR: R is the last).
    """
    import cv2

    if not os.path.isfile(path):
        raise FileNotFoundError(f"label not found: {path}")
    arr = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise CorruptImageError(f"cannot decode label {path}")
    return arr if arr.ndim == 2 else arr[..., 2]


def write_png(path: str, array: np.ndarray, palette=None) -> None:
    """Write a PNG atomically (temp file + rename); ``palette`` makes a 'P'-mode image of class ids."""
    image = Image.fromarray(array)
    if palette is not None:
        # putpalette turns an 'L' image into 'P' keeping every index (convert("P") would re-quantise).
        flat = [v for colour in palette for v in colour]
        image.putpalette(flat + [0] * (768 - len(flat)))
    atomic_write(path, lambda f: image.save(f, format="PNG"))
