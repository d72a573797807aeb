"""INT8 export with ONNX Runtime's static quantization, and an accuracy gate against the float model.

Steps: ONNX Runtime's pre-processing (shape inference, graph optimisation), then ``quantize_static`` in QDQ
format with per-channel signed 8-bit weights and 8-bit activations, calibrated on frames pre-processed exactly
as ``sdca infer`` feeds them (the model's metadata: channel order, scale, mean, std).

Activations are **unsigned** (U8S8) on x86-64 and signed (S8S8) elsewhere (ARM), chosen from the platform at
export time (``activations="auto"``) and recorded in the metadata. On x86, ONNX Runtime fuses a QDQ Conv into an
integer kernel (QLinearConv) with unsigned activations; signed ones are converted only where a QuantizeLinear
has one consumer, so every conv whose input fans out (each block's first conv and downsample, the ASPP branches)
stays a float Conv between DequantizeLinear and QuantizeLinear, slower than the float model (ONNX Runtime's
documentation: S8S8 "with QOperator will be slow on x86-64"). :func:`integer_kernels` counts what ONNX
Runtime actually runs; the count goes into the report.

Calibration memory is bounded whatever the frame count: frames go through the calibrator in chunks of at most
``CALIB_CHUNK`` (ONNX Runtime keeps every intermediate output of a chunk; histograms are merged across chunks),
so a 1024x512 export calibrated on 200 frames holds 8 frames' activations at a time, not 200. The output stage
stays in float: the final ``Resize`` (the upsampling to the input size), ``Softmax`` and ``ArgMax`` only move or
rank values that the quantized network already produced, and quantizing the upsampled K x H x W logits would
add a rounding step at full resolution for no arithmetic saved.

The gate then runs both models on held-out frames (never the calibration ones) and measures the label
agreement per pixel and the mIoU of the INT8 labels against the float labels; both go into the model's metadata
with the calibration settings, and a model below ``min_agreement`` is not written unless ``force``.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .metadata import read_onnx_metadata

CALIB_METHODS = ("entropy", "minmax", "percentile")
KEEP_FLOAT_OPS = ("Resize", "Softmax", "ArgMax")
ACTIVATION_TYPES = ("auto", "uint8", "int8")
CALIB_CHUNK = 8
# What ONNX Runtime's optimised CPU graph runs a convolution as: an integer kernel, or a float one.
INTEGER_CONVS = ("QLinearConv", "ConvInteger")
FLOAT_CONVS = ("Conv", "FusedConv")


class QuantizationRejected(ValueError):
    """The INT8 model agrees with the float model on too few pixels; nothing was written."""


@dataclass
class FrameSplit:
    calibration: List[str]
    held_out: List[str]


def find_frames(source, what: str = "calibration frames") -> List[str]:
    """Image files from a folder (recursive), a glob pattern or a list of paths, sorted (sdca.data.frames)."""
    from ..data.frames import find_images

    return find_images(source, what)


def split_frames(frames: Sequence[str], calib: int, held_out: int, seed: int = 0) -> FrameSplit:
    """A fixed shuffle, then the first ``calib`` frames calibrate and the next ``held_out`` judge: disjoint."""
    order = list(frames)
    random.Random(seed).shuffle(order)
    return FrameSplit(order[:calib], order[calib:calib + held_out])


def load_frames(paths: Sequence[str], size: Optional[Tuple[int, int]]) -> Tuple[List[np.ndarray], List[str]]:
    """uint8 RGB frames (resized to ``size`` = (width, height) when given) and the paths that could not be read."""
    from PIL import Image

    frames, unreadable = [], []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.load()
                rgb = im.convert("RGB")
                if size is not None and rgb.size != tuple(size):
                    rgb = rgb.resize(tuple(size), Image.BILINEAR)
                frames.append(np.asarray(rgb))
        except (OSError, ValueError, SyntaxError):
            unreadable.append(path)
    return frames, unreadable


def is_quantized(graph) -> bool:
    """Quantize/DequantizeLinear or QLinear* nodes in an ONNX graph."""
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") or n.op_type.startswith("QLinear")
               for n in graph.node)


def label_agreement(float_labels: np.ndarray, int8_labels: np.ndarray, num_classes: int) -> Tuple[float, float]:
    """(share of pixels with the same label, mIoU of the INT8 labels with the float labels as the truth)."""
    a, b = float_labels.reshape(-1).astype(np.int64), int8_labels.reshape(-1).astype(np.int64)
    agreement = float((a == b).mean())
    cm = np.bincount(a * num_classes + b, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    inter = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - np.diag(cm)
    present = union > 0
    return agreement, float((inter[present] / union[present]).mean()) if present.any() else 1.0


def default_activations(machine: Optional[str] = None) -> str:
    """uint8 on x86-64 (where only U8S8 fuses into integer kernels), int8 elsewhere (ARM's S8S8 kernels)."""
    import platform

    machine = (machine or platform.machine()).lower()
    return "uint8" if machine in ("x86_64", "amd64", "i386", "i686", "x86") else "int8"


def integer_kernels(path: str) -> dict:
    """How many convolutions ONNX Runtime's optimised CPU graph of ``path`` runs as integer kernels, and how many
    as float ones (the graph ONNX Runtime writes with ``optimized_model_filepath`` at ORT_ENABLE_ALL)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="sdca-ort-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        options.intra_op_num_threads = 1
        ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    integer = sum(op in INTEGER_CONVS for op in ops)
    return {"integer_convs": integer, "float_convs": sum(op in FLOAT_CONVS for op in ops),
            "convs": integer + sum(op in FLOAT_CONVS for op in ops)}


def _chunk(n: int, limit: int = CALIB_CHUNK) -> int:
    """The largest chunk of at most ``limit`` frames that divides ``n`` (ONNX Runtime's chunked calibration
    needs whole chunks)."""
    return max(d for d in range(1, min(limit, n) + 1) if n % d == 0)


def _labels(session, x: np.ndarray, output: str) -> np.ndarray:
    out = session.run(None, {session.get_inputs()[0].name: x})[0]
    return out.astype(np.uint8) if output == "labels" else out.argmax(1).astype(np.uint8)


def quantize_int8(float_path: str, out_path: str, calibration: str, *, calib_frames: int = 200,
                  held_out_frames: int = 20, method: str = "entropy", size: Optional[Tuple[int, int]] = None,
                  min_agreement: float = 0.98, force: bool = False, held_out: Optional[str] = None,
                  keep_float: Sequence[str] = KEEP_FLOAT_OPS, progress: bool = True, activations: str = "auto",
                  calib_chunk: int = CALIB_CHUNK) -> dict:
    """Quantize the exported float model at ``float_path`` to ``out_path`` (see the module docstring).

    ``calibration``: a folder, glob or list of frames; ``held_out``: another for the accuracy check (default: further
    frames of ``calibration``, never the ones calibrated on). ``size`` (width, height): the size frames are brought to for
    calibration and the gate (default: the model's fixed input size, else its training size, else each
    frame's own). Returns the report also stored in the metadata; raises :class:`QuantizationRejected` below
    ``min_agreement`` unless ``force`` (nothing is written then). ``activations``: auto (from the platform, see
    the module docstring), uint8 or int8. ``calib_chunk``: at most this many frames' intermediate outputs are held
    at a time.
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from tqdm.auto import tqdm

    from sdca_serve.runtime import preprocess

    from .._atomic import atomic_write

    if activations not in ACTIVATION_TYPES:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATION_TYPES)}, got {activations!r}")
    activations = default_activations() if activations == "auto" else activations
    if method not in CALIB_METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(CALIB_METHODS)}, got {method!r}")
    if not 0 <= min_agreement <= 1:
        raise ValueError(f"min_agreement must lie in [0, 1], got {min_agreement}")
    float_model = onnx.load(float_path)
    if is_quantized(float_model.graph):
        raise ValueError(f"{float_path} is quantized already: quantize the float export")
    info = read_onnx_metadata(float_path)
    size = size or info.input_size or info.train_size
    frames = find_frames(calibration)
    split = split_frames(frames, calib_frames, held_out_frames)
    if held_out is not None:
        used = set(split.calibration)
        split = FrameSplit(split.calibration, [f for f in find_frames(held_out) if f not in used][:held_out_frames])
    calib, bad_calib = load_frames(split.calibration, size)
    held, bad_held = load_frames(split.held_out, size)
    if len(calib) < 8 or len(held) < 2:
        where = calibration if isinstance(calibration, str) else "the calibration data set"
        raise ValueError(f"{where}: {len(frames)} frames found, {len(calib)} readable for calibration and "
                         f"{len(held)} held out for the accuracy check ({len(bad_calib) + len(bad_held)} "
                         "unreadable): at least 8 and 2 are needed, never the same frames")

    class Frames(CalibrationDataReader):
        """The calibration frames, served in ranges (ONNX Runtime's chunked calibration calls set_range)."""

        def __init__(self):
            self.bar = tqdm(total=len(calib), desc="calibrate", disable=not progress, dynamic_ncols=True)
            self.set_range(0, len(calib))

        def __len__(self):
            return len(calib)

        def set_range(self, start_index: int, end_index: int):
            self.position, self.end = start_index, end_index

        def get_next(self):
            if self.position >= self.end:
                return None
            frame = calib[self.position]
            self.position += 1
            self.bar.update(1)
            return {"image": preprocess(frame[None], info)}

    with tempfile.TemporaryDirectory(prefix="sdca-int8-") as tmp:
        prepared = os.path.join(tmp, "prepared.onnx")
        quant_pre_process(float_path, prepared, skip_symbolic_shape=False)
        graph = onnx.load(prepared).graph
        keep = [n.name for n in graph.node if n.op_type in keep_float]
        quantized = os.path.join(tmp, "int8.onnx")
        chunk = _chunk(len(calib), calib_chunk)
        reader = Frames()
        # "CalibStridedMinMax" is ONNX Runtime's chunking of calibration (any method, despite its name): each
        # chunk's intermediate outputs are reduced (ranges, or histograms merged into the running ones) and freed.
        quantize_static(prepared, quantized, reader, quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                        weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method={"entropy": CalibrationMethod.Entropy, "minmax": CalibrationMethod.MinMax,
                                          "percentile": CalibrationMethod.Percentile}[method],
                        nodes_to_exclude=keep, extra_options={"CalibStridedMinMax": chunk})
        reader.bar.close()
        kernels = integer_kernels(quantized)

        cpu = ["CPUExecutionProvider"]
        f_sess = ort.InferenceSession(float_path, providers=cpu)
        q_sess = ort.InferenceSession(quantized, providers=cpu)
        f_labels, q_labels = [], []
        for frame in tqdm(held, desc="accuracy check", disable=not progress, dynamic_ncols=True):
            x = preprocess(frame[None], info)
            f_labels.append(_labels(f_sess, x, info.output).reshape(-1))
            q_labels.append(_labels(q_sess, x, info.output).reshape(-1))
        agreement, miou = label_agreement(np.concatenate(f_labels), np.concatenate(q_labels), info.num_classes)
        import platform

        report = {"format": "QDQ", "activations": activations, "weights": "int8 per-channel", "method": method,
                  "platform": platform.machine(), "integer_convs": kernels["integer_convs"],
                  "convs": kernels["convs"], "calibration_chunk": chunk,
                  "calibration_frames": len(calib), "held_out_frames": len(held),
                  "unreadable_frames": len(bad_calib) + len(bad_held),
                  "size": list(size) if size else None, "kept_float": list(keep_float),
                  "label_agreement": agreement, "miou_vs_float": miou, "min_agreement": min_agreement,
                  "forced": bool(force and agreement < min_agreement)}
        if agreement < min_agreement and not force:
            raise QuantizationRejected(
                f"the INT8 model agrees with the float model on {100 * agreement:.2f}% of pixels "
                f"({len(held)} held-out frames; mIoU vs float {100 * miou:.1f}), below --min-agreement "
                f"{100 * min_agreement:.1f}%: not written. Calibrate on more or more typical frames, try another "
                "--calib-method, or pass --force to write it anyway")
        model = onnx.load(quantized)
        props = {p.key: p.value for p in float_model.metadata_props}
        props.update(precision="int8", quantization=json.dumps(report))
        del model.metadata_props[:]
        for key, value in props.items():
            model.metadata_props.add(key=key, value=value)
        data = model.SerializeToString()
        atomic_write(out_path, lambda f: f.write(data))
    return report
