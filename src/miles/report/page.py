"""``miles report RUN_DIR``: one HTML page (and its markdown twin) for a compare, demo or run.

The HTML is self-contained on purpose: plots are embedded as base64 PNG data URIs, the CSS is
inline and there is no script and no external URL, so the page can be mailed, attached to an issue
or opened from a laptop's file browser with no server and no network. The markdown twin links the
same PNGs from ``report_files/`` next to it, for GitHub and for diffs.

Three kinds of folder are recognised, by the file that only that kind writes:

- ``compare.json``: a ``miles compare`` output (runs in ``runs/<fusion>/<method>/seed<N>/``);
- ``results.json``: a ``miles demo`` output (one seed, every run inside ``results.json``);
- ``result.json``: a single run (``miles train --out``, or one run folder of a compare).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from miles.report.tables import aggregate, pm, summarize_run

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
FILES_DIR = "report_files"
#: at most this many seeds become columns of one learning-dynamics figure (wider is unreadable)
MAX_DYNAMICS_COLUMNS = 5
KINDS = ("compare", "demo", "run")


@dataclass
class Table:
    """A table already formatted as text cells, so HTML and markdown show the same numbers."""

    caption: str
    columns: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    """A PNG on disk (in ``report_files/``) and what it shows."""

    caption: str
    path: Path


@dataclass
class Section:
    """A heading with its paragraphs, then its tables and figures in order."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    blocks: list[Table | Figure] = field(default_factory=list)


@dataclass
class Report:
    """What ``build_report`` wrote, with counts that the checks compare the rendered page to."""

    kind: str
    title: str
    intro: list[str]
    sections: list[Section]
    html_path: Path | None = None
    md_path: Path | None = None

    @property
    def tables(self) -> list[Table]:
        return [b for s in self.sections for b in s.blocks if isinstance(b, Table)]

    @property
    def figures(self) -> list[Figure]:
        return [b for s in self.sections for b in s.blocks if isinstance(b, Figure)]


def detect_kind(run_dir: str | Path) -> str:
    """``"compare"``, ``"demo"`` or ``"run"``, from the file only that kind of folder holds.

    Raises:
        FileNotFoundError: the folder is missing or holds none of the three files.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a folder")
    if (run_dir / "compare.json").is_file():
        return "compare"
    if (run_dir / "results.json").is_file():
        return "demo"
    if (run_dir / "result.json").is_file():
        return "run"
    raise FileNotFoundError(
        f"{run_dir} holds no compare.json (miles compare), results.json (miles demo) or "
        "result.json (one run): nothing to report"
    )


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Report:
    """Write ``report.html``, ``report.md`` and ``report_files/*.png`` (default ``RUN_DIR/report``).

    Plots are drawn once into ``report_files/``; the HTML embeds those same bytes.
    """
    run_dir = Path(run_dir)
    kind = detect_kind(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    files = out / FILES_DIR
    files.mkdir(parents=True, exist_ok=True)
    for old in files.glob("*.png"):  # a re-run must not leave figures the new page lacks
        old.unlink()
    builder = {"compare": _compare_report, "demo": _demo_report, "run": _run_report}[kind]
    report = builder(run_dir, files)
    report.html_path = out / REPORT_HTML
    report.md_path = out / REPORT_MD
    report.html_path.write_text(render_html(report), encoding="utf-8")
    report.md_path.write_text(render_markdown(report, out), encoding="utf-8")
    return report


# ---------------------------------------------------------------------------------------------
# content


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _settings(params: Mapping[str, Any]) -> str:
    """``tau=0.2, mu=0.5``: a strategy's settings as a reader writes them (its name left out)."""
    return ", ".join(f"{k}={v}" for k, v in params.items() if k != "name")


def _pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * float(value):.1f}"


def _plain(value: Any) -> str:
    return "-" if value is None else str(value)


def _result_columns(order: Sequence[str]) -> list[str]:
    """Columns of a per-run table (demo, single run; the all-runs table adds identifiers)."""
    heads = [f"{m} head" for m in order]
    return ["method", "seed", "fused", *heads, "gap", "chosen epoch", "MILES acted"]


def _result_cells(name: str, row: Mapping[str, Any], order: Sequence[str]) -> list[str]:
    """One :func:`miles.report.tables.summarize_run` row as text, percentages with one decimal."""
    return [
        name,
        str(row["seed"]),
        _pct(row["fused"]),
        *(_pct(row[m]) for m in order),
        _pct(row["gap"]),
        _plain(row["best_epoch"]),
        _plain(row["acted"]),
    ]


def _bars(
    groups: Sequence[Mapping[str, Any]],
    order: Sequence[str],
    path: Path,
    *,
    title: str,
    metric: str,
    caption: str,
) -> Figure:
    from miles.report.plots import plot_metric_bars

    metrics = {"fused": "fused head"} | {m: f"{m} head" for m in order}
    plot_metric_bars(groups, metrics, path, title=title, ylabel=f"test {metric} (%)")
    return Figure(caption, path)


def _dynamics(runs: Mapping[str, Mapping[str, Any]], path: Path, caption: str) -> Figure:
    from miles.report.plots import plot_learning_dynamics

    plot_learning_dynamics(runs, path)
    return Figure(caption, path)


_DYNAMICS_NOTE = (
    "Learning dynamics (as in the paper's Fig. 2): top, the conditional utilization u of each "
    "modality and their gap delta against tau, shaded where MILES slowed a modality for the next "
    "epoch; middle, each modality's learning rate; bottom, validation metric of the fused and "
    "unimodal heads per epoch, with the epoch chosen on validation."
)


def _compare_report(run_dir: Path, files: Path) -> Report:
    """Per fusion: the Table II-shaped table, the bar chart and MILES' dynamics for each seed."""
    payload = _read_json(run_dir / "compare.json")
    config = payload["config"]
    order: list[str] = list(payload["dominant_order"])
    agg: list[dict[str, Any]] = payload["aggregate"]
    rows: list[dict[str, Any]] = payload["rows"]
    seeds: list[int] = list(config["seeds"])
    results = _compare_results(run_dir, config)
    metric = next((r["config"].get("metric", "metric") for r in results), "metric")
    intro = [
        f"Dataset {config['dataset']}, methods {', '.join(config['methods'])}, fusions "
        f"{', '.join(config['fusions'])}, seeds {seeds}; {config['epochs']} epochs, "
        f"{config['optimizer']} lr {config['lr']}, batch {config['batch_size']}, latent "
        f"{config['latent_dim']}.",
        f"Test {metric} (%) at the epoch chosen on validation, mean ± std over seeds. Dominant "
        f"modality by {payload['dominant_rule']}: {order[0]}; gap = {order[0]} head - "
        f"{order[-1]} head. The unimodal row holds each modality's own model; it has no fused "
        "head. aux = trained with the auxiliary unimodal losses.",
        payload.get("meta", ""),
    ]
    head_cols = [f"{m} head" + (" (dominant)" if i == 0 else "") for i, m in enumerate(order)]
    sections = []
    for fusion in config["fusions"]:
        cells = [a for a in agg if a["fusion"] == fusion]
        section = Section(f"{fusion} fusion")
        table_rows = []
        for a in cells:
            aux = {None: "-", True: "yes", False: "no"}[a.get("uses_aux_losses")]
            acted = pm(a, "acted", pct=False) if a["method"] == "miles" else "-"
            table_rows.append(
                [
                    a["method"],
                    aux,
                    pm(a, "fused"),
                    *(pm(a, m) for m in order),
                    pm(a, "gap"),
                    pm(a, "best_epoch", pct=False),
                    acted,
                    str(a["n"]),
                ]
            )
        section.blocks.append(
            Table(
                f"{fusion} fusion: test {metric} (%), mean ± std over seeds",
                ["method", "aux", "fused", *head_cols, "gap", "chosen epoch", "MILES acted", "n"],
                table_rows,
            )
        )
        if cells:
            section.blocks.append(
                _bars(
                    cells,
                    order,
                    files / f"bars_{_slug(fusion)}.png",
                    title=f"{config['dataset']}, {fusion} fusion",
                    metric=metric,
                    caption=f"{fusion} fusion: test {metric} per method, mean over seeds; error "
                    "bars one standard deviation over seeds (n under each method).",
                )
            )
        section.blocks.extend(_compare_dynamics(results, fusion, seeds, files))
        sections.append(section)
    sections.append(_runs_section(rows, order, metric))
    return Report("compare", f"miles compare: {config['dataset']}", intro, sections)


def _compare_results(run_dir: Path, config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``result.json`` of every run of this compare's methods, fusions and seeds, with its
    folder name.

    A folder may hold runs of an earlier invocation with more seeds or other methods; only the
    methods, seeds and fusions of ``compare.json`` are read, so the figures agree with the tables.
    """
    out = []
    for path in sorted((run_dir / "runs").glob("*/*/seed*/result.json")):
        result = _read_json(path)
        if result.get("strategy", {}).get("name") not in config["methods"]:
            continue
        if result["config"]["seed"] not in config["seeds"]:
            continue
        if result.get("extra", {}).get("fusion") not in config["fusions"]:
            continue
        result["_variant"] = path.parent.parent.name
        out.append(result)
    return out


def _compare_dynamics(
    results: Sequence[Mapping[str, Any]], fusion: str, seeds: Sequence[int], files: Path
) -> list[Figure]:
    """One figure per MILES variant of this fusion, one column per seed (the first few)."""
    figures = []
    variants: dict[str, list[Mapping[str, Any]]] = {}
    for r in results:
        if r["strategy"].get("name") == "miles" and r["extra"].get("fusion") == fusion:
            variants.setdefault(r["_variant"], []).append(r)
    for variant, members in variants.items():
        members = sorted(members, key=lambda r: seeds.index(r["config"]["seed"]))
        shown = members[:MAX_DYNAMICS_COLUMNS]
        runs = {f"{variant}, {fusion}, seed {r['config']['seed']}": r for r in shown}
        more = (
            f" Only the first {len(shown)} of {len(members)} seeds are drawn."
            if len(members) > len(shown)
            else ""
        )
        figures.append(
            _dynamics(
                runs,
                files / f"dynamics_{_slug(fusion)}_{_slug(variant)}.png",
                f"{fusion} fusion, {variant}: one column per seed. {_DYNAMICS_NOTE}{more}",
            )
        )
    return figures


def _runs_section(rows: Sequence[Mapping[str, Any]], order: Sequence[str], metric: str) -> Section:
    """Every run and seed of a compare, so a mean can be traced to the runs behind it."""
    table_rows = []
    for r in rows:
        name = f"{r['method']} {r.get('label', '')}".strip()
        ident = [r["fusion"], name, str(r["seed"])]
        if r.get("failed"):
            table_rows.append([*ident, f"diverged: {r['failed']}", *["-"] * (len(order) + 3)])
            continue
        if r["method"] == "unimodal":  # only its own modality was trained: no fused, no gap
            own = r.get("label")
            cells = ["-", *(_pct(r.get(m)) if m == own else "-" for m in order), "-"]
        else:
            cells = [_pct(r.get("fused")), *(_pct(r.get(m)) for m in order), _pct(r.get("gap"))]
        table_rows.append([*ident, *cells, _plain(r.get("best_epoch")), _plain(r.get("acted"))])
    return Section(
        "All runs",
        ["One row per run and seed (unimodal references are listed under every fusion)."],
        [
            Table(
                f"every run: test {metric} (%) at the epoch chosen on validation",
                ["fusion", *_result_columns(order)],
                table_rows,
            )
        ],
    )


def _demo_report(run_dir: Path, files: Path) -> Report:
    """Per fusion the demo's table and bar chart (one seed: no error bars); then MILES' dynamics."""
    payload = _read_json(run_dir / "results.json")
    runs: dict[str, dict[str, Any]] = payload["runs"]
    rows: list[dict[str, Any]] = payload["rows"]
    first = next(iter(runs.values()))
    order: list[str] = list(first["val"]["unimodal"])
    metric = first["config"].get("metric", "metric")
    fusions = list(dict.fromkeys(r["fusion"] for r in rows))
    sizes = payload.get("dataset_info", {}).get("sizes")
    intro = [
        f"miles demo on {payload['dataset']}"
        + (f" ({sizes} pairs)" if sizes else "")
        + f": {payload['epochs']} epochs, seed {payload['seed']}, lr {payload['lr']}, MILES "
        f"settings: {_settings(payload.get('miles_params') or {}) or 'default'}.",
        f"Test {metric} (%) at the epoch chosen on validation. One seed, so there are no error "
        "bars; gap = largest head - smallest head; MILES acted = epochs MILES trained a "
        "modality at a lowered rate.",
        *payload.get("warnings", []),
    ]
    sections = []
    for fusion in fusions:
        fusion_rows = [r for r in rows if r["fusion"] == fusion]
        section = Section(f"{fusion} fusion")
        section.blocks.append(
            Table(
                f"{fusion} fusion: test {metric} (%)",
                _result_columns(order),
                [_result_cells(r["method"], r, order) for r in fusion_rows],
            )
        )
        groups = aggregate(fusion_rows, ["method"], ["fused", *order])
        section.blocks.append(
            _bars(
                groups,
                order,
                files / f"bars_{_slug(fusion)}.png",
                title=f"{payload['dataset']}, {fusion} fusion (seed {payload['seed']})",
                metric=metric,
                caption=f"{fusion} fusion: test {metric} per method (one seed).",
            )
        )
        sections.append(section)
    # one figure, one column per fusion: the same figure `miles demo` draws itself
    miles_runs = {k: r for k, r in runs.items() if r["strategy"].get("name") == "miles"}
    if miles_runs:
        sections.append(
            Section(
                "MILES learning dynamics",
                blocks=[
                    _dynamics(
                        miles_runs,
                        files / "dynamics_miles.png",
                        f"MILES, one column per fusion. {_DYNAMICS_NOTE}",
                    )
                ],
            )
        )
    return Report("demo", f"miles demo: {payload['dataset']}", intro, sections)


def _run_report(run_dir: Path, files: Path) -> Report:
    """One run: its row, its heads as bars and its learning dynamics (any strategy)."""
    result = _read_json(run_dir / "result.json")
    row = summarize_run(result)
    order = list(result["val"]["unimodal"])
    metric = result["config"].get("metric", "metric")
    dataset = result.get("extra", {}).get("dataset", "?")
    name = result["strategy"]["name"]
    which = "test" if result.get("test") else "validation"
    intro = [
        f"One run: strategy {name} ({_settings(result['strategy'])}), dataset {dataset}, fusion "
        f"{row['fusion'] or '?'}, seed {row['seed']}; {row['epochs']} epochs run in "
        f"{result.get('wall_time_s', float('nan')):.1f} s.",
        f"{which.capitalize()} {metric} (%) at epoch {row['best_epoch']}, chosen on validation.",
    ]
    section = Section(f"{name}, {row['fusion'] or 'run'}")
    section.blocks.append(
        Table(
            f"{which} {metric} (%)",
            _result_columns(order),
            [_result_cells(name, row, order)],
        )
    )
    section.blocks.append(
        _bars(
            aggregate([row], ["method"], ["fused", *order]),
            order,
            files / "bars.png",
            title=f"{dataset}: {name}",
            metric=metric,
            caption=f"{which} {metric} of the fused head and each unimodal head.",
        )
    )
    section.blocks.append(
        _dynamics(
            {f"{name}, seed {row['seed']}": result},
            files / "dynamics.png",
            f"{name}. {_DYNAMICS_NOTE}",
        )
    )
    return Report("run", f"miles run: {name} on {dataset}", intro, [section])


# ---------------------------------------------------------------------------------------------
# rendering

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0;
       background: #fff; color: #1b1f23; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 1.6em; border-bottom: 2px solid #d0d7de; padding-bottom: 6px; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
p { line-height: 1.45; max-width: 75em; }
nav ul { padding-left: 1.2em; }
table { border-collapse: collapse; margin: 12px 0 20px; font-size: 0.9em; }
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


def render_html(report: Report) -> str:
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


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Report, out_dir: Path) -> str:
    """The same content as markdown; figures are linked relative to ``out_dir``."""
    lines = [f"# {report.title}", ""]
    for text in report.intro:
        if text:
            lines += [text, ""]
    for section in report.sections:
        lines += [f"## {section.title}", ""]
        for p in section.paragraphs:
            lines += [p, ""]
        for block in section.blocks:
            if isinstance(block, Table):
                lines += [
                    f"**{_md_cell(block.caption)}**",
                    "",
                    "| " + " | ".join(_md_cell(c) for c in block.columns) + " |",
                    "|" + "---|" * len(block.columns),
                    *("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows),
                    "",
                ]
            else:
                rel = block.path.relative_to(out_dir).as_posix()
                alt = block.caption.split(".")[0].replace("]", ")").replace("[", "(")
                lines += [f"![{alt}]({rel})", "", f"*{block.caption}*", ""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------
# command line


def add_parser(subparsers: Any) -> None:
    """Add ``miles report RUN_DIR [--out DIR]`` to the ``miles`` sub-commands."""
    parser = subparsers.add_parser(
        "report",
        help="self-contained HTML (and markdown) report of a compare, demo or run folder",
        description=(
            "Write report.html (plots embedded, opens with no server) and report.md "
            "(plots in report_files/) for a `miles compare` or `miles demo` output folder, or "
            "one run folder."
        ),
    )
    parser.add_argument("run_dir", type=Path, help="compare, demo or run output folder")
    parser.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/report)")


def run_cli(args: argparse.Namespace) -> int:
    """Build the report and say where it is; a folder with nothing to report exits with status 1."""
    try:
        report = build_report(args.run_dir, args.out)
    except FileNotFoundError as exc:
        raise SystemExit(f"miles report: {exc}") from None
    print(
        f"{report.kind} report: {len(report.tables)} tables, {len(report.figures)} figures; "
        f"wrote {report.html_path} and {report.md_path}"
    )
    return 0
