"""The metadata an exported model carries (ONNX metadata_props), written at export and read at inference.

Reading needs only onnx/onnxruntime, never torch or the training code.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import List, Optional, Tuple

KEYS = ("sdca_version", "arch", "class_names", "palette", "mean", "std", "scale", "channel_order", "train_size",
        "ignore_index", "output", "source_checkpoint", "source_checkpoint_sha256")


@dataclass
class DeployInfo:
    class_names: List[str]
    palette: List[Tuple[int, int, int]]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    scale: float
    channel_order: str
    output: str  # logits | probs | labels
    train_size: Optional[Tuple[int, int]] = None
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
        return cls(class_names=json.loads(props["class_names"]),
                   palette=[tuple(c) for c in json.loads(props["palette"])],
                   mean=tuple(json.loads(props["mean"])), std=tuple(json.loads(props["std"])),
                   scale=float(json.loads(props["scale"])), channel_order=props["channel_order"],
                   output=props["output"], train_size=tuple(size) if size else None,
                   ignore_index=int(json.loads(props.get("ignore_index", "255"))), arch=props.get("arch", ""),
                   sdca_version=props.get("sdca_version", ""),
                   source_checkpoint=props.get("source_checkpoint", ""),
                   source_checkpoint_sha256=props.get("source_checkpoint_sha256", ""))


def read_onnx_metadata(path: str) -> DeployInfo:
    """The DeployInfo of an exported .onnx file (header only: weights are not loaded)."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    return DeployInfo.from_props({p.key: p.value for p in model.metadata_props}, where=path)
