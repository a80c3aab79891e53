"""What the command line prints: JSON, aligned tables, text safe for a terminal."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def print_table(
    rows: Sequence[tuple[str, ...]], details: dict[int, list[str]] | None = None
) -> None:
    """Aligned columns; `details` maps a row's index to lines printed below it."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for index, r in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
        for line in (details or {}).get(index, []):
            print(line)


def printable(text: str) -> str:
    """`text` with control characters shown as `?`: names from storage reach a terminal."""
    return "".join(c if c.isprintable() else "?" for c in text)


__all__ = ["print_json", "print_table", "printable"]
