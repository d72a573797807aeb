"""Segmenters behind one interface: ONNX Runtime (no torch needed) or PyTorch (a checkpoint).

``segmenter.predict(frames)`` takes uint8 RGB frames [B, H, W, 3] of one size and returns uint8 labels
[B, H, W] and, when asked, float32 confidences [B, H, W] (the max softmax probability).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from .metadata import DeployInfo

PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
                    "coreml": "CoreMLExecutionProvider", "dml": "DmlExecutionProvider"}


def resolve_providers(requested: Optional[Sequence[str]], device: str = "auto") -> List[str]:
    """Explicit providers in priority order; a requested provider that is not installed is an error."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        names = [PROVIDER_ALIASES.get(p.lower(), p) for p in requested]
    elif device.startswith("cuda"):
        names = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    elif device == "cpu":
        names = ["CPUExecutionProvider"]
    else:  # auto: the GPU when onnxruntime-gpu brought one, else the CPU, said out loud by the caller
        names = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"ONNX Runtime provider(s) {', '.join(missing)} not available (installed: "
                         f"{', '.join(available)}); install onnxruntime-gpu (pip install 'sdca[gpu]') for CUDA "
                         "and TensorRT")
    return names


def preprocess(frames: np.ndarray, info: DeployInfo) -> np.ndarray:
    """uint8 RGB [B, H, W, 3] -> the model's float32 input [B, 3, H, W] (channel order, scale, mean, std)."""
    x = frames.astype(np.float32) / 255.0
    if info.channel_order == "BGR":
        x = x[..., ::-1]
    x = (x * info.scale - np.asarray(info.mean, np.float32)) / np.asarray(info.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _softmax_max(scores: np.ndarray, are_probs: bool) -> Tuple[np.ndarray, np.ndarray]:
    if are_probs:
        return scores.argmax(1).astype(np.uint8), scores.max(1)
    shifted = scores - scores.max(1, keepdims=True)
    e = np.exp(shifted)
    probs_max = 1.0 / e.sum(1)  # the max logit's exp is 1 after the shift
    return scores.argmax(1).astype(np.uint8), probs_max


class OnnxSegmenter:
    backend = "onnxruntime"

    def __init__(self, path: str, providers: Optional[Sequence[str]] = None, device: str = "auto",
                 threads: int = 0):
        import onnxruntime as ort

        from .metadata import read_onnx_metadata

        self.info = read_onnx_metadata(path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        names = resolve_providers(providers, device)
        provider_options = [{"cudnn_conv_algo_search": "HEURISTIC"} if n == "CUDAExecutionProvider" else {}
                            for n in names]  # EXHAUSTIVE re-tunes for every new frame size
        self.session = ort.InferenceSession(path, options, providers=names, provider_options=provider_options)
        self.providers = self.session.get_providers()
        inp = self.session.get_inputs()[0]
        if len(inp.shape) != 4 or inp.shape[1] != 3:
            raise ValueError(f"{path}: the model takes input of shape {inp.shape}; sdca infer feeds RGB frames "
                             "[B, 3, H, W]")
        self.input_name = inp.name

    def predict(self, frames: np.ndarray, confidence: bool = False):
        out = self.session.run(None, {self.input_name: preprocess(frames, self.info)})[0]
        if self.info.output == "labels":
            if confidence:
                raise ValueError("this model was exported with in-graph argmax (--output labels): it has no "
                                 "confidences; export with --output logits or probs for --confidence")
            return out.astype(np.uint8), None
        if not confidence:  # the argmax alone: no softmax over K planes of the frame
            return out.argmax(1).astype(np.uint8), None
        labels, conf = _softmax_max(out.astype(np.float32), self.info.output == "probs")
        return labels, conf


class TorchSegmenter:
    backend = "pytorch"

    def __init__(self, checkpoint: str, device: str = "auto"):
        import torch

        from ..engine.builders import resolve_device
        from ..models import load_model
        from .onnx_export import deploy_info

        self.torch = torch
        self.device = resolve_device(device)
        self.model = load_model(checkpoint, device=self.device)
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
                   threads: int = 0):
    """An .onnx file -> ONNX Runtime; anything else (a checkpoint) -> PyTorch; ``backend`` overrides."""
    backend = backend or ("onnxruntime" if model.lower().endswith(".onnx") else "pytorch")
    if backend == "onnxruntime":
        return OnnxSegmenter(model, providers, device, threads)
    if backend == "pytorch":
        if providers:
            raise ValueError("--providers applies to the onnxruntime backend only")
        return TorchSegmenter(model, device)
    raise ValueError(f"backend must be onnxruntime or pytorch, got {backend!r}")
