"""`miles report`: self-contained HTML + markdown for every study kind (run, demo, compare,
ablate, sweep), found by the ``kind`` its JSON records (old folders by file name).

The runs are tiny (FSDD-MNIST with 60 training pairs, 2 epochs, latent 8) and built once per module:
what is checked is the page, not the numbers on it.
"""

from __future__ import annotations

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
from miles.cli import main
from miles.report.document import Document as Report
from miles.report.page import FILES_DIR, build_report, detect_kind, find_studies
from miles.report.plots import plot_metric_bars
from miles.studies.ablate import AblateConfig, run_ablation
from miles.studies.compare import CompareConfig, run_compare
from miles.studies.config import quiet_base
from miles.studies.demo import DemoConfig, run_demo
from miles.studies.sweep import SweepConfig, run_sweep

PIL = pytest.importorskip("PIL.Image")
_REAL_BUILD = miles.data.build_dataset
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check_report_chromium.sh"
METHODS = ["joint", "joint+aux", "miles", "unimodal"]
FUSIONS = ["concat"]  # one fusion keeps the file fast; the demo report covers two
SEEDS = [0, 1]
quiet = {"echo": lambda _m: None}
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


def _base(epochs: int = 2) -> Any:
    return dataclasses.replace(
        quiet_base(epochs=epochs), dataset_params={"max_train": 60}, latent_dim=8
    )


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory: pytest.TempPathFactory, small_data: None) -> Path:
    out = tmp_path_factory.mktemp("compare")
    config = CompareConfig(
        base=_base(), methods=METHODS, fusions=FUSIONS, seeds=SEEDS, out_dir=str(out)
    )
    run_compare(config, **quiet)
    return out


@pytest.fixture(scope="module")
def compare_report(compare_dir: Path) -> Report:
    return build_report(compare_dir)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory, small_data: None) -> Path:
    """``miles demo`` trains on the full dataset; the small one is enough for a report."""
    out = tmp_path_factory.mktemp("demo")
    config = DemoConfig(
        base=dataclasses.replace(_base(), dataset="fsdd-mnist", dataset_params={}),
        fusions=["concat", "sum"],
        methods=["joint", "miles"],
        out_dir=str(out),
    )
    run_demo(config, **quiet)
    return out


@pytest.fixture(scope="module")
def ablate_dir(tmp_path_factory: pytest.TempPathFactory, small_data: None) -> Path:
    """A tau and a mu ablation sharing one folder (and its runs)."""
    out = tmp_path_factory.mktemp("ablate")
    base = dataclasses.replace(_base(epochs=1), dataset="fsdd-mnist")
    for param, values in (("tau", [0.0]), ("mu", [1.0])):
        config = AblateConfig(base=base, param=param, values=values, seeds=[0], out_dir=str(out))
        run_ablation(config, **quiet)
    return out


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory, small_data: None) -> Path:
    out = tmp_path_factory.mktemp("sweep")
    config = SweepConfig(base=_base(epochs=1), trials=2, rerun_seeds=1, out_dir=str(out))
    run_sweep(config, **quiet)
    return config.study_dir


def test_detect_kind(compare_dir: Path, demo_dir: Path, tmp_path: Path) -> None:
    assert detect_kind(compare_dir) == "compare"
    assert detect_kind(demo_dir) == "demo"
    assert detect_kind(compare_dir / "runs" / "concat" / "miles" / "seed0") == "run"
    assert detect_kind(compare_dir / "compare.json") == "compare"
    with pytest.raises(FileNotFoundError, match="nothing to report"):
        detect_kind(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a folder nor a file"):
        detect_kind(tmp_path / "missing")
    (tmp_path / "other.json").write_text('{"kind": "spreadsheet"}', encoding="utf-8")
    with pytest.raises(ValueError, match="not a study file"):
        detect_kind(tmp_path / "other.json")


def test_kind_wins_over_the_file_name(compare_dir: Path, tmp_path: Path) -> None:
    """A study is recognised by its ``kind``, whatever the file is called."""
    payload = (compare_dir / "compare.json").read_text(encoding="utf-8")
    (tmp_path / "my-comparison.json").write_text(payload, encoding="utf-8")
    assert find_studies(tmp_path) == [(tmp_path / "my-comparison.json", "compare")]


def _decision_tables(report: Report) -> list[Any]:
    return [t for t in report.tables if "decision for next epoch" in t.columns]


def test_compare_report(compare_dir: Path, compare_report: Report) -> None:
    assert compare_report.kind == "compare"
    assert compare_report.html_path == compare_dir / "report" / "report.html"
    # one Table II per fusion, the all-runs table, a decision table per MILES run (MILES runs
    # with both reset_other readings)
    assert len(_decision_tables(compare_report)) == len(FUSIONS) * len(SEEDS) * 2
    assert len(compare_report.tables) == len(FUSIONS) + 1 + len(FUSIONS) * len(SEEDS) * 2
    # per fusion: the bar chart, and MILES' learning dynamics (all seeds in one figure)
    names = sorted(f.path.name for f in compare_report.figures)
    dynamics = [f"dynamics_{f}_{m}.png" for f in FUSIONS for m in ("miles", "miles_reset_other")]
    assert names == sorted([f"bars_{f}_fusion.png" for f in FUSIONS] + dynamics)
    page = _check_page(compare_report)
    rows = ["joint", "joint+aux", "miles", "miles (reset_other)", "unimodal"]
    for table in compare_report.tables[: len(FUSIONS)]:  # a row per method, in the asked order
        assert [row[0] for row in table.rows] == rows
    assert set(METHODS) <= set(page.cells)
    assert "audio head (dominant)" in page.cells or "image head (dominant)" in page.cells
    assert any("±" in c for c in page.cells)
    md = _check_markdown(compare_report)
    assert "## concat fusion" in md and "| joint+aux | yes |" in md
    assert "gap = " in md and "(signed" in md
    # the page shows what compare.md shows: the same table, cell for cell
    own = (compare_dir / "compare.md").read_text(encoding="utf-8")
    first = compare_report.tables[0]
    for row in first.rows:
        assert "| " + " | ".join(row) + " |" in own


def test_decision_table_matches_the_history(compare_dir: Path, compare_report: Report) -> None:
    result = json.loads(
        (compare_dir / "runs" / "concat" / "miles" / "seed0" / "result.json").read_text()
    )
    table = next(t for t in _decision_tables(compare_report) if "seed 0" in t.caption)
    assert [r[0] for r in table.rows] == [str(row["epoch"]) for row in result["history"]]
    for row, hist in zip(table.rows, result["history"], strict=True):
        decision = hist["strategy"]["decision"]
        if decision is None:
            continue
        assert row[table.columns.index("u audio")] == f"{decision['u']['audio']:+.3f}"
        assert row[table.columns.index("delta")] == f"{decision['delta']:.3f}"
        assert row[table.columns.index("lr audio")] == f"{hist['lr_audio']:.3g}"


def test_demo_report(demo_dir: Path, tmp_path: Path) -> None:
    report = build_report(demo_dir, tmp_path / "out")
    assert report.kind == "demo"
    assert report.html_path == tmp_path / "out" / "report.html"
    titles = [s.title for s in report.sections]
    assert titles == [
        "Results",
        "concat fusion",
        "sum fusion",
        "MILES learning dynamics",
        "MILES decisions per epoch",
    ]
    assert len(report.tables) == 1 + 2 and len(report.figures) == 2 + 2
    page = _check_page(report)
    assert page.cells.count("joint") == page.cells.count("miles") == 2
    md = _check_markdown(report)
    assert "## concat fusion" in md and "## sum fusion" in md
    # the demo's own markdown table is the page's results table
    own = (demo_dir / "results.md").read_text()
    assert "| " + " | ".join(report.tables[0].columns) + " |" in own.splitlines()


def test_legacy_demo_folder(demo_dir: Path, tmp_path: Path) -> None:
    """A results.json written before the demo recorded its kind and config still renders."""
    payload = json.loads((demo_dir / "results.json").read_text())
    cfg = payload["config"]
    legacy = {
        "dataset": "fsdd-mnist",
        "epochs": cfg["base"]["trainer"]["epochs"],
        "seed": cfg["base"]["trainer"]["seed"],
        "lr": cfg["base"]["trainer"]["lr"],
        "miles_params": {},
        "rows": payload["rows"],
        "runs": payload["runs"],
    }
    folder = tmp_path / "old-demo"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(legacy), encoding="utf-8")
    report = build_report(folder, tmp_path / "out")
    assert report.kind == "demo"
    assert report.tables[0].rows == build_report(demo_dir, tmp_path / "new").tables[0].rows


def test_legacy_compare_folder(tmp_path: Path) -> None:
    """The measured benchmark folder (written before compare recorded its kind, without its
    runs): the tables come from compare.json alone."""
    report = build_report(ROOT / "benchmarks" / "results" / "fsdd_mnist_compare", tmp_path)
    assert report.kind == "compare"
    assert [s.title for s in report.sections][:2] == ["concat fusion", "sum fusion"]
    assert "miles" in [row[0] for row in report.tables[0].rows]
    _check_page(report)


def test_single_run_report(compare_dir: Path, tmp_path: Path) -> None:
    report = build_report(compare_dir / "runs" / "concat" / "joint" / "seed1", tmp_path)
    assert report.kind == "run"
    assert len(report.tables) == 1 and len(report.figures) == 2  # joint: no decisions
    page = _check_page(report)
    assert "joint" in page.cells
    _check_markdown(report)
    miles_run = build_report(compare_dir / "runs" / "concat" / "miles" / "seed1", tmp_path / "m")
    assert len(_decision_tables(miles_run)) == 1


def test_ablate_report(ablate_dir: Path, tmp_path: Path) -> None:
    """Two ablations in one folder: one page holding both, each with its table and checks."""
    report = build_report(ablate_dir, tmp_path)
    assert report.kind == "ablate"
    titles = [s.title for s in report.sections]
    assert any(t.startswith("miles ablate mu") for t in titles)
    assert any(t.startswith("miles ablate tau") for t in titles)
    md = _check_markdown(report)
    assert "bit-identical to joint+aux in 1/1 seeds" in md  # the mu = 1 check is on the page
    tables = [t for t in report.tables if "MILES acted" in t.columns]
    assert {row[0] for t in tables for row in t.rows} >= {"joint", "joint+aux", "unimodal"}
    assert len(_decision_tables(report)) >= 2
    _check_page(report)


def test_sweep_report(sweep_dir: Path, tmp_path: Path) -> None:
    report = build_report(sweep_dir, tmp_path)
    assert report.kind == "sweep"
    titles = [s.title for s in report.sections]
    assert titles[0].startswith("Best parameters over seeds") and "Trials" in titles
    trials = next(t for t in report.tables if t.columns[0] == "trial")
    assert len(trials.rows) == 2
    assert len(_decision_tables(report)) == 1  # the best trial's one re-run (MILES)
    _check_page(report)
    _check_markdown(report)


def test_rebuild_drops_stale_figures(compare_dir: Path, tmp_path: Path) -> None:
    stale = tmp_path / FILES_DIR / "old.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"not a figure of this report")
    build_report(compare_dir / "runs" / "concat" / "miles" / "seed0", tmp_path)
    assert not stale.exists()


def test_compare_report_reads_only_its_runs(compare_dir: Path, tmp_path: Path) -> None:
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
    assert names == [f"bars_{f}_fusion.png" for f in FUSIONS]  # no dynamics figure
    assert "miles" not in _check_page(report).cells


def test_cli(compare_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = compare_dir / "runs" / "concat" / "joint" / "seed0"
    assert main(["report", str(run), "--out", str(tmp_path / "r")]) == 0
    assert "run report: 1 tables, 2 figures" in capsys.readouterr().out
    assert (tmp_path / "r" / "report.html").is_file()
    assert main(["report", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("miles report: error: ") and "nothing to report" in err


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
