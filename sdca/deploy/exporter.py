"""`sdca export` as one call: the ONNX export (float, fp16 or INT8 behind its accuracy gate), a Triton model
repository and the side files robotics stacks read."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass
class Int8Options:
    calibration: Sequence[str]  # image files
    calib_frames: int = 200
    held_out_frames: int = 20
    method: str = "entropy"
    size: Optional[tuple] = None
    min_agreement: float = 0.98
    force: bool = False
    held_out: Optional[str] = None  # a folder or glob of held-out frames instead of the calibration set's rest
    activations: str = "auto"


def export_model(checkpoint: str, out: Optional[str], *, output: str = "logits", fp16: bool = False, opset: int = 18,
                 static_size=None, relu6=None, check: bool = True, trusted: bool = False,
                 int8: Optional[Int8Options] = None, triton_repo: Optional[str] = None, triton_name: str = "sdca",
                 max_batch: int = 8, sidecars: bool = True) -> dict:
    """Export ``checkpoint`` to ``out`` (None with ``triton_repo``: only the repository is written). Returns
    {"report": export_onnx's, "quant": quantize_int8's or None, "sidecars": {kind: path} or None,
    "triton": the model folder or None}."""
    from .onnx_export import export_onnx

    if static_size is not None and triton_repo is not None:
        raise ValueError("--triton needs the dynamic-batch export: drop --static-size")
    if int8 is not None and fp16:
        raise ValueError("--int8 and --fp16 exclude each other: INT8 quantizes the float32 export")
    target = out or os.path.join(tempfile.mkdtemp(prefix="sdca-export-"), "model.onnx")
    quant = None
    if int8 is not None:
        from .quantize import quantize_int8

        float_path = os.path.join(tempfile.mkdtemp(prefix="sdca-export-"), "float.onnx")
        report = export_onnx(checkpoint, float_path, output=output, opset=opset, check=check,
                             static_size=static_size, trusted=trusted, relu6=relu6)
        quant = quantize_int8(float_path, target, list(int8.calibration), calib_frames=int8.calib_frames,
                              held_out_frames=int8.held_out_frames, method=int8.method, size=int8.size,
                              min_agreement=int8.min_agreement, force=int8.force, held_out=int8.held_out,
                              activations=int8.activations)
        report["bytes"] = os.path.getsize(target)
    else:
        report = export_onnx(checkpoint, target, output=output, fp16=fp16, opset=opset, check=check,
                             static_size=static_size, trusted=trusted, relu6=relu6)
    folder = None
    if triton_repo is not None:
        from .triton import write_triton_repository

        folder = write_triton_repository(target, triton_repo, triton_name, max_batch_size=max_batch)
    written = None
    if out and sidecars:
        from .sidecar import write_sidecars

        written = write_sidecars(out)
    return {"report": report, "quant": quant, "sidecars": written, "triton": folder}
