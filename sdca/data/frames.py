"""Where frames come from: files, folders (searched recursively), glob patterns and videos, with one list of
extensions. `sdca infer` reads every kind; calibration, AdaBN and inspect take the images. Torch-free: the
deployment side uses it. (A config's data entry, CONFIG:ENTRY, needs the config: sdca.engine.data_specs.)"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
DATA_ENTRIES = ("source", "target", "val")


@dataclass
class Source:
    path: str
    rel: str  # output path stem relative to the output folder (no extension)
    video: bool = False


def discover(paths: Sequence[str]) -> List[Source]:
    """Files, folders (recursive) and glob patterns -> image and video sources with their output stems."""
    found: List[Source] = []
    for p in paths:
        if os.path.isdir(p):
            for root, _, files in os.walk(p):
                for name in sorted(files):
                    full = os.path.join(root, name)
                    _add(found, full, os.path.relpath(full, p))
        elif os.path.isfile(p):
            _add(found, p, os.path.basename(p), explicit=True)
        elif glob.has_magic(p):
            base = p.split("*")[0].split("?")[0].split("[")[0]
            base = base if os.path.isdir(base) else os.path.dirname(base)
            for full in sorted(glob.glob(p, recursive=True)):
                if os.path.isfile(full):
                    _add(found, full, os.path.relpath(full, base or "."))
        else:
            raise FileNotFoundError(f"input not found: {p}")
    if not found:
        raise ValueError(f"no images or videos found in {', '.join(paths)} (images: {', '.join(IMAGE_EXTENSIONS)}; "
                         f"videos: {', '.join(VIDEO_EXTENSIONS)})")
    return found


def _add(found, full, rel, explicit=False):
    ext = os.path.splitext(full)[1].lower()
    if ext in IMAGE_EXTENSIONS or (explicit and ext not in VIDEO_EXTENSIONS):
        found.append(Source(full, os.path.splitext(rel)[0]))
    elif ext in VIDEO_EXTENSIONS:
        found.append(Source(full, os.path.splitext(rel)[0], video=True))


def find_images(source, what: str = "frames") -> List[str]:
    """Image files from a folder (recursive), a glob pattern or a list of paths, sorted: what `sdca infer`
    finds there, videos left out. FileNotFoundError names ``what`` when there is none."""
    if isinstance(source, (list, tuple)):
        frames = sorted(p for p in source if p.lower().endswith(IMAGE_EXTENSIONS))
    else:
        try:
            frames = sorted(s.path for s in discover([source]) if not s.video)
        except (FileNotFoundError, ValueError):  # nothing there: said below, in the caller's words
            frames = []
    if not frames:
        where = source if isinstance(source, str) else "the data set given"
        raise FileNotFoundError(f"no {what} ({', '.join(IMAGE_EXTENSIONS)}) in {where}")
    return frames


def parse_entry(spec: str) -> Optional[Tuple[str, str]]:
    """(config, entry) when ``spec`` reads CONFIG:ENTRY (a preset or YAML file, and source | target | val) and is
    not an existing path or glob match; else None."""
    config, sep, entry = spec.rpartition(":")
    if not sep or entry not in DATA_ENTRIES or os.path.exists(spec) or glob.glob(spec):
        return None
    return config, entry
