"""The self-contained HTML page of a :class:`~miles.report.document.Document`.

Plots are embedded as base64 PNG data URIs, the CSS is inline and there is no script and no
external URL, so the page can be mailed, attached to an issue or opened from a laptop's file
browser with no server and no network.
"""

from __future__ import annotations

import base64
import html
import re
import struct

from miles.report.document import Document, Figure, Table

__all__ = ["render_html"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0;
       background: #fff; color: #1b1f23; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 1.6em; border-bottom: 2px solid #d0d7de; padding-bottom: 6px; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
p { line-height: 1.45; max-width: 75em; }
nav ul { padding-left: 1.2em; }
table { border-collapse: collapse; margin: 12px 0 20px; font-size: 0.9em; display: block;
        overflow-x: auto; max-width: 100%; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: 4px 0; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: right; white-space: nowrap; }
th { background: #f0f3f6; }
td:first-child, th:first-child { text-align: left; }
tbody tr:nth-child(even) { background: #f8fafc; }
figure { margin: 12px 0 28px; }
figure img { max-width: 100%; height: auto; border: 1px solid #e5e8eb; }
figcaption { font-size: 0.88em; color: #444; max-width: 75em; margin-top: 4px; }
.warning { color: #8a4b00; }
"""


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the PNG header, so the page reserves the space before decoding."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def _html_table(table: Table) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in table.columns)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in table.rows
    )
    return (
        f"<table>\n<caption>{esc(table.caption)}</caption>\n<thead><tr>{head}</tr></thead>\n"
        f"<tbody>\n{body}\n</tbody>\n</table>"
    )


def _html_figure(figure: Figure) -> str:
    data = figure.path.read_bytes()
    width, height = _png_size(data)
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    alt = html.escape(figure.caption.split(".")[0], quote=True)
    return (
        f'<figure>\n<img src="{uri}" width="{width}" height="{height}" alt="{alt}">\n'
        f"<figcaption>{html.escape(figure.caption)}</figcaption>\n</figure>"
    )


def render_html(report: Document) -> str:
    """The whole page as one string: inline CSS, data-URI images, no script, no external URL."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head>\n<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta name="miles-report" content="kind={report.kind}; tables={len(report.tables)}; '
        f'figures={len(report.figures)}">',
        f"<title>{esc(report.title)}</title>\n<style>{_CSS}</style>\n</head>",
        f"<body>\n<main>\n<h1>{esc(report.title)}</h1>",
    ]
    for text in report.intro:
        if text:
            cls = ' class="warning"' if text.startswith("warning") else ""
            parts.append(f"<p{cls}>{esc(text)}</p>")
    anchors = [f"s{i}-{_slug(s.title)}" for i, s in enumerate(report.sections)]
    if len(report.sections) > 1:
        items = "".join(
            f'<li><a href="#{a}">{esc(s.title)}</a></li>'
            for a, s in zip(anchors, report.sections, strict=True)
        )
        parts.append(f"<nav><ul>{items}</ul></nav>")
    for anchor, section in zip(anchors, report.sections, strict=True):
        parts.append(f'<section id="{anchor}">\n<h2>{esc(section.title)}</h2>')
        parts.extend(f"<p>{esc(p)}</p>" for p in section.paragraphs)
        for block in section.blocks:
            parts.append(_html_table(block) if isinstance(block, Table) else _html_figure(block))
        parts.append("</section>")
    parts.append("</main>\n</body>\n</html>\n")
    return "\n".join(parts)
