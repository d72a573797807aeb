"""Data named on the command line, resolved: a config's data entry (CONFIG:ENTRY), a data set kind and root, or
frames (folders, globs, files); and the check, before a run builds anything, that the folders a config points at
exist. The CLI parses and calls these; errors are ValueError / FileNotFoundError with a message to show."""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

from ..data.frames import find_images, parse_entry
from .config import ConfigError, DatasetConfig, load_config, presets
from .stages import stages_needing

DEFAULT_SPLITS = {"cityscapes": "val", "crosscity": "test"}


class MissingDataError(FileNotFoundError):
    """The data folders a config points at are not there; the message says how to point it at data."""


def entry_dataset(config: str, entry: str, num_classes: Optional[int] = None, sized: bool = False, size=None,
                  progress: bool = False):
    """The data set of a config's data entry (the config's class count unless given); ``sized``: with the
    transform to ``size``, or to the config's size for that entry."""
    from ..data import build_transform
    from .builders import build_dataset

    cfg = load_config(config)
    ds_cfg = getattr(cfg.data, entry)
    if ds_cfg is None:
        raise ConfigError(f"{config} has no data.{entry}")
    default_size = cfg.data.source_size if entry == "source" else cfg.data.target_size
    transform = build_transform(size=size or default_size) if sized else None
    return build_dataset(ds_cfg, num_classes or cfg.model.num_classes, transform, progress=progress)


def entry_image_paths(config: str, entry: str) -> List[str]:
    """The image files of a config's data entry, in the data set's order."""
    dataset = entry_dataset(config, entry)
    return [os.path.join(dataset.image_root, name) for name in dataset.names]


def frame_paths(spec: str, what: str = "frames") -> List[str]:
    """The image files of ``spec``: a folder, glob or file as sdca.data.frames finds them, or CONFIG:ENTRY (the
    images of that data set)."""
    found = parse_entry(spec)
    return find_images(spec, what) if found is None else entry_image_paths(*found)


def frame_paths_of(specs: Sequence[str], what: str = "frames") -> List[str]:
    """:func:`frame_paths` of several specs, in order."""
    return [p for spec in specs for p in frame_paths(spec, what)]


def kind_dataset(kind: str, root: str, num_classes: int, split: Optional[str] = None, labels=None, mapping=None,
                 city=None, list_file=None, labelled: bool = True, size=None):
    """A data set given by kind and root (``--data KIND --root DIR``), at ``size`` or its native size."""
    from ..data import build_transform
    from .builders import build_dataset

    ds = DatasetConfig(kind=kind, root=root, split=split or DEFAULT_SPLITS.get(kind, "train"), labels=labels,
                       mapping=mapping, city=city, list_file=list_file, labelled=labelled)
    return build_dataset(ds, num_classes, build_transform(size=size))


def frames_dataset(spec: str, num_classes: int, size=None, default_size=None):
    """CONFIG:ENTRY -> that data set at the config's size (or ``size``); a folder or glob of images -> unlabelled
    frames at ``size`` or ``default_size`` (the model's training size)."""
    from ..data import ImageFolder, build_transform

    found = parse_entry(spec)
    if found is not None:
        return entry_dataset(*found, num_classes, sized=True, size=size, progress=True)
    return ImageFolder.from_files(find_images(spec, "frames"), transform=build_transform(size=size or default_size))


def missing_data(cfg) -> List[str]:
    """``data.ENTRY.KEY = PATH`` for each configured folder or file that the config's stages read and that does
    not exist (SynthDrive is generated, so never missing)."""
    missing = []
    for which in ("source", "target", "val"):
        ds = getattr(cfg.data, which)
        if not stages_needing(which, cfg.stages) or ds is None or ds.kind == "synthdrive":
            continue
        for key in ("root", "labels", "mapping"):
            path = getattr(ds, key, None)
            if (key == "root" or path) and (not path or not os.path.exists(path)):
                missing.append(f"data.{which}.{key} = {path or '(empty)'}")
    return missing


def check_data(cfg, config_name: str) -> None:
    """Before any model is built: the configured data folders exist, or one message that says what to do."""
    missing = missing_data(cfg)
    if not missing:
        return
    raise MissingDataError(
        f"{config_name}: no data where the config points:\n  " + "\n  ".join(missing) + "\n"
        "Point it at your data, e.g.\n"
        f"  sdca train {config_name} --set data.source.root=SIM/images --set data.source.labels=SIM/labels \\\n"
        "      --set data.source.mapping=SIM/mapping.yaml --set data.target.root=REAL/frames\n"
        "or write a YAML file of your own (docs/training.md, docs/data.md). Presets: " + ", ".join(presets()) + ".\n"
        "To see the whole pipeline run first, on data it generates itself: sdca demo")


def frames_or_spec(spec: str):
    """CONFIG:ENTRY -> the image paths of that data set; anything else as given (a folder or glob stays one)."""
    found = parse_entry(spec)
    return spec if found is None else entry_image_paths(*found)
