"""Default places for the deployment commands: the newest file of a kind under runs/, and a new output folder
named after the inputs (never an earlier run's)."""
from __future__ import annotations

import glob
import os
from typing import Optional, Sequence


def newest(pattern: str, root: str = "runs") -> Optional[str]:
    """The most recently written file matching ``pattern`` below ``root`` (None when there is none)."""
    found = [p for p in glob.glob(os.path.join(root, "**", pattern), recursive=True) if os.path.isfile(p)]
    return max(found, key=os.path.getmtime) if found else None


def run_name(inputs: Sequence[str]) -> str:
    """A folder name for an inference run: the first input's base name (a folder's, a file's stem)."""
    first = inputs[0].rstrip("/\\") if inputs else "infer"
    name = os.path.splitext(os.path.basename(first))[0] if os.path.isfile(first) else os.path.basename(first)
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")
    return name or "infer"


def new_folder(parent: str, name: str) -> str:
    """parent/name, or parent/name2, name3, ... : the first that does not exist yet."""
    path, n = os.path.join(parent, name), 2
    while os.path.exists(path):
        path, n = os.path.join(parent, f"{name}{n}"), n + 1
    return path
