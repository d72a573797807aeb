"""Data sets with their real on-disk layouts and label encodings.

Every item is a dict: ``image`` (float [3, H, W] RGB in [0, 1] after the default transform), ``label``
(int64 [H, W] training ids, 255 = ignore; absent for unlabelled sets) and ``name`` (the image path relative
to the data set's image folder, so outputs can mirror the input tree). Model-specific input normalisation
is applied by the caller (``model.info.normalization``), since VGG and ResNet expect different inputs.
"""
from __future__ import annotations

import glob
import os
import warnings
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .io import IMAGE_EXTENSIONS, CorruptImageError, read_color_label, read_label, read_png16_first_channel, read_rgb
from .labels import (
    CITYSCAPES,
    CITYSCAPES_LABELID_TO_16,
    CITYSCAPES_LABELID_TO_19,
    CROSS_CITY_13,
    CROSS_CITY_LABELID_TO_13,
    IGNORE_INDEX,
    SYNTHIA_16,
    SYNTHIA_ID_TO_16,
    LabelSpace,
    map_ids,
)
from .transforms import ToTensor


def _require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} folder not found: {path}")
    return path


def read_split_list(list_file: str) -> List[str]:
    """A split list as the public code writes them: one relative image path per line (blank lines skipped)."""
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"split list not found: {list_file}")
    with open(list_file) as f:
        return [line.strip() for line in f if line.strip()]


def _select(folder: str, pattern: str, list_file: Optional[str]) -> List[str]:
    """Image paths relative to ``folder``: from a split list, or a glob pattern, sorted."""
    if list_file is not None:
        names = read_split_list(list_file)
        missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images named in {list_file} are not in {folder}, "
                                    f"e.g. {missing[0]}")
        return names
    names = sorted(os.path.relpath(p, folder) for p in glob.glob(os.path.join(folder, pattern), recursive=True))
    if not names:
        raise FileNotFoundError(f"no images matching {pattern!r} in {folder}")
    return names


ON_ERROR = ("skip", "raise")


def unreadable(name: str, reason: str) -> dict:
    """What a data set returns for a frame (or label) it cannot decode under ``on_error="skip"``: no image, the
    name in ``skipped``. :func:`collate` leaves it out of the batch and passes the name on, so a frame is never
    replaced by another one (which would count it twice in a pass over the set)."""
    warnings.warn(f"skipping unreadable frame: {reason}", RuntimeWarning, stacklevel=3)
    return {"name": name, "skipped": [name], "unreadable": reason}


def _check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    return on_error


class SegmentationDataset(Dataset):
    """(image, label) file pairs, a label decoder and a transform; the base of the labelled data sets.

    ``on_error="skip"``: a pair whose image or label cannot be decoded comes back as an :func:`unreadable`
    marker (``"raise"``: the error, naming the file). A label whose size differs from its image's (a known
    GTA5 quirk) is resized to the image, nearest neighbour, and the pair named in ``sample["mismatched"]``: the
    transform then takes both to the configured size, as the public loaders do.
    """

    def __init__(self, image_root: str, items: Sequence[Tuple[str, Optional[str]]],
                 decode_label: Optional[Callable[[str], np.ndarray]], label_space: LabelSpace,
                 transform: Optional[Callable] = None, on_error: str = "raise"):
        self.image_root = image_root
        self.items = list(items)
        self.decode_label = decode_label
        self.label_space = label_space
        self.transform = transform or ToTensor()
        self.on_error = _check_on_error(on_error)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def names(self) -> List[str]:
        return [name for name, _ in self.items]

    def __getitem__(self, index: int) -> dict:
        name, label_path = self.items[index]
        image_path = os.path.join(self.image_root, name)
        try:
            image = read_rgb(image_path)
            label = (self.decode_label(label_path) if label_path is not None and self.decode_label is not None
                     else None)
        except CorruptImageError as exc:
            if self.on_error == "raise":
                raise
            return unreadable(name, str(exc))
        sample = {"image": image, "name": name}
        if label is not None:
            if label.shape[:2] != image.shape[:2]:
                warnings.warn(f"label {label_path} is {label.shape[1]}x{label.shape[0]} but its image {image_path} "
                              f"is {image.shape[1]}x{image.shape[0]}: label resized (nearest)", RuntimeWarning,
                              stacklevel=2)
                label = np.array(Image.fromarray(label).resize((image.shape[1], image.shape[0]), Image.NEAREST))
                sample["mismatched"] = [name]
            sample["label"] = label
        return self.transform(sample)

    @staticmethod
    def pair(image_root: str, names: Sequence[str], label_of: Callable[[str], str]) -> List[Tuple[str, str]]:
        """Attach a label path to every image; a missing label is an error naming both files."""
        items = []
        for name in names:
            label_path = label_of(name)
            if not os.path.isfile(label_path):
                raise FileNotFoundError(f"image {os.path.join(image_root, name)} has no label: "
                                        f"expected {label_path}")
            items.append((name, label_path))
        return items


def _id_decoder(id_map: Mapping[int, int], reader=read_label) -> Callable[[str], np.ndarray]:
    def decode(path: str) -> np.ndarray:
        return map_ids(reader(path), id_map)
    return decode


class Cityscapes(SegmentationDataset):
    """``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` with ``gtFine/{split}/{city}/*_gtFine_labelIds.png``.

    labelIds are mapped to the 19 trainIds, to the 16 SYNTHIA classes (``num_classes=16``) or to the 13
    Cross-City classes (``num_classes=13``, the Cityscapes -> Cross-City source).
    ``labelled=False`` gives the images alone (the unlabelled target set of adaptation).
    """

    def __init__(self, root: str, split: str = "train", *, num_classes: int = 19, list_file: Optional[str] = None,
                 transform=None, labelled: bool = True, on_error: str = "raise"):
        spaces = {19: (CITYSCAPES, CITYSCAPES_LABELID_TO_19), 16: (SYNTHIA_16, CITYSCAPES_LABELID_TO_16),
                  13: (CROSS_CITY_13, CROSS_CITY_LABELID_TO_13)}
        if num_classes not in spaces:
            raise ValueError(f"Cityscapes maps to 19, 16 or 13 classes, not {num_classes}")
        image_root = _require_dir(os.path.join(_require_dir(root, "Cityscapes"), "leftImg8bit", split),
                                  "Cityscapes images")
        names = _select(image_root, "*/*_leftImg8bit.png", list_file)
        space, id_map = spaces[num_classes]
        if labelled:
            label_root = _require_dir(os.path.join(root, "gtFine", split), "Cityscapes labels")

            def label_of(name):
                return os.path.join(label_root, name.replace("_leftImg8bit.png", "_gtFine_labelIds.png"))
            items = self.pair(image_root, names, label_of)
        else:
            items = [(n, None) for n in names]
        super().__init__(image_root, items, _id_decoder(id_map) if labelled else None, space, transform, on_error)


class GTA5(SegmentationDataset):
    """``images/*.png`` with ``labels/*.png`` of the same name, Cityscapes labelIds -> 19 (or 16) classes."""

    def __init__(self, root: str, *, num_classes: int = 19, list_file: Optional[str] = None, transform=None,
                 on_error: str = "raise"):
        if num_classes not in (19, 16):
            raise ValueError(f"GTA5 maps to 19 or 16 classes, not {num_classes}")
        image_root = _require_dir(os.path.join(_require_dir(root, "GTA5"), "images"), "GTA5 images")
        label_root = _require_dir(os.path.join(root, "labels"), "GTA5 labels")
        names = _select(image_root, "*.png", list_file)
        items = self.pair(image_root, names, lambda n: os.path.join(label_root, n))
        space = CITYSCAPES if num_classes == 19 else SYNTHIA_16
        id_map = CITYSCAPES_LABELID_TO_19 if num_classes == 19 else CITYSCAPES_LABELID_TO_16
        super().__init__(image_root, items, _id_decoder(id_map), space, transform, on_error)


class Synthia(SegmentationDataset):
    """SYNTHIA-RAND-CITYSCAPES: ``RGB/*.png`` with ``GT/LABELS/*.png`` (16-bit, class id in the first channel),
    mapped to the 16 classes."""

    def __init__(self, root: str, *, list_file: Optional[str] = None, transform=None, on_error: str = "raise"):
        image_root = _require_dir(os.path.join(_require_dir(root, "SYNTHIA"), "RGB"), "SYNTHIA images")
        label_root = _require_dir(os.path.join(root, "GT", "LABELS"), "SYNTHIA labels")
        names = _select(image_root, "*.png", list_file)
        items = self.pair(image_root, names, lambda n: os.path.join(label_root, n))
        super().__init__(image_root, items, _id_decoder(SYNTHIA_ID_TO_16, read_png16_first_channel), SYNTHIA_16,
                         transform, on_error)


class CrossCity(SegmentationDataset):
    """NTHU Cross-City: ``{City}/Images/{Train,Test}/*`` and, for Test, ``{City}/Labels/Test/*_eval.png``.

    Only the test images are labelled; ``split="train"`` gives the unlabelled adaptation images. Labels are
    read as Cityscapes labelIds of the 13 classes (``id_map`` overrides; see labels.CROSS_CITY_LABELID_TO_13).
    """

    CITIES = ("Rome", "Rio", "Tokyo", "Taipei")

    def __init__(self, root: str, city: str, split: str = "test", *, list_file: Optional[str] = None,
                 transform=None, id_map: Optional[Mapping[int, int]] = None, on_error: str = "raise"):
        if split not in ("train", "test"):
            raise ValueError(f"Cross-City split must be 'train' or 'test', got {split!r}")
        city_root = _require_dir(os.path.join(_require_dir(root, "Cross-City"), city), f"Cross-City {city}")
        image_root = _require_dir(os.path.join(city_root, "Images", split.capitalize()), f"{city} images")
        names = _select(image_root, "*.*", list_file)
        names = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
        if split == "test":
            label_root = _require_dir(os.path.join(city_root, "Labels", "Test"), f"{city} labels")
            items = self.pair(image_root, names,
                              lambda n: os.path.join(label_root, os.path.splitext(n)[0] + "_eval.png"))
            decode = _id_decoder(id_map or CROSS_CITY_LABELID_TO_13)
        else:
            items, decode = [(n, None) for n in names], None
        super().__init__(image_root, items, decode, CROSS_CITY_13, transform, on_error)


class LabelledFolder(SegmentationDataset):
    """Your own simulator's output: an image folder, a label folder and a YAML mapping.

    mapping.yaml::

        classes: [road, sidewalk, car]           # training ids in this order (or a standard space:
                                                 #   label_space: cityscapes19 | synthia16 | crosscity13)
        palette: [[128, 64, 128], ...]            # optional
        ids: {7: road, 8: sidewalk, 26: car}      # raw label value -> class (name or index), or
        colors: {"128,64,128": road}              # colour-coded labels: "r,g,b" -> class
        label_suffix: ".png"                      # label file = image stem + suffix (default ".png")

    Raw values or colours not listed become 255 (ignored).
    """

    def __init__(self, images: str, labels: str, mapping: str, *, list_file: Optional[str] = None,
                 transform=None, pattern: str = "**/*.*", on_error: str = "raise"):
        import yaml

        image_root = _require_dir(images, "image")
        label_root = _require_dir(labels, "label")
        if not os.path.isfile(mapping):
            raise FileNotFoundError(f"label mapping not found: {mapping}")
        with open(mapping) as f:
            spec = yaml.safe_load(f) or {}
        space = self._space(spec, mapping)
        index = {n: i for i, n in enumerate(space.class_names)}

        def to_index(value):
            if isinstance(value, int) and 0 <= value < space.num_classes:
                return value
            if value in index:
                return index[value]
            raise ValueError(f"{mapping}: unknown class {value!r} (classes: {', '.join(space.class_names)})")

        if "ids" in spec:
            decode = _id_decoder({int(k): to_index(v) for k, v in spec["ids"].items()})
        elif "colors" in spec:
            colours = {tuple(int(c) for c in str(k).split(",")): to_index(v) for k, v in spec["colors"].items()}
            decode = _colour_decoder(colours)
        else:
            raise ValueError(f"{mapping}: give either 'ids' (raw value -> class) or 'colors' ('r,g,b' -> class)")
        suffix = spec.get("label_suffix", ".png")
        names = [n for n in _select(image_root, pattern, list_file) if n.lower().endswith(IMAGE_EXTENSIONS)]
        items = self.pair(image_root, names, lambda n: os.path.join(label_root, os.path.splitext(n)[0] + suffix))
        super().__init__(image_root, items, decode, space, transform, on_error)

    @staticmethod
    def _space(spec: dict, mapping: str) -> LabelSpace:
        from .labels import LABEL_SPACES

        if "label_space" in spec:
            if spec["label_space"] not in LABEL_SPACES:
                raise ValueError(f"{mapping}: unknown label_space {spec['label_space']!r}; "
                                 f"known: {', '.join(LABEL_SPACES)}")
            return LABEL_SPACES[spec["label_space"]]
        names = spec.get("classes")
        if not names:
            raise ValueError(f"{mapping}: 'classes' (a list of class names) or 'label_space' is required")
        palette = spec.get("palette") or [((37 * i) % 256, (91 * i) % 256, (173 * i) % 256) for i in range(len(names))]
        if len(palette) != len(names):
            raise ValueError(f"{mapping}: palette has {len(palette)} colours for {len(names)} classes")
        return LabelSpace("custom", tuple(names), tuple(tuple(c) for c in palette))


def _colour_decoder(colours: Mapping[Tuple[int, int, int], int]) -> Callable[[str], np.ndarray]:
    keys = np.array([(r << 16) | (g << 8) | b for r, g, b in colours], dtype=np.int64)
    values = np.array(list(colours.values()), dtype=np.uint8)
    order = np.argsort(keys)
    keys, values = keys[order], values[order]

    def decode(path: str) -> np.ndarray:
        rgb = read_color_label(path).astype(np.int64)
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        pos = np.clip(np.searchsorted(keys, code), 0, len(keys) - 1)
        return np.where(keys[pos] == code, values[pos], IGNORE_INDEX).astype(np.uint8)
    return decode


class ImagesAndLabelMaps(SegmentationDataset):
    """Images paired with trainId label maps of the same relative names (.png) in another folder: the ones
    ``sdca pseudo-label`` wrote, or SynthDrive's cached ground truth."""

    def __init__(self, image_root: str, names: Sequence[str], label_dir: str, label_space: LabelSpace,
                 transform=None, on_error: str = "raise"):
        items = self.pair(image_root, names, lambda n: os.path.join(label_dir, os.path.splitext(n)[0] + ".png"))
        super().__init__(image_root, items, read_label, label_space, transform, on_error)


PseudoLabelled = ImagesAndLabelMaps  # the old name, from when pseudo-labels were its only use


class ImageFolder(Dataset):
    """Unlabelled frames (a folder, searched recursively, jpg/png/...): the robot's real camera frames.

    A frame that cannot be decoded comes back as an :func:`unreadable` marker (a warning names it, and it is
    counted in ``failures``); :func:`collate` drops it from the batch. ``on_error="raise"`` makes it an error.
    """

    def __init__(self, root: str, *, list_file: Optional[str] = None, transform=None, on_error: str = "skip",
                 extensions: Sequence[str] = IMAGE_EXTENSIONS):
        _check_on_error(on_error)
        self.root = _require_dir(root, "image")
        names = _select(self.root, "**/*", list_file)
        self.names = [n for n in names if n.lower().endswith(tuple(extensions))]
        if not self.names:
            raise FileNotFoundError(f"no images ({', '.join(extensions)}) in {root}")
        self.transform = transform or ToTensor()
        self.on_error = on_error
        self.failures: List[Tuple[str, str]] = []

    @classmethod
    def from_files(cls, paths: Sequence[str], *, transform=None, on_error: str = "skip") -> "ImageFolder":
        """Exactly these image files (a glob's matches, a list), named relative to their common folder; that
        folder is not searched for others."""
        if not paths:
            raise FileNotFoundError("no image files given")
        files = [os.path.abspath(p) for p in paths]
        folder = cls.__new__(cls)
        folder.root = os.path.commonpath([os.path.dirname(f) for f in files])
        folder.names = [os.path.relpath(f, folder.root) for f in files]
        folder.transform = transform or ToTensor()
        folder.on_error = _check_on_error(on_error)
        folder.failures = []
        return folder

    def __len__(self) -> int:
        return len(self.names)

    @property
    def image_root(self) -> str:
        """The folder ``names`` are relative to, under the labelled data sets' name for it."""
        return self.root

    def __getitem__(self, index: int) -> dict:
        name = self.names[index]
        try:
            image = read_rgb(os.path.join(self.root, name))
        except CorruptImageError as exc:
            if self.on_error == "raise":
                raise
            self.failures.append((name, str(exc)))
            return unreadable(name, str(exc))
        return self.transform({"image": image, "name": name})


def collate(samples: List[dict]) -> dict:
    """Stack images and labels of one size; names stay a list.

    Unreadable markers are left out: their names go to ``skipped`` (and pairs whose label was resized to its
    image to ``mismatched``), which travel with the batch so that a trainer counts what happened in worker
    processes too. A batch of markers only has no ``image``: :func:`has_images` tells.
    """
    readable = [s for s in samples if "unreadable" not in s]
    out = {"skipped": [name for s in samples for name in s.get("skipped", ())],
           "mismatched": [name for s in readable for name in s.get("mismatched", ())]}
    if not readable:
        return out
    out["image"] = torch.stack([s["image"] for s in readable])
    if all("name" in s for s in readable):
        out["name"] = [s["name"] for s in readable]
    if all("label" in s for s in readable):
        out["label"] = torch.stack([s["label"] for s in readable])
    if all("photometric" in s for s in readable):  # the uint8 pipeline's deferred draws (transforms.finish_images)
        out["photometric"] = [s["photometric"] for s in readable]
    return out


def has_images(batch: dict) -> bool:
    """False for a batch whose every frame was unreadable (see :func:`collate`)."""
    return "image" in batch
