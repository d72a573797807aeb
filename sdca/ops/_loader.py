"""Loads the compiled extension once, registers its autograd and fake kernels, and says which backends it brings."""
from __future__ import annotations

import functools
import warnings

_ERROR: str | None = None


@functools.lru_cache(maxsize=None)
def has_ops() -> bool:
    """True when ``sdca._C`` loaded and registered ``torch.ops.sdca``."""
    global _ERROR
    try:
        from sdca import _C  # noqa: F401  (importing registers the ops)
    except (ImportError, OSError) as exc:
        _ERROR = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            "sdca: the compiled extension sdca._C is not available "
            f"({_ERROR}); using the pure-PyTorch reference kernels, which are slower "
            "and use more memory. Rebuild with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    from . import _registrations  # noqa: F401  (autograd + fake kernels, only once the ops exist)
    return True


def extension_error() -> str | None:
    has_ops()
    return _ERROR


@functools.lru_cache(maxsize=None)
def backends() -> dict:
    """Which devices the extension has kernels for, e.g. ``{"extension": True, "devices": ("cpu", "cuda")}``."""
    if not has_ops():
        return {"extension": False, "devices": ()}
    from sdca import _C

    devices = ("cpu", "cuda") if _C.WITH_CUDA else ("cpu",)
    return {"extension": True, "devices": devices}
