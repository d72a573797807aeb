"""Markdown tables for the reports (demo, inspect, experiment): one way to write a row and a header."""
from __future__ import annotations

from typing import Iterable, List


def row(cells: Iterable) -> str:
    """``| a | b |``; an empty cell stays one space wide (``| | b |``)."""
    return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"


def header(cells: Iterable, align: str) -> List[str]:
    """The header row and its rule; ``align`` has one letter per column: l (left) or r (right, for numbers)."""
    cells = list(cells)
    if len(align) != len(cells) or set(align) - {"l", "r"}:
        raise ValueError(f"align {align!r} must give l or r for each of the {len(cells)} columns")
    return [row(cells), row("---:" if a == "r" else "---" for a in align)]


def table(cells: Iterable, align: str, rows: Iterable[Iterable]) -> List[str]:
    """Header, rule and rows."""
    return header(cells, align) + [row(r) for r in rows]
