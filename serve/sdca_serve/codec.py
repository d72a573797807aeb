"""Request bodies to frames and label maps to response bodies, with the limits a public endpoint needs.

Every rejection is a :class:`RequestError` with the HTTP status to answer: 413 for a body over the size limit,
415 for a content type that is not an image, 422 for bytes that are not a decodable image or an image whose
dimensions are out of bounds (checked from the header, before any pixel is decoded).
"""
from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/bmp", "image/webp", "image/tiff",
               "image/x-portable-pixmap", "application/octet-stream")
FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "TIFF", "PPM")
OUTPUTS = ("labels", "color", "json")


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 20 * 2**20
    max_side: int = 8192
    min_side: int = 16
    max_pixels: int = 40_000_000


def parse_size(text: str) -> Tuple[int, int]:
    """'512x256' -> (512, 256); ValueError otherwise. Shared by `sdca_serve --size` and `sdca export --static-size`."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must look like 512x256, got {text!r}") from None
    return width, height


def check_content_type(content_type: Optional[str]) -> None:
    kind = (content_type or "application/octet-stream").split(";")[0].strip().lower()
    if kind not in IMAGE_TYPES:
        raise RequestError(415, f"content type {kind!r} is not an image: send the encoded image as the body with "
                                "Content-Type image/png or image/jpeg (curl -H 'Content-Type: image/png' "
                                "--data-binary @frame.png ...)")


def decode_image(body: bytes, limits: Limits) -> np.ndarray:
    """Encoded image bytes -> uint8 RGB [H, W, 3]."""
    from PIL import Image, UnidentifiedImageError

    if not body:
        raise RequestError(422, "empty body: send an encoded image (PNG, JPEG, ...)")
    try:
        image = Image.open(io.BytesIO(body))  # reads the header only
    except Image.DecompressionBombError:  # Pillow's own guard, at twice its pixel limit: ours is stricter anyway
        raise RequestError(422, f"image dimensions are over the limit of {limits.max_side} pixels a side and "
                                f"{limits.max_pixels} pixels in all") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error):
        raise RequestError(422, "the body is not an image format this service reads (PNG, JPEG, BMP, WebP, TIFF, "
                                "PPM)") from None
    if image.format not in FORMATS:
        raise RequestError(422, f"image format {image.format} is not accepted (use one of {', '.join(FORMATS)})")
    width, height = image.size
    if min(width, height) < limits.min_side:
        raise RequestError(422, f"image is {width}x{height}: both sides must be at least {limits.min_side} pixels")
    if max(width, height) > limits.max_side or width * height > limits.max_pixels:
        raise RequestError(422, f"image is {width}x{height}: at most {limits.max_side} pixels a side and "
                                f"{limits.max_pixels} pixels in all")
    try:
        image.load()  # a truncated or corrupt stream fails here
        rgb = image.convert("RGB")
    except Exception as exc:
        raise RequestError(422, f"the image could not be decoded ({type(exc).__name__}: {exc})") from None
    return np.asarray(rgb, dtype=np.uint8)


def resize_rgb(frame: np.ndarray, size: Optional[Tuple[int, int]]) -> np.ndarray:
    """Bilinear resize of an RGB frame to (width, height); unchanged when already that size or size is None."""
    from PIL import Image

    if size is None or (frame.shape[1], frame.shape[0]) == tuple(size):
        return frame
    return np.asarray(Image.fromarray(frame).resize(tuple(size), Image.BILINEAR), dtype=np.uint8)


def resize_labels(labels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour resize of a label map (no label is invented between two classes)."""
    from PIL import Image

    if labels.shape == (height, width):
        return labels
    return np.asarray(Image.fromarray(labels).resize((width, height), Image.NEAREST), dtype=np.uint8)


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)  # speed over bytes: served, not stored
    return buffer.getvalue()


def encode(labels: np.ndarray, output: str, class_names: Sequence[str], palette: Sequence[Sequence[int]]):
    """(body, media type) for a uint8 label map [H, W]: a label PNG, a colour PNG or JSON class shares."""
    if output == "labels":
        return _png(labels), "image/png"
    if output == "color":
        table = np.zeros((256, 3), dtype=np.uint8)
        table[:len(palette)] = np.asarray(palette, dtype=np.uint8)
        return _png(table[labels]), "image/png"
    if output == "json":
        counts = np.bincount(labels.ravel(), minlength=len(class_names))
        total = float(labels.size)
        shares = {class_names[k]: round(counts[k] / total, 6) for k in np.flatnonzero(counts[:len(class_names)])}
        return json.dumps({"width": int(labels.shape[1]), "height": int(labels.shape[0]), "shares": shares}).encode(), \
            "application/json"
    raise RequestError(422, f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
