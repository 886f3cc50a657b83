"""The one document model and the one set of writers behind every markdown, CSV and JSON file.

A study (compare, ablate, sweep, demo) and ``miles report`` both describe what they show as a
:class:`Document`: sections of paragraphs, :class:`Table` s whose cells are already formatted
text, and :class:`Figure` s. :func:`render_markdown` writes it as GitHub markdown (the study's own
``.md`` and ``report.md``); ``miles.report.page.render_html`` writes the same document as one
self-contained HTML page. So a number shows the same text in every file.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from miles.fileio import atomic_write_text, write_json

__all__ = [
    "Document",
    "Figure",
    "Section",
    "Table",
    "markdown_table",
    "render_markdown",
    "write_csv",
    "write_json",
    "write_study_files",
]


@dataclass
class Table:
    """A table already formatted as text cells, so every rendering shows the same numbers."""

    caption: str
    columns: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    """A PNG on disk and what it shows."""

    caption: str
    path: Path


@dataclass
class Section:
    """A heading with its paragraphs, then its tables and figures in order."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    blocks: list[Table | Figure] = field(default_factory=list)


@dataclass
class Document:
    """What a study or a report shows: a title, intro paragraphs and sections.

    ``kind`` is the study kind (``run``, ``demo``, ``compare``, ``ablate``, ``sweep``); intro
    paragraphs starting with ``warning`` are shown as warnings. ``html_path`` and ``md_path`` are
    set once the document has been written by ``miles report``.
    """

    kind: str
    title: str
    intro: list[str] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    html_path: Path | None = None
    md_path: Path | None = None

    @property
    def tables(self) -> list[Table]:
        return [b for s in self.sections for b in s.blocks if isinstance(b, Table)]

    @property
    def figures(self) -> list[Figure]:
        return [b for s in self.sections for b in s.blocks if isinstance(b, Figure)]

    def section(self, title: str) -> Section:
        """The section called ``title``, appended empty if the document has none yet."""
        for section in self.sections:
            if section.title == title:
                return section
        self.sections.append(Section(title))
        return self.sections[-1]


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(table: Table, *, caption: bool = True) -> str:
    """One GitHub markdown table (with its caption in bold above it)."""
    lines = [f"**{_md_cell(table.caption)}**", ""] if caption and table.caption else []
    lines += [
        "| " + " | ".join(_md_cell(c) for c in table.columns) + " |",
        "|" + "---|" * len(table.columns),
        *("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows),
    ]
    return "\n".join(lines)


def render_markdown(doc: Document, out_dir: Path | None = None) -> str:
    """The document as markdown; figures are linked relative to ``out_dir`` (required if any)."""
    lines = [f"# {doc.title}", ""]
    for text in doc.intro:
        if text:
            lines += [text, ""]
    for section in doc.sections:
        lines += [f"## {section.title}", ""]
        for p in section.paragraphs:
            lines += [p, ""]
        for block in section.blocks:
            if isinstance(block, Table):
                lines += [markdown_table(block), ""]
                continue
            if out_dir is None:
                raise ValueError("a document with figures needs out_dir to link them")
            rel = block.path.relative_to(out_dir).as_posix()
            alt = block.caption.split(".")[0].replace("]", ")").replace("[", "(")
            lines += [f"![{alt}]({rel})", "", f"*{block.caption}*", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], first: Sequence[str] = ()) -> None:
    """Rows as CSV: the ``first`` columns, then every other key in sorted order."""
    columns = list(first) + sorted({k for r in rows for k in r} - set(first))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def write_study_files(
    out: Path,
    stem: str,
    doc: Document,
    payload: Mapping[str, Any],
    csvs: Mapping[str, tuple[Sequence[Mapping[str, Any]], Sequence[str]]] | None = None,
) -> list[Path]:
    """Write a study's ``<stem>.md``, ``<stem>.json`` and ``<stem>_<name>.csv`` files.

    ``csvs`` maps a name to ``(rows, first columns)``. Returns the paths written.
    """
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"{stem}.md", out / f"{stem}.json"]
    atomic_write_text(written[0], render_markdown(doc))
    write_json(written[1], dict(payload))
    for name, (rows, first) in (csvs or {}).items():
        path = out / f"{stem}_{name}.csv"
        write_csv(path, rows, first)
        written.append(path)
    return written
