"""`sdca export --triton REPO`: a Triton Inference Server model repository around an exported .onnx file.

REPO/NAME/config.pbtxt + REPO/NAME/1/model.onnx. The config names the graph's input and output with their
types and per-item shapes (height and width stay variable, -1), sets max_batch_size and dynamic batching, and
carries the preprocessing the client must apply (mean, std, scale, channel order) and the class names as
string parameters. Triton batches only requests of the same shape, so clients that send one camera's frames
batch well. Needs onnx (no torch).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Dict, List, Tuple

# onnx TensorProto data types -> Triton's DataType names (model_config.proto)
_TRITON_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 6: "TYPE_INT32", 7: "TYPE_INT64",
                 10: "TYPE_FP16", 11: "TYPE_FP64", 16: "TYPE_BF16", 9: "TYPE_BOOL"}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")


def _io(value_info) -> Tuple[str, str, List[int]]:
    kind = value_info.type.tensor_type
    if kind.elem_type not in _TRITON_TYPES:
        raise ValueError(f"tensor {value_info.name!r} has ONNX type {kind.elem_type}, which Triton's config has no "
                         "name for here")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in kind.shape.dim]
    return value_info.name, _TRITON_TYPES[kind.elem_type], dims


def _tensor(name: str, dtype: str, dims: List[int]) -> str:
    return f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: [ {", ".join(map(str, dims))} ]\n  }}'


def triton_config(onnx_path: str, name: str, *, max_batch_size: int = 8, max_queue_delay_us: int = 5000,
                  instance_kind: str = "KIND_AUTO", instances: int = 1) -> str:
    """The config.pbtxt text (protobuf text format of Triton's ModelConfig) for ``onnx_path``."""
    import onnx

    if not NAME_PATTERN.match(name):
        raise ValueError(f"Triton model name {name!r} may hold letters, digits, '_', '.', '-' only")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    if instance_kind not in ("KIND_AUTO", "KIND_GPU", "KIND_CPU"):
        raise ValueError(f"instance_kind must be KIND_AUTO, KIND_GPU or KIND_CPU, got {instance_kind!r}")
    model = onnx.load(onnx_path, load_external_data=False)
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [_io(v) for v in graph.input if v.name not in initializers]
    outputs = [_io(v) for v in graph.output]
    for tensor_name, _, dims in inputs + outputs:
        if not dims or dims[0] != -1:
            raise ValueError(f"{onnx_path}: tensor {tensor_name!r} has a fixed batch dimension {dims[:1]}; Triton's "
                             "batching needs the dynamic-batch export (sdca export --onnx without --static-size)")
    props: Dict[str, str] = {p.key: p.value for p in model.metadata_props}
    parameters = {k: props[k] for k in ("class_names", "palette", "mean", "std", "scale", "channel_order", "output",
                                        "sdca_version", "arch") if k in props}
    lines = [f'name: "{name}"', 'platform: "onnxruntime_onnx"', f"max_batch_size: {max_batch_size}",
             "input [", ",\n".join(_tensor(n, t, d[1:]) for n, t, d in inputs), "]",
             "output [", ",\n".join(_tensor(n, t, d[1:]) for n, t, d in outputs), "]",
             "dynamic_batching {", f"  max_queue_delay_microseconds: {max_queue_delay_us}", "}",
             "instance_group [", f"  {{\n    count: {instances}\n    kind: {instance_kind}\n  }}", "]"]
    for key, value in parameters.items():  # text-format strings: JSON escaped is valid protobuf escaping
        lines.append(f"parameters {{\n  key: \"{key}\"\n  value {{ string_value: {json.dumps(value, ensure_ascii=False)} }}\n}}")
    return "\n".join(lines) + "\n"


def write_triton_repository(onnx_path: str, repo: str, name: str = "sdca", *, version: int = 1,
                            overwrite: bool = False, **config) -> str:
    """Write REPO/NAME/{config.pbtxt, VERSION/model.onnx}; returns the model folder. The folder appears whole
    or not at all (built beside it, then renamed)."""
    text = triton_config(onnx_path, name, **config)
    os.makedirs(repo, exist_ok=True)
    target = os.path.join(repo, name)
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{target} exists: choose another --triton-name or remove it")
    staging = tempfile.mkdtemp(prefix=f".{name}.", dir=repo)
    try:
        os.makedirs(os.path.join(staging, str(version)))
        shutil.copyfile(onnx_path, os.path.join(staging, str(version), "model.onnx"))
        with open(os.path.join(staging, "config.pbtxt"), "w") as f:
            f.write(text)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging)
    return target
