"""The metadata an exported model carries (ONNX metadata_props), written by `sdca export` and read wherever the
model runs: here from an onnxruntime session, in sdca.deploy from the file header, in export/ by the C++ consumer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import List, Optional, Tuple

KEYS = ("sdca_version", "arch", "class_names", "palette", "mean", "std", "scale", "channel_order", "train_size",
        "input_size", "ignore_index", "output", "source_checkpoint", "source_checkpoint_sha256")


@dataclass
class DeployInfo:
    class_names: List[str]
    palette: List[Tuple[int, int, int]]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    scale: float
    channel_order: str
    output: str  # logits | probs | labels
    train_size: Optional[Tuple[int, int]] = None  # (width, height) it was trained at
    input_size: Optional[Tuple[int, int]] = None  # (width, height) of a fixed-size export; None: any size
    ignore_index: int = 255
    arch: str = ""
    sdca_version: str = ""
    source_checkpoint: str = ""
    source_checkpoint_sha256: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_props(self) -> dict:
        """String key/values for ONNX metadata_props (lists as JSON)."""
        return {
            "sdca_version": self.sdca_version, "arch": self.arch, "class_names": json.dumps(self.class_names),
            "palette": json.dumps([list(c) for c in self.palette]), "mean": json.dumps(list(self.mean)),
            "std": json.dumps(list(self.std)), "scale": json.dumps(self.scale), "channel_order": self.channel_order,
            "train_size": json.dumps(list(self.train_size) if self.train_size else None),
            "input_size": json.dumps(list(self.input_size) if self.input_size else None),
            "ignore_index": json.dumps(self.ignore_index), "output": self.output,
            "source_checkpoint": self.source_checkpoint, "source_checkpoint_sha256": self.source_checkpoint_sha256,
        }

    @classmethod
    def from_props(cls, props: dict, where: str = "model") -> "DeployInfo":
        missing = [k for k in ("class_names", "palette", "mean", "std", "scale", "channel_order", "output")
                   if k not in props]
        if missing:
            raise ValueError(f"{where} has no sdca metadata ({', '.join(missing)} missing): export it with "
                             "`sdca export --onnx`")
        size = json.loads(props.get("train_size", "null"))
        fixed = json.loads(props.get("input_size", "null"))
        return cls(class_names=json.loads(props["class_names"]),
                   palette=[tuple(c) for c in json.loads(props["palette"])],
                   mean=tuple(json.loads(props["mean"])), std=tuple(json.loads(props["std"])),
                   scale=float(json.loads(props["scale"])), channel_order=props["channel_order"],
                   output=props["output"], train_size=tuple(size) if size else None,
                   input_size=tuple(fixed) if fixed else None,
                   ignore_index=int(json.loads(props.get("ignore_index", "255"))), arch=props.get("arch", ""),
                   sdca_version=props.get("sdca_version", ""),
                   source_checkpoint=props.get("source_checkpoint", ""),
                   source_checkpoint_sha256=props.get("source_checkpoint_sha256", ""))


def session_metadata(session, where: str = "model") -> DeployInfo:
    """The DeployInfo of a loaded onnxruntime InferenceSession."""
    return DeployInfo.from_props(dict(session.get_modelmeta().custom_metadata_map), where=where)
