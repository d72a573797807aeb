"""Side files for robotics stacks, beside an exported model: what ROS 2 / Autoware / Isaac ROS nodes read from
files or parameters instead of ONNX metadata.

For ``NAME.onnx``: ``NAME.labels.txt`` (one class name per line, in id order), ``NAME.palette.csv``
(``id,name,r,g,b``), ``NAME.yaml`` (input size and conventions, output kind, ignore id, precision: the values
a node's parameters need) and ``NAME.ros2.yaml`` (the parameter file that starts ``sdca_serve.ros`` on it).
:func:`describe` gives the same YAML for any exported model.
"""
from __future__ import annotations

import csv
import io
import os
from typing import Dict

import yaml

from .metadata import DeployInfo, read_onnx_metadata


def sidecar_paths(model_path: str) -> Dict[str, str]:
    stem = os.path.splitext(model_path)[0]
    return {"labels": stem + ".labels.txt", "palette": stem + ".palette.csv", "yaml": stem + ".yaml",
            "ros2": stem + ".ros2.yaml"}


def ros2_parameters(model_path: str, info: DeployInfo) -> dict:
    """A ROS 2 parameter file for the sdca_serve.ros node: ``--ros-args --params-file NAME.ros2.yaml`` starts it on
    this model at its serving size, with the default topics and sensor-data QoS."""
    from sdca_serve.ros import DEFAULTS, NODE_NAME

    size = info.input_size or info.train_size
    params = dict(DEFAULTS, model=os.path.abspath(model_path), size=f"{size[0]}x{size[1]}" if size else "")
    return {NODE_NAME: {"ros__parameters": params}}


def model_precision(model_path: str) -> str:
    """int8 (QuantizeLinear/DequantizeLinear in the graph), fp16 (float16 weights) or fp32, read off the graph."""
    import onnx

    from .quantize import is_quantized

    graph = onnx.load(model_path, load_external_data=False).graph
    if is_quantized(graph):
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer):
        return "fp16"
    return "fp32"


def describe(model_path: str, info: DeployInfo = None) -> dict:
    """The conventions of an exported model, as plain data (what ``NAME.yaml`` holds)."""
    info = info or read_onnx_metadata(model_path)
    fixed = list(info.input_size) if info.input_size else None
    out_shape = ["N", "H", "W"] if info.output == "labels" else ["N", info.num_classes, "H", "W"]
    paths = sidecar_paths(model_path)
    return {
        "model": os.path.basename(model_path),
        "precision": model_precision(model_path),
        "input": {
            "name": "image", "layout": "NCHW", "dtype": "float32",
            "size": fixed,  # [width, height] of a fixed-shape export; null: any size
            "train_size": list(info.train_size) if info.train_size else None,
            "color_order": info.channel_order,
            "scale": info.scale, "mean": list(info.mean), "std": list(info.std),
            "formula": f"x = (pixel / 255 * {info.scale:g} - mean) / std, channels in {info.channel_order} order",
        },
        "output": {"kind": info.output, "dtype": "uint8" if info.output == "labels" else "float32",
                   "shape": out_shape, "resolution": "the input's (upsampled in the graph)"},
        "num_classes": info.num_classes,
        "ignore_id": info.ignore_index,  # vision_msgs/LabelInfo's 'unlabelled' convention is 255 too
        "class_names": list(info.class_names),
        "labels_file": os.path.basename(paths["labels"]),
        "palette_file": os.path.basename(paths["palette"]),
        "arch": info.arch, "sdca_version": info.sdca_version,
        "source_checkpoint_sha256": info.source_checkpoint_sha256,
        **_relu6(model_path),
    }


def _relu6(model_path: str) -> dict:
    """How an EfficientNet-Lite0 export writes ReLU6 (clip: one Clip node, for ONNX Runtime, OpenVINO, TensorRT,
    Triton; relu-difference: relu(x) - relu(x - 6), for OpenCV's DNN module); nothing for other models."""
    import onnx

    props = {p.key: p.value for p in onnx.load(model_path, load_external_data=False).metadata_props}
    return {"relu6": props["relu6"]} if "relu6" in props else {}


def describe_text(model_path: str) -> str:
    return yaml.safe_dump(describe(model_path), sort_keys=False)


def write_sidecars(model_path: str) -> Dict[str, str]:
    """Write the three side files beside ``model_path`` (atomically); returns their paths."""
    from .._atomic import atomic_write_text

    info = read_onnx_metadata(model_path)
    paths = sidecar_paths(model_path)
    atomic_write_text(paths["labels"], "".join(f"{name}\n" for name in info.class_names))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "name", "r", "g", "b"])
    for i, (name, colour) in enumerate(zip(info.class_names, info.palette)):
        writer.writerow([i, name, *colour])
    atomic_write_text(paths["palette"], buf.getvalue())
    atomic_write_text(paths["yaml"], yaml.safe_dump(describe(model_path, info), sort_keys=False))
    atomic_write_text(paths["ros2"], "# sdca_serve.ros: python -m sdca_serve.ros --ros-args --params-file "
                      f"{os.path.basename(paths['ros2'])}\n"
                      + yaml.safe_dump(ros2_parameters(model_path, info), sort_keys=False))
    return paths
