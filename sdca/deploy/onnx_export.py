"""`sdca export --onnx`: the plain segmenter, upsampling in the graph, dynamic batch / height / width."""
from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from .._version import __version__
from ..models import DeepLabV2, load_model, upsample_logits
from ..models.efficientnet import relu6_export_form
from .metadata import DeployInfo

OUTPUTS = ("logits", "probs", "labels")
DEFAULT_OPSET = 18  # onnxruntime >= 1.17 and TensorRT 10 both take it


class ExportWrapper(torch.nn.Module):
    """Normalised image [B, 3, H, W] -> logits / probabilities [B, K, H, W] or uint8 labels [B, H, W]."""

    def __init__(self, model: DeepLabV2, output: str):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.model, self.output = model, output

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = upsample_logits(self.model(image).logits, image.shape[-2:])
        if self.output == "probs":
            return torch.softmax(logits, dim=1)
        if self.output == "labels":
            return logits.argmax(dim=1).to(torch.uint8)  # 1/K of the bytes of float logits
        return logits


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def deploy_info(model: DeepLabV2, output: str, checkpoint: str = "", sha256: str = "",
                input_size: Optional[Tuple[int, int]] = None) -> DeployInfo:
    info, norm = model.info, model.info.normalization
    return DeployInfo(class_names=list(info.class_names), palette=[tuple(c) for c in info.palette],
                      mean=tuple(norm.mean), std=tuple(norm.std), scale=norm.scale, channel_order=norm.channel_order,
                      output=output, train_size=tuple(info.train_size) if info.train_size else None,
                      input_size=tuple(input_size) if input_size else None,
                      ignore_index=info.ignore_index, arch=info.arch, sdca_version=__version__,
                      source_checkpoint=os.path.basename(checkpoint), source_checkpoint_sha256=sha256)


def export_onnx(checkpoint_or_model, path: str, *, output: str = "logits", opset: int = DEFAULT_OPSET,
                fp16: bool = False, check: bool = True,
                parity_shapes: Sequence[Tuple[int, int, int]] = ((1, 257, 385), (2, 193, 321)),
                max_size: int = 4096, static_size: Optional[Tuple[int, int]] = None, trusted: bool = False,
                relu6: Optional[str] = None) -> dict:
    """Export our checkpoint, a public SDCA checkpoint, or a model, to ``path``; returns a report.

    The graph takes the normalised image (see the metadata's mean, std, scale and channel order) with dynamic
    batch, height and width, and ends with the bilinear upsampling to the input size (align_corners=True, as
    trained). With ``check``: onnx.checker, then a parity run in onnxruntime against PyTorch on inputs of the
    ``parity_shapes`` (batch, height, width); the export fails loudly when logits differ by more than 1e-4 of
    their range (2e-2 with fp16 weights) or labels agree on fewer than 99.9% of pixels (99% with fp16).

    ``static_size`` = (width, height): a graph with every shape fixed (batch 1, that size) and no shape
    arithmetic, for runtimes without dynamic shapes (OpenCV's DNN module, the C++ consumer in export/); the
    size is recorded as ``input_size`` in the metadata and the parity run uses it.

    ``trusted``: read the checkpoint with full unpickling (see :func:`sdca.models.read_checkpoint`).

    ``relu6`` (EfficientNet-Lite0's activation): ``clip`` or ``relu-difference`` (see
    :func:`sdca.models.efficientnet.relu6_export_form`); by default relu-difference for a ``static_size`` export
    (OpenCV's DNN module reads those) and clip otherwise. Recorded in the metadata as ``relu6``.
    """
    import onnx

    if isinstance(checkpoint_or_model, str):
        checkpoint = checkpoint_or_model
        model, sha = load_model(checkpoint, trusted=trusted), _sha256(checkpoint)
    else:
        checkpoint, model, sha = "", checkpoint_or_model.eval(), ""
    model = model.float().eval()
    wrapper = ExportWrapper(model, output).eval()
    if static_size is not None:
        width, height = (int(v) for v in static_size)
        if width < 16 or height < 16:
            raise ValueError(f"static_size must be at least 16x16, got {width}x{height}")
        dynamic, example = None, torch.randn(1, 3, height, width)
        parity_shapes = ((1, height, width),)
    else:
        dynamic = {"image": {0: torch.export.Dim("batch", min=1, max=256),
                             2: torch.export.Dim("height", min=16, max=max_size),
                             3: torch.export.Dim("width", min=16, max=max_size)}}
        example = torch.randn(1, 3, 64, 96)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        form = relu6 or ("relu-difference" if static_size is not None else "clip")
        with torch.no_grad(), relu6_export_form(form):
            torch.onnx.export(wrapper, (example,), tmp, dynamo=True, external_data=False, opset_version=opset,
                              input_names=["image"], output_names=[output], dynamic_shapes=dynamic,
                              verbose=False)
        proto = onnx.load(tmp)
        if fp16:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            proto = convert_float_to_float16(proto, keep_io_types=True)
            _sort_topologically(proto.graph)  # the converter appends its input casts after their users
        info = deploy_info(model, output, checkpoint, sha, static_size)
        del proto.metadata_props[:]
        props = info.to_props()
        if model.info.arch == "deeplabv2_lite0":  # the only architecture with ReLU6
            props["relu6"] = form
        for key, value in props.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, tmp)
        report = {"path": path, "output": output, "opset": opset, "fp16": fp16, "bytes": os.path.getsize(tmp),
                  "static_size": list(static_size) if static_size else None, "relu6": props.get("relu6")}
        if check:
            onnx.checker.check_model(tmp, full_check=True)
            report["parity"] = _parity(model, tmp, output, parity_shapes, fp16)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return report


def _sort_topologically(graph) -> None:
    """Reorder graph.node so every node comes after the producers of its inputs (Kahn's algorithm)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise RuntimeError("the exported graph has a cycle or an input nobody produces")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if n not in ready]
    copies = [type(n)() for n in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def _parity(model: DeepLabV2, onnx_path: str, output: str, shapes, fp16: bool) -> list:
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    results = []
    gen = torch.Generator().manual_seed(0)
    for b, h, w in shapes:
        x = torch.randn(b, 3, h, w, generator=gen)
        with torch.no_grad():
            ref = upsample_logits(model(x).logits, (h, w))
        got = session.run(None, {"image": x.numpy()})[0]
        ref_labels = ref.argmax(1).numpy()
        if output == "labels":
            if got.dtype != np.uint8 or got.shape != (b, h, w):
                raise RuntimeError(f"exported labels are {got.dtype} {got.shape}, expected uint8 {(b, h, w)}")
            diff, agreement = None, float((got == ref_labels).mean())
        else:
            expected = torch.softmax(ref, 1).numpy() if output == "probs" else ref.numpy()
            if got.shape != expected.shape:
                raise RuntimeError(f"exported output has shape {got.shape}, expected {expected.shape}")
            diff = float(np.abs(got - expected).max())
            agreement = float((got.argmax(1) == ref_labels).mean())
            scale = float(np.abs(expected).max()) if output == "logits" else 1.0
            limit = (2e-2 if fp16 else 1e-4) * scale + 1e-5
            if diff > limit:
                raise RuntimeError(f"ONNX {output} differ from PyTorch by {diff:.3g} at {b}x{h}x{w} "
                                   f"(limit {limit:.3g}): the export is not faithful")
        if agreement < (0.99 if fp16 else 0.999):
            raise RuntimeError(f"ONNX and PyTorch labels agree on only {100 * agreement:.2f}% of pixels at "
                               f"{b}x{h}x{w}: the export is not faithful")
        results.append({"shape": [b, 3, h, w], "max_abs_diff": diff, "label_agreement": agreement})
    return results
