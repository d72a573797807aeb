"""Segmenters behind one interface: ONNX Runtime (sdca_serve.runtime, no torch) or PyTorch (a checkpoint)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from sdca_serve.runtime import OnnxSegmenter, open_runtime, preprocess, resolve_providers  # noqa: F401  (re-exported)


class TorchSegmenter:
    backend = "pytorch"

    def __init__(self, checkpoint: str, device: str = "auto", trusted: bool = False):
        import torch

        from ..device import resolve_device
        from ..models import load_model
        from .onnx_export import deploy_info

        self.torch = torch
        self.device = resolve_device(device)
        self.model = load_model(checkpoint, device=self.device, trusted=trusted)
        self.info = deploy_info(self.model, "logits", checkpoint)
        self.providers = [str(self.device)]

    def predict(self, frames: np.ndarray, confidence: bool = False):
        torch = self.torch
        from ..models import upsample_logits

        x = torch.from_numpy(preprocess(frames, self.info)).to(self.device)
        with torch.no_grad():
            logits = upsample_logits(self.model(x).logits.float(), x.shape[-2:])
            probs = torch.softmax(logits, 1)
            conf, labels = probs.max(1)
        return labels.to(torch.uint8).cpu().numpy(), (conf.cpu().numpy() if confidence else None)


def open_segmenter(model: str, backend: Optional[str] = None, *, providers=None, device: str = "auto",
                   threads: int = 0, trusted: bool = False, precision: str = "f32"):
    """An .onnx file -> ONNX Runtime; anything else (a checkpoint) -> PyTorch; ``backend`` overrides (openvino:
    OpenVINO's CPU plugin at ``precision`` f32 or bf16). ``trusted``: a checkpoint is read with full unpickling
    (see :func:`sdca.models.read_checkpoint`)."""
    backend = backend or ("onnxruntime" if model.lower().endswith(".onnx") else "pytorch")
    if backend == "openvino" and not model.lower().endswith(".onnx"):
        raise ValueError("the openvino backend runs exported .onnx models: export the checkpoint first")
    if backend in ("onnxruntime", "openvino"):
        return open_runtime(model, backend, providers, device, threads, precision)
    if precision != "f32":
        raise ValueError("--precision applies to the openvino backend only")
    if backend == "pytorch":
        if providers:
            raise ValueError("--providers applies to the onnxruntime backend only")
        return TorchSegmenter(model, device, trusted)
    raise ValueError(f"backend must be onnxruntime, openvino or pytorch, got {backend!r}")
