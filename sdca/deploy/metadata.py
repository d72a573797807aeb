"""The metadata an exported model carries; DeployInfo itself lives with the torch-free runtime (sdca_serve)."""
from __future__ import annotations

from sdca_serve.metadata import KEYS, DeployInfo  # noqa: F401  (re-exported)


def read_onnx_metadata(path: str) -> DeployInfo:
    """The DeployInfo of an exported .onnx file (header only: weights are not loaded)."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    return DeployInfo.from_props({p.key: p.value for p in model.metadata_props}, where=path)
