"""The one place sdca deserialises a PyTorch file: weights only, unless the user says they trust the file.

A ``.pt``/``.pth`` file is a pickle, and full unpickling calls whatever callable the file names, so a
downloaded checkpoint could run code the moment any command read it. Every read goes through
:func:`load_torch_file`, which uses PyTorch's restricted unpickler (``weights_only=True``): tensors, plain
containers and numbers, and nothing else but the few NumPy types named in :data:`ALLOWED_GLOBALS`, which
checkpoints of format 1 hold (``np.random.get_state()`` in the RNG state; format 2 stores it as plain types).
A file that asks for any other global is refused before anything from it runs, with an
:class:`UntrustedFileError` that names the file, what it asked for, and the way out (``trusted=True``,
``--trust-checkpoint``) for a file the user knows.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from typing import Any, List

import numpy as np
import torch

log = logging.getLogger("sdca")

TRUST_HINT = ("if you know where this file comes from and trust it, pass --trust-checkpoint (command line) or "
              "trusted=True (Python API)")

# Exactly what np.random.get_state()'s (MT19937 key: a uint32 array) pickle refers to, under NumPy 2's module
# names and NumPy 1's (a format-1 checkpoint written with NumPy 1 names numpy.core). An ndarray rebuilt this
# way holds data only; an object array's items still come through the restricted unpickler.
ALLOWED_GLOBALS: List[Any] = [
    (np._core.multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
    (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    np.dtypes.UInt32DType,
]
_ALLOWED_NAMES = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in ALLOWED_GLOBALS}


class UntrustedFileError(ValueError):
    """A file that could run code when read, refused unread. A ValueError, so that every command's error
    handling already turns it into a clear message and a non-zero exit."""

    def __init__(self, path: str, names: List[str], what: str = "checkpoint"):
        self.path, self.names = path, list(names)
        asked = ", ".join(self.names) if self.names else "a Python object that is not a tensor or plain container"
        super().__init__(
            f"{path}: refused: this {what} asks to build {asked}, and unpickling it could run code. sdca reads "
            f"checkpoints and weight files as tensors and plain containers only; {TRUST_HINT}")


def _unsafe_globals(path: str, message: str) -> List[str]:
    """What the file names beyond the allowed set, read off the pickle without running it (PyTorch's scanner,
    for the zip format) and from the global the restricted unpickler stopped at (any format)."""
    found = set(re.findall(r"unsupported (?:global: )?GLOBAL ([\w.]+)", message, flags=re.IGNORECASE))
    found.update(re.findall(r"but got <class '([\w.]+)'>", message))
    try:
        found.update(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        pass
    return sorted(found - _ALLOWED_NAMES)


def load_torch_file(path: str, *, trusted: bool = False, what: str = "checkpoint") -> Any:
    """``torch.load(path)`` onto the CPU with the restricted unpickler; ``trusted=True`` unpickles fully (for a
    file the user vouches for). Raises FileNotFoundError, UntrustedFileError, or ValueError for an unreadable
    file, each naming ``path``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    if trusted:
        log.warning("%s: loading with full unpickling (trusted by the user)", path)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ValueError(f"{path}: not a readable {what} ({type(exc).__name__}: {exc})") from None
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        names = _unsafe_globals(path, str(exc))
        if names:
            raise UntrustedFileError(path, names, what) from None
        raise ValueError(f"{path}: not a readable {what} (UnpicklingError: {exc})") from None
    except Exception as exc:
        raise ValueError(f"{path}: not a readable {what} ({type(exc).__name__}: {exc})") from None
