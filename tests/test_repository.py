"""Repository hygiene that no other test would notice: a merge conflict left in a text file."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: a conflict marker: git writes these at the start of a line, followed by a space and a label
MARKER = re.compile(r"^(<<<<<<<|>>>>>>>) \S", re.MULTILINE)
TEXT = {".py", ".md", ".yml", ".yaml", ".toml", ".cfg", ".txt", ".sh", ""}


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file under ROOT
        return [p for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]
    return [ROOT / line for line in out.splitlines()]


def test_no_merge_conflict_markers() -> None:
    found = []
    for path in _tracked():
        if path.suffix not in TEXT or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        found += [
            f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
            for m in MARKER.finditer(text)
        ]
    assert not found, f"merge conflict markers left in: {found}"
