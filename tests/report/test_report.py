"""`miles report`: self-contained HTML + markdown for compare, demo and single-run folders.

The runs are tiny (FSDD-MNIST with 60 training pairs, 2 epochs, latent 8) and built once per module:
what is checked is the page, not the numbers on it.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from torch.utils.data import Subset

import miles.data
from miles.compare import CompareConfig, run_compare
from miles.demo import run_demo
from miles.report.page import (
    FILES_DIR,
    Report,
    add_parser,
    build_report,
    detect_kind,
    run_cli,
)
from miles.report.plots import plot_metric_bars

PIL = pytest.importorskip("PIL.Image")
_REAL_BUILD = miles.data.build_dataset
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check_report_chromium.sh"
METHODS = ["joint", "joint+aux", "miles", "unimodal"]
FUSIONS = ["concat"]  # one fusion keeps the file fast; the demo report covers two
DYNAMICS_BARS = (("bars", ".png"), ("dynamics", "_miles.png"))
DATA_URI = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+")


class _Page(HTMLParser):
    """Collects what the checks need: tables, their cells, images, links and scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.tables = 0
        self.cells: list[str] = []
        self.imgs: list[str] = []
        self.links: list[str] = []
        self.scripts = 0
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self.tables += 1
        elif tag in ("td", "th"):
            self._in_cell = True
            self.cells.append("")
        elif tag == "img":
            self.imgs.append(a.get("src") or "")
        elif tag in ("script", "link", "iframe", "object"):
            self.scripts += 1
        if tag != "img":
            self.links += [v or "" for k, v in attrs if k in ("href", "src")]

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data: str) -> None:
        if self._in_cell:
            self.cells[-1] += data


def _check_page(report: Report) -> _Page:
    """Assert what makes the HTML self-contained and complete; return the parsed page."""
    assert report.html_path is not None
    text = report.html_path.read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    assert page.tables == len(report.tables) > 0
    assert len(page.imgs) == len(report.figures) > 0
    for src in page.imgs:  # every plot is embedded and is a PNG that decodes
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with PIL.open(io.BytesIO(data)) as img:
            img.verify()
    assert page.scripts == 0
    assert all(link.startswith("#") for link in page.links), page.links
    assert not re.search(r"https?://", DATA_URI.sub("", text))  # base64 may spell "http" by chance
    return page


def _check_markdown(report: Report) -> str:
    """The markdown links exactly the report's figures, as files that exist next to it."""
    assert report.md_path is not None
    text = report.md_path.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)]+)\)", text)
    assert len(targets) == len(report.figures)
    for target in targets:
        assert not target.startswith(("http", "/")), target
        assert target.startswith(f"{FILES_DIR}/")
        assert (report.md_path.parent / target).is_file(), target
    assert sum(line.startswith("|---|") for line in text.splitlines()) == len(report.tables)
    assert "http" not in text
    return text


def _small_data(name: str, **params: Any) -> Any:
    """FSDD-MNIST with 60 training pairs and every 5th validation and test pair (90 each).

    Evaluation dominates a tiny run's time; a fifth of it keeps this file under 20 s on one core.
    The report only needs results shaped like real ones, not good ones.
    """
    data = _REAL_BUILD(name, **({"max_train": 60} | params))
    val, test = (Subset(d, range(0, len(d), 5)) for d in (data.val, data.test))
    return dataclasses.replace(data, val=val, test=test)


@pytest.fixture(scope="module")
def small_data() -> Iterator[None]:
    """Every ``build_dataset`` of this module (compare and demo) gives :func:`_small_data`."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(miles.data, "build_dataset", _small_data)
        yield


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory: pytest.TempPathFactory, small_data: None) -> Path:
    out = tmp_path_factory.mktemp("compare")
    config = CompareConfig(
        dataset_params={"max_train": 60},
        methods=METHODS,
        fusions=FUSIONS,
        seeds=[0, 1],
        epochs=2,
        latent_dim=8,
        out_dir=str(out),
    )
    run_compare(config, echo=lambda _m: None)
    return out


@pytest.fixture(scope="module")
def compare_report(compare_dir: Path) -> Report:
    return build_report(compare_dir)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory, small_data: None) -> Path:
    """``miles demo`` trains on the full dataset; the small one is enough for a report."""
    out = tmp_path_factory.mktemp("demo")
    run_demo(
        out,
        epochs=2,
        fusions=("concat", "sum"),
        methods=("joint", "miles"),
        progress=False,
        echo=lambda _m: None,
    )
    return out


def test_detect_kind(compare_dir: Path, demo_dir: Path, tmp_path: Path) -> None:
    assert detect_kind(compare_dir) == "compare"
    assert detect_kind(demo_dir) == "demo"
    assert detect_kind(compare_dir / "runs" / "concat" / "miles" / "seed0") == "run"
    with pytest.raises(FileNotFoundError, match="nothing to report"):
        detect_kind(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        detect_kind(tmp_path / "missing")


def test_compare_report(compare_dir: Path, compare_report: Report) -> None:
    assert compare_report.kind == "compare"
    assert compare_report.html_path == compare_dir / "report" / "report.html"
    # one Table II per fusion and the all-runs table
    assert len(compare_report.tables) == len(FUSIONS) + 1
    # per fusion: the bar chart and MILES' learning dynamics (all seeds in one figure)
    names = sorted(f.path.name for f in compare_report.figures)
    assert names == sorted(f"{kind}_{f}{tail}" for f in FUSIONS for kind, tail in DYNAMICS_BARS)
    page = _check_page(compare_report)
    for table in compare_report.tables[: len(FUSIONS)]:  # a row per method, in the asked order
        assert [row[0] for row in table.rows] == METHODS
    assert set(METHODS) <= set(page.cells)
    assert "audio head (dominant)" in page.cells or "image head (dominant)" in page.cells
    assert any("±" in c for c in page.cells)
    md = _check_markdown(compare_report)
    assert "## concat fusion" in md and "| joint+aux | yes |" in md


def test_demo_report(demo_dir: Path, tmp_path: Path) -> None:
    report = build_report(demo_dir, tmp_path / "out")
    assert report.kind == "demo"
    assert report.html_path == tmp_path / "out" / "report.html"
    # per fusion its table and bar chart; then MILES' dynamics, one column per fusion
    titles = [s.title for s in report.sections]
    assert titles == ["concat fusion", "sum fusion", "MILES learning dynamics"]
    assert len(report.tables) == 2 and len(report.figures) == 3
    page = _check_page(report)
    assert page.cells.count("joint") == page.cells.count("miles") == 2
    md = _check_markdown(report)
    assert "## concat fusion" in md and "## sum fusion" in md


def test_single_run_report(compare_dir: Path, tmp_path: Path) -> None:
    report = build_report(compare_dir / "runs" / "concat" / "joint" / "seed1", tmp_path)
    assert report.kind == "run"
    assert len(report.tables) == 1 and len(report.figures) == 2
    page = _check_page(report)
    assert "joint" in page.cells
    _check_markdown(report)


def test_rebuild_drops_stale_figures(compare_dir: Path, tmp_path: Path) -> None:
    stale = tmp_path / FILES_DIR / "old.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"not a figure of this report")
    build_report(compare_dir / "runs" / "concat" / "miles" / "seed0", tmp_path)
    assert not stale.exists()


def test_compare_report_reads_only_its_methods(compare_dir: Path, tmp_path: Path) -> None:
    """MILES runs left in the folder by an earlier invocation get no figure when the current
    ``compare.json`` has no MILES rows."""
    folder = tmp_path / "compare"
    shutil.copytree(compare_dir, folder, ignore=shutil.ignore_patterns("report"))
    payload = json.loads((folder / "compare.json").read_text(encoding="utf-8"))
    payload["config"]["methods"] = [m for m in payload["config"]["methods"] if m != "miles"]
    for key in ("rows", "aggregate"):
        payload[key] = [r for r in payload[key] if r["method"] != "miles"]
    (folder / "compare.json").write_text(json.dumps(payload), encoding="utf-8")
    assert list((folder / "runs").glob("*/miles/seed*/result.json"))  # the stale MILES runs
    report = build_report(folder, tmp_path / "out")
    names = [f.path.name for f in report.figures]
    assert names == [f"bars_{f}.png" for f in FUSIONS]  # no dynamics figure
    assert "miles" not in _check_page(report).cells


def test_cli(compare_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="miles")
    add_parser(parser.add_subparsers(dest="command"))
    run = compare_dir / "runs" / "concat" / "joint" / "seed0"
    args = parser.parse_args(["report", str(run), "--out", str(tmp_path / "r")])
    assert run_cli(args) == 0
    assert "run report: 1 tables, 2 figures" in capsys.readouterr().out
    assert (tmp_path / "r" / "report.html").is_file()
    args = parser.parse_args(["report", str(run)])  # default: RUN_DIR/report
    assert args.out is None
    with pytest.raises(SystemExit, match=r"miles report: .* nothing to report"):
        run_cli(parser.parse_args(["report", str(tmp_path / "r")]))


def test_metric_bars_leave_out_missing_values(tmp_path: Path) -> None:
    groups: list[dict[str, Any]] = [
        {"method": "joint", "n": 2, "fused_mean": 0.5, "fused_std": 0.1, "a_mean": 0.4},
        {"method": "unimodal", "n": 2, "fused_mean": float("nan"), "a_mean": 0.6, "a_std": 0.0},
    ]
    path = tmp_path / "b.png"
    drawn = plot_metric_bars(groups, {"fused": "fused", "a": "a head"}, path, title="t", ylabel="y")
    # the unimodal row's NaN fused mean draws no bar (not a zero); every other bar is drawn
    assert drawn == [("joint", "fused"), ("joint", "a"), ("unimodal", "a")]
    with PIL.open(path) as img:
        assert img.format == "PNG" and img.width > 300
    with pytest.raises(ValueError, match="no groups"):
        plot_metric_bars([], {"fused": "fused"}, tmp_path / "c.png", title="t", ylabel="y")


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="Debian `chromium` is not installed (apt-get install chromium): the headless render "
    "check in scripts/check_report_chromium.sh cannot run",
)
def test_chromium_renders_report(compare_report: Report, tmp_path: Path) -> None:
    """The page as Chromium paints it: not blank, every table and embedded plot in the DOM."""
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(compare_report.html_path), str(tmp_path)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"DOM {len(compare_report.tables)} tables" in proc.stdout
    assert f"{len(compare_report.figures)} <img>" in proc.stdout
    assert (tmp_path / "screenshot.png").stat().st_size > 10_000
