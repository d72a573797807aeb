"""Module attributes imported on first use (PEP 562), so that light entry points (the CLI's --help, the ONNX
Runtime deployment path) do not pay for torch."""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Tuple


def lazy_exports(module_globals: dict, exports: Dict[str, str]) -> Tuple[Callable, Callable]:
    """(__getattr__, __dir__) for a module whose names in ``exports`` live in the named submodules."""
    name = module_globals["__name__"]

    def __getattr__(attr):
        if attr not in exports:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        value = getattr(importlib.import_module(exports[attr]), attr)
        module_globals[attr] = value
        return value

    def __dir__():
        return sorted(module_globals.get("__all__", exports))

    return __getattr__, __dir__
