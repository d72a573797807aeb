"""Data sets, label spaces, transforms."""
from .datasets import (GTA5, Cityscapes, CrossCity, ImageFolder, LabelledFolder, PseudoLabelled, SegmentationDataset,
                       Synthia, collate, read_split_list)
from .io import CorruptImageError, read_label, read_rgb, write_png
from .labels import (CITYSCAPES, CROSS_CITY_13, IGNORE_INDEX, LABEL_SPACES, SYNTHIA_16, LabelSpace, label_space_for,
                     trainid_to_labelid)
from .transforms import build_transform

__all__ = [
    "Cityscapes", "GTA5", "Synthia", "CrossCity", "LabelledFolder", "ImageFolder", "PseudoLabelled", "SegmentationDataset",
    "collate", "read_split_list", "CorruptImageError", "read_rgb", "read_label", "write_png", "CITYSCAPES",
    "SYNTHIA_16", "CROSS_CITY_13", "LABEL_SPACES", "IGNORE_INDEX", "LabelSpace", "label_space_for",
    "trainid_to_labelid", "build_transform",
]
