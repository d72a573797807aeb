"""Data sets, label spaces, transforms.

Names are imported on first use: ``sdca.data.labels`` (tables only) must stay importable without torch for
the deployment side.
"""
from .._lazy import lazy_exports

_EXPORTS = {
    **{n: "sdca.data.datasets" for n in ("Cityscapes", "GTA5", "Synthia", "CrossCity", "LabelledFolder",
                                          "ImageFolder", "ImagesAndLabelMaps", "PseudoLabelled", "SegmentationDataset", "collate",
                                          "has_images", "read_split_list")},
    **{n: "sdca.data.io" for n in ("CorruptImageError", "read_rgb", "read_label", "write_png")},
    **{n: "sdca.data.labels" for n in ("CITYSCAPES", "SYNTHIA_16", "CROSS_CITY_13", "LABEL_SPACES", "IGNORE_INDEX",
                                        "LabelSpace", "label_space_for", "trainid_to_labelid")},
    "build_transform": "sdca.data.transforms", "finish_images": "sdca.data.transforms",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
