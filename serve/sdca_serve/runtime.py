"""An exported model in ONNX Runtime: preprocessing from its metadata, labels and confidences out. No torch.

``segmenter.predict(frames)`` takes uint8 RGB frames [B, H, W, 3] of one size and returns uint8 labels
[B, H, W] and, when asked, float32 confidences [B, H, W] (the max softmax probability). sdca.deploy puts a
PyTorch segmenter with the same interface beside it.
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
                         f"{', '.join(available)}); install onnxruntime-gpu for CUDA and TensorRT")
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

        from .metadata import session_metadata

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        names = resolve_providers(providers, device)
        provider_options = [{"cudnn_conv_algo_search": "HEURISTIC"} if n == "CUDAExecutionProvider" else {}
                            for n in names]  # EXHAUSTIVE re-tunes for every new frame size
        self.session = ort.InferenceSession(path, options, providers=names, provider_options=provider_options)
        self.providers = self.session.get_providers()
        self.info = session_metadata(self.session, where=path)
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


PRECISIONS = ("f32", "bf16")


class OpenVinoSegmenter:
    """The same interface on OpenVINO's CPU plugin: the exported ONNX file read as it is (a QDQ-quantized export
    runs as INT8), the metadata and pre-processing of ONNX Runtime's path. ``precision``: f32, or bf16 (OpenVINO's
    inference precision hint) where the CPU reports BF16; an INT8 model is INT8 whatever the hint."""

    backend = "openvino"

    def __init__(self, path: str, precision: str = "f32", threads: int = 0):
        try:
            import openvino as ov
        except ImportError:
            raise ValueError("the openvino runtime needs the openvino package: pip install 'sdca[openvino]'") from None
        import onnxruntime as ort

        from .metadata import session_metadata

        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        core = ov.Core()
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise ValueError("this CPU does not report BF16 to OpenVINO: use --precision f32")
        try:
            model = core.read_model(path)
        except Exception as exc:
            raise ValueError(f"{path}: OpenVINO cannot read this model ({type(exc).__name__}: {exc})") from None
        # The metadata, read as ONNX Runtime reads it (OpenVINO does not keep ONNX metadata_props).
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.info = session_metadata(ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]),
                                     where=path)
        config = {"INFERENCE_PRECISION_HINT": precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.precision = precision
        self.providers = [f"openvino CPU ({precision})"]

    def predict(self, frames: np.ndarray, confidence: bool = False):
        out = self.request.infer({0: preprocess(frames, self.info)})[self.compiled.output(0)]
        if self.info.output == "labels":
            if confidence:
                raise ValueError("this model was exported with in-graph argmax (--output labels): it has no "
                                 "confidences; export with --output logits or probs for --confidence")
            return np.asarray(out).astype(np.uint8), None
        out = np.asarray(out)
        if not confidence:
            return out.argmax(1).astype(np.uint8), None
        return _softmax_max(out.astype(np.float32), self.info.output == "probs")


def open_runtime(model: str, runtime: str = "onnxruntime", providers=None, device: str = "auto", threads: int = 0,
                 precision: str = "f32"):
    """The segmenter of a runtime: ONNX Runtime (providers, device) or OpenVINO's CPU plugin (precision)."""
    if runtime == "openvino":
        return OpenVinoSegmenter(model, precision, threads)
    if runtime != "onnxruntime":
        raise ValueError(f"runtime must be onnxruntime or openvino, got {runtime!r}")
    if precision != "f32":
        raise ValueError("precision applies to the openvino runtime only")
    return OnnxSegmenter(model, providers, device, threads)
