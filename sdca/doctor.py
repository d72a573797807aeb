"""What this installation can do: versions, devices, live extension backends, ONNX Runtime providers."""
from __future__ import annotations

import importlib
import platform
import warnings


def _version(module: str):
    try:
        return importlib.import_module(module).__version__
    except Exception:  # any failure means "not usable", which is what doctor reports
        return None


def collect() -> dict:
    import torch

    from . import __version__, ops

    info = {
        "sdca": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "torchvision": _version("torchvision"),
        "numpy": _version("numpy"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime"),
        "cpu_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # doctor reports the reason itself
        backends = ops.backends()
    info["extension"] = backends["extension"]
    info["extension_devices"] = list(backends["devices"])
    info["extension_error"] = ops.extension_error()
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except Exception:
        info["onnxruntime_providers"] = []
    return info


def format_report(info: dict) -> str:
    ext = info["extension"]
    kernel = ("compiled extension for " + ", ".join(info["extension_devices"]) if ext
              else f"pure-PyTorch reference only ({info['extension_error']})")
    device = (f"cuda ({', '.join(info['cuda_devices'])})" if info["cuda_available"]
              else f"cpu ({info['cpu_threads']} threads)")
    rows = [
        ("sdca", info["sdca"]),
        ("python", f"{info['python']} on {info['platform']}"),
        ("torch", f"{info['torch']} (CUDA build {info['torch_cuda_build'] or 'none'})"),
        ("torchvision", info["torchvision"] or "not installed"),
        ("numpy", info["numpy"] or "not installed"),
        ("onnx", info["onnx"] or "not installed"),
        ("onnxruntime", (f"{info['onnxruntime']} (providers: {', '.join(info['onnxruntime_providers'])})"
                         if info["onnxruntime"] else "not installed")),
        ("torch device", device),
        ("SDCA kernels", kernel),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
