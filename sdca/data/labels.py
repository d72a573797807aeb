"""Label spaces and raw-id maps, as data (reference/public_code_facts.md; Cityscapes' own label table)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

IGNORE_INDEX = 255

# Cityscapes' 19 evaluation classes in trainId order, with the official colours.
CITYSCAPES_19 = [
    ("road", (128, 64, 128)), ("sidewalk", (244, 35, 232)), ("building", (70, 70, 70)), ("wall", (102, 102, 156)),
    ("fence", (190, 153, 153)), ("pole", (153, 153, 153)), ("traffic light", (250, 170, 30)),
    ("traffic sign", (220, 220, 0)), ("vegetation", (107, 142, 35)), ("terrain", (152, 251, 152)),
    ("sky", (70, 130, 180)), ("person", (220, 20, 60)), ("rider", (255, 0, 0)), ("car", (0, 0, 142)),
    ("truck", (0, 0, 70)), ("bus", (0, 60, 100)), ("train", (0, 80, 100)), ("motorcycle", (0, 0, 230)),
    ("bicycle", (119, 11, 32)),
]
# Cityscapes labelId of each trainId (for writing predictions the official evaluation reads).
CITYSCAPES_TRAINID_TO_LABELID = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]


@dataclass(frozen=True)
class LabelSpace:
    """A set of classes in training-id order, with colours, and the subsets metrics are reported over."""

    name: str
    class_names: Tuple[str, ...]
    palette: Tuple[Tuple[int, int, int], ...]
    ignore_index: int = IGNORE_INDEX
    subsets: Mapping[str, Tuple[int, ...]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def index(self, name: str) -> int:
        return self.class_names.index(name)

    def colorize(self, labels: np.ndarray) -> np.ndarray:
        """[H, W] class ids -> [H, W, 3] uint8 colours (ignore and unknown ids black)."""
        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[: self.num_classes] = np.asarray(self.palette, dtype=np.uint8)
        return lut[np.clip(labels, 0, 255).astype(np.uint8)]


def _space(name: str, names: Sequence[str], subsets: Optional[Dict[str, Sequence[str]]] = None) -> LabelSpace:
    colours = dict(CITYSCAPES_19)
    subset_ids = {k: tuple(names.index(n) for n in v) for k, v in (subsets or {}).items()}
    return LabelSpace(name, tuple(names), tuple(colours[n] for n in names), subsets=subset_ids)


# The paper's tail classes for GTA5 -> Cityscapes (reference/method.md: reproduces its mIoU_t).
GTA5_TAIL = ("fence", "pole", "traffic light", "traffic sign", "rider", "truck", "bus", "train", "motorcycle",
             "bicycle")
CITYSCAPES = _space("cityscapes19", [n for n, _ in CITYSCAPES_19], {"tail": GTA5_TAIL})

_SYNTHIA_16_NAMES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                     "vegetation", "sky", "person", "rider", "car", "bus", "motorcycle", "bicycle"]
# mIoU* over 13 classes: the 16 without wall, fence and pole.
SYNTHIA_16 = _space("synthia16", _SYNTHIA_16_NAMES,
                    {"13": [n for n in _SYNTHIA_16_NAMES if n not in ("wall", "fence", "pole")]})

CROSS_CITY_13 = _space("crosscity13", ["road", "sidewalk", "building", "traffic light", "traffic sign", "vegetation",
                                       "sky", "person", "rider", "car", "bus", "motorcycle", "bicycle"])

LABEL_SPACES = {s.name: s for s in (CITYSCAPES, SYNTHIA_16, CROSS_CITY_13)}


def label_space_for(num_classes: int) -> LabelSpace:
    """The standard label space with this many classes (19, 16 or 13)."""
    for space in LABEL_SPACES.values():
        if space.num_classes == num_classes:
            return space
    raise ValueError(f"no standard label space has {num_classes} classes (known: 19, 16, 13); "
                     "give class names explicitly")


# ----------------------------------------------------------------------------------------------- raw id maps
# Cityscapes / GTA5 labelIds -> the 19 trainIds (public_code_facts.md).
CITYSCAPES_LABELID_TO_19 = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                            25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# Cityscapes labelIds -> the 16 SYNTHIA classes.
CITYSCAPES_LABELID_TO_16 = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 23: 9, 24: 10, 25: 11,
                            26: 12, 28: 13, 32: 14, 33: 15}
# SYNTHIA-RAND-CITYSCAPES GT/LABELS (uint16, first channel) -> the 16 classes.
SYNTHIA_ID_TO_16 = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 9, 10: 10, 17: 11, 8: 12, 19: 13,
                    12: 14, 11: 15}
# Cross-City (NTHU) labels are read as Cityscapes labelIds of its 13 classes. Not in docs/reference: taken
# from public re-implementations; override with CrossCity(..., id_map=...) if your copy differs.
CROSS_CITY_LABELID_TO_13 = {7: 0, 8: 1, 11: 2, 19: 3, 20: 4, 21: 5, 23: 6, 24: 7, 25: 8, 26: 9, 28: 10, 32: 11,
                            33: 12}


def lookup_table(id_map: Mapping[int, int], size: int = 256) -> np.ndarray:
    """A dense table for ``id_map`` where every unlisted raw id maps to the ignore index."""
    table = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    for raw, train in id_map.items():
        table[raw] = train
    return table


def map_ids(raw: np.ndarray, id_map: Mapping[int, int]) -> np.ndarray:
    """Raw ids -> training ids (uint8); ids absent from the map become 255."""
    size = max(256, int(raw.max()) + 1 if raw.size else 256)
    return lookup_table(id_map, size)[raw]


def trainid_to_labelid(labels: np.ndarray) -> np.ndarray:
    """Cityscapes 19 trainIds -> labelIds (255 -> 0, 'unlabeled'), for the official evaluation scripts."""
    table = np.zeros(256, dtype=np.uint8)
    table[:19] = CITYSCAPES_TRAINID_TO_LABELID
    return table[labels]
