"""One hand-made history through every table: compare, ablate, demo and ``miles report`` show
the same signed gap and the same "MILES acted" count, and both are the values by hand.

The MILES run (:func:`tests.handmade.miles_result`) acted in epochs 2 and 3 (the decision after
the last epoch never counts; counting the decisions that slowed a modality would give 1). Its
heads are a 70 and b 80; the joint run's heads rank b first (b 90 > a 60), so the signed gap is
b - a = +10.0 points.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from miles.report.document import Document, Table
from miles.report.page import build_report
from miles.results import RunResult
from miles.studies.ablate import AblateConfig, Ablation
from miles.studies.compare import Compare, CompareConfig
from miles.studies.config import quiet_base
from miles.studies.demo import Demo, DemoConfig
from miles.studies.runner import PlannedRun, RunOutcome
from tests.handmade import joint_result, miles_result

GAP, ACTED = "10.0", "2"


def _rows(root: Path, runs: dict[str, tuple[dict[str, Any], dict[str, Any]]]) -> list[dict]:
    """Write each result where a study would, and make its row the way a study does."""
    rows = []
    for where, (ident, result) in runs.items():
        run_dir = root / where
        run_dir.mkdir(parents=True)
        (run_dir / "result.json").write_text(json.dumps(result), encoding="utf-8")
        planned = PlannedRun(quiet_base(), ident)
        planned.config.out_dir = str(run_dir)
        rows.append(RunOutcome(planned, result).row(root))
    return rows


def _cell(doc: Document, name: str, column: str) -> str:
    """The cell of row ``name`` (matched on any of its first two cells) in the first table with
    ``column``."""
    table: Table = next(t for t in doc.tables if column in t.columns)
    row = next(r for r in table.rows if name in r[:2])
    return row[table.columns.index(column)]


def test_gap_and_acted_are_the_same_everywhere(tmp_path: Path) -> None:
    ident = {"label": "", "fusion": "concat", "seed": 0}
    cmp_dir = tmp_path / "compare"
    cmp_rows = _rows(
        cmp_dir,
        {
            "runs/concat/joint/seed0": ({"method": "joint"} | ident, joint_result()),
            "runs/concat/miles/seed0": ({"method": "miles"} | ident, miles_result()),
        },
    )
    common = {"modalities": ["a", "b"], "metric": "accuracy", "meta": ""}
    compare = {
        "kind": "compare",
        "config": CompareConfig(
            methods=["joint", "miles"], fusions=["concat"], seeds=[0], out_dir=str(cmp_dir)
        ).to_dict(),
        "rows": cmp_rows,
        **common,
    }
    (cmp_dir / "compare.json").write_text(json.dumps(compare), encoding="utf-8")

    abl_dir = tmp_path / "ablate"
    abl_rows = _rows(
        abl_dir,
        {
            "runs/joint/seed0": (ident | {"method": "joint", "label": "joint"}, joint_result()),
            "runs/miles/seed0": (ident | {"method": "miles", "label": "mu=0.5"}, miles_result()),
        },
    )
    config = AblateConfig(param="mu", values=[0.5], seeds=[0], out_dir=str(abl_dir))
    ablate = {"kind": "ablate", "config": config.to_dict(), "rows": abl_rows, **common}
    (abl_dir / "ablate_mu.json").write_text(json.dumps(ablate), encoding="utf-8")

    demo = {
        "kind": "demo",
        "config": DemoConfig(methods=["joint", "miles"], fusions=["concat"]).to_dict(),
        "rows": cmp_rows,
        **common,
    }
    tables = {
        "compare": (Compare.document(compare), "miles"),
        "ablate": (Ablation.document(ablate), "mu=0.5"),
        "demo": (Demo.document(demo), "miles"),
        "report of compare": (build_report(cmp_dir, tmp_path / "r1"), "miles"),
        "report of ablate": (build_report(abl_dir, tmp_path / "r2"), "mu=0.5"),
    }
    for where, (doc, name) in tables.items():
        assert _cell(doc, name, "gap") == GAP, where
        assert _cell(doc, name, "MILES acted") == ACTED, where
        assert _cell(doc, "joint", "gap") == "30.0", where  # b 90 - a 60
    # the stored rows agree too
    for payload in (compare, ablate):
        miles_row = next(r for r in payload["rows"] if r["method"] == "miles")
        assert miles_row["acted"] == 2 and miles_row["acted_epochs"] == [2, 3]


def test_single_run_report_uses_the_same_definitions(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "result.json").write_text(json.dumps(miles_result()), encoding="utf-8")
    doc = build_report(run, tmp_path / "out")
    # one run, no joint or unimodal run: ranked in the modalities' own order, said so
    assert any("modality order" in p and "gap = a head - b head" in p for p in doc.intro)
    assert _cell(doc, "miles", "gap") == "-10.0"
    assert _cell(doc, "miles", "MILES acted") == ACTED
    assert _cell(doc, "miles", "slowed a / b") == "2 / 0"
    decisions = next(t for t in doc.tables if "decision for next epoch" in t.columns)
    assert [r[decisions.columns.index("decision for next epoch")] for r in decisions.rows] == [
        "slowed a",
        "no decision (fused metric 0)",
        "balanced",
        "slowed b",
    ]
    assert [r[decisions.columns.index("lr a")] for r in decisions.rows] == [
        "0.001",
        "0.0005",
        "0.0005",
        "0.001",
    ]
    assert RunResult.from_dict(miles_result()).best_epoch == 3


@pytest.mark.parametrize("mu_one", [True])
def test_mu_one_never_acts_in_any_table(tmp_path: Path, mu_one: bool) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "result.json").write_text(json.dumps(miles_result(mu_one=mu_one)), encoding="utf-8")
    doc = build_report(run, tmp_path / "out")
    assert _cell(doc, "miles", "MILES acted") == "0"
    decisions = next(t for t in doc.tables if "decision for next epoch" in t.columns)
    assert decisions.rows[0][decisions.columns.index("decision for next epoch")] == (
        "slowed a (factor 1)"
    )
