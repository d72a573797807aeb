"""The data set kinds, named once: config validation, the CLI's --data choices and the builder table derive from
this list. Torch-free, so that `sdca --help` lists them without loading torch."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetKind:
    name: str
    summary: str
    labelled: bool  # has ground truth (cityscapes: unless labelled is false)
    needs: tuple[str, ...] = ()  # DatasetConfig fields it needs besides root
    on_command_line: bool = True  # offered by --data KIND --root DIR (synthdrive is generated from a config)


DATASET_KIND_LIST = (
    DatasetKind("gta5", "GTA5: images/, labels/ (colour-coded ids)", True),
    DatasetKind("synthia", "SYNTHIA-RAND-CITYSCAPES: RGB/, GT/LABELS/ (16-bit ids)", True),
    DatasetKind("cityscapes", "Cityscapes: leftImg8bit/SPLIT/CITY, gtFine/SPLIT/CITY", True),
    DatasetKind("crosscity", "NTHU Cross-City: CITY/Images, CITY/Labels", True, needs=("city",)),
    DatasetKind("folder", "your own: an image folder, a label folder and a mapping YAML", True,
                needs=("labels", "mapping")),
    DatasetKind("images", "unlabelled frames: a folder, searched recursively", False),
    DatasetKind("synthdrive", "the embedded generator (root: its cache folder)", True, on_command_line=False),
)
DATASET_KINDS = tuple(k.name for k in DATASET_KIND_LIST)
KIND_BY_NAME = {k.name: k for k in DATASET_KIND_LIST}
# `--data KIND --root DIR`: every kind a folder on disk is enough for.
COMMAND_LINE_KINDS = tuple(k.name for k in DATASET_KIND_LIST if k.on_command_line)
# Labelled kinds whose root is the whole description (folder needs a label folder and a mapping as well: it goes
# through a config entry).
ROOT_ONLY_LABELLED_KINDS = tuple(k.name for k in DATASET_KIND_LIST
                                 if k.on_command_line and k.labelled and not set(k.needs) - {"city"})
