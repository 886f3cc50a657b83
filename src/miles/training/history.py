"""Per-epoch history written as JSON (nested, exact) and CSV (flat, for spreadsheets)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from miles.fileio import atomic_write_text, write_json

__all__ = ["atomic_write_text", "flatten", "write_history", "write_json"]


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become JSON strings so a CSV cell holds them."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def write_history(out_dir: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """``history.json`` and ``history.csv`` (union of all columns, in first-seen order), each
    written all or nothing (:mod:`miles.fileio`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "history.json", list(history))
    rows = [flatten(r) for r in history]
    columns: list[str] = []
    for row in rows:
        columns.extend(c for c in row if c not in columns)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "history.csv", text.getvalue())
