"""The regime map study: presets, planning, the per-cell aggregate and paired tests, and a tiny
end-to-end run (resumable, reported)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

import miles.training.experiment as experiment
from miles.studies.config import quiet_base
from miles.studies.regime import (
    RegimeConfig,
    demo_config,
    part_config,
    plan_runs,
    run_folder,
    run_regime,
    summarize_regime,
)
from miles.studies.regime_parts import MAP_METHODS, helped_cells, map_cell, map_cells


def test_the_map_preset() -> None:
    config = part_config("map", "out")
    assert len(config.cells) == 12 and [m["label"] for m in config.methods] == [
        "joint",
        "joint+aux",
        "miles tau=0.2",
        "miles tau=0.1",
    ]
    assert config.comparisons == [["miles tau=0.2", "joint+aux"], ["miles tau=0.1", "joint+aux"]]
    assert config.seeds == [0, 1, 2, 3, 4] and config.fixed_epoch == 15 and config.workers == 2
    assert config.stem == "regime_map"
    cell = map_cell("noise0.5-speed0.1")
    assert cell["params"] == {"image_size": 14, "image_noise": 0.5, "image_slowdown": 0.1}
    with pytest.raises(ValueError, match="no map cell 'nosuch'"):
        map_cell("nosuch")
    with pytest.raises(ValueError, match="unknown part"):
        part_config("everything", "out")


def test_plan_shares_the_audio_reference_and_holds_back_reference_aware_runs(
    tmp_path: Path,
) -> None:
    methods = [
        *MAP_METHODS,
        {"label": "ref", "strategy": "miles", "params": {"reference": "unimodal"}},
    ]
    config = RegimeConfig(
        cells=map_cells()[:3], methods=methods, seeds=[0, 1], out_dir=str(tmp_path)
    )
    runs, waiting = plan_runs(config)
    assert len(runs) == 2 * 3 * (2 + 5)
    audio = {str(r.run_dir) for r in runs if r.ident["label"] == "audio"}
    image = {str(r.run_dir) for r in runs if r.ident["label"] == "image"}
    assert len(audio) == 2 and len(image) == 6  # one audio model per seed, shared by the cells
    assert {runs[i].ident["label"] for i in waiting} == {"ref"} and len(waiting) == 6
    first = runs[0]
    assert first.ident == {
        "cell": "noise0-speed1",
        "fusion": "concat",
        "seed": 0,
        "method": "unimodal",
        "label": "audio",
    }


def test_run_folders_ignore_only_what_changes_no_number(tmp_path: Path) -> None:
    base = quiet_base(epochs=2)
    other_seed = dataclasses.replace(base, trainer=dataclasses.replace(base.trainer, seed=3))
    other_lr = dataclasses.replace(base, trainer=dataclasses.replace(base.trainer, lr=0.1))
    a, b, c = (run_folder(tmp_path, "x", e) for e in (base, other_seed, other_lr))
    assert a.parent == b.parent and a.name == "seed0" and b.name == "seed3"
    assert a.parent != c.parent


def test_bad_configs() -> None:
    with pytest.raises(ValueError, match="cell names must be distinct"):
        RegimeConfig(cells=[map_cells()[0]] * 2)
    with pytest.raises(ValueError, match="unknown strategy"):
        RegimeConfig(methods=[{"label": "x", "strategy": "magic"}])
    with pytest.raises(ValueError, match="tau"):
        RegimeConfig(methods=[{"label": "x", "strategy": "miles", "params": {"tau": -1}}])
    with pytest.raises(ValueError, match="comparison"):
        RegimeConfig(comparisons=[["joint", "nope"]])
    with pytest.raises(ValueError, match="fixed_epoch"):
        RegimeConfig(fixed_epoch=99)
    with pytest.raises(ValueError, match="part"):
        RegimeConfig(part="a/b")


def _row(
    cell: str,
    label: str,
    seed: int,
    heads: dict[str, float],
    modalities: tuple[str, ...] = ("audio", "image"),
    **extra: Any,
) -> dict[str, Any]:
    method = "unimodal" if label in ("audio", "image", "image2") else label.split()[0]
    row = {
        "cell": cell,
        "fusion": "concat",
        "method": method,
        "label": label,
        "seed": seed,
        "fused": 0.99,
        "best_epoch": 5,
        "acted": None,
        "fused_last": 0.99,
        "uses_aux_losses": method != "unimodal",
    }
    for m in modalities:
        row[m] = heads.get(m)
        row[f"{m}_last"] = heads.get(m)
        row[f"slowed_{m}"] = None
    return row | extra


def test_the_aggregate_orders_each_cell_by_its_references_and_pairs_seeds() -> None:
    rows = []
    for seed in range(5):
        rows += [
            _row("c", "audio", seed, {"audio": 0.98}, epochs95_audio=2),
            _row("c", "image", seed, {"image": 0.80}, epochs95_image=8),
            _row("c", "joint+aux", seed, {"audio": 0.97, "image": 0.60 + 0.01 * seed}),
            _row(
                "c",
                "miles tau=0.2",
                seed,
                {"audio": 0.96, "image": 0.70 + 0.01 * seed},
                best_epoch=9,
            ),
        ]
    config = RegimeConfig(
        cells=[map_cell("noise0-speed1") | {"name": "c"}],
        methods=[
            {"label": "joint+aux", "strategy": "joint+aux"},
            {"label": "miles tau=0.2", "strategy": "miles"},
        ],
    )
    summary = summarize_regime(rows, config)
    (cell,) = summary.cells
    assert cell["order"] == ["audio", "image"]
    assert cell["unimodal_gap"] == pytest.approx(0.18) and cell["speed_ratio"] == 4.0
    tests = {t["quantity"]: t for t in summary.tests}
    assert tests["weak head"]["mean"] == pytest.approx(0.10) and tests["weak head"]["significant"]
    assert tests["dominant head"]["mean"] == pytest.approx(-0.01)
    assert tests["chosen epoch"]["mean"] == pytest.approx(4.0)
    labels = [a["label"] for a in summary.aggregate]
    assert labels == ["", "joint+aux", "miles tau=0.2"]  # the unimodal row first
    assert summary.aggregate[2]["image_vs_unimodal_mean"] == pytest.approx(0.72 - 0.80)


def test_a_three_modality_cell_keeps_every_modality_when_its_references_are_shared() -> None:
    """The audio and image references are the two-modality map's runs (same model and data): the
    cell's modalities come from its multimodal runs, so the third is not dropped."""
    three = ("audio", "image", "image2")
    rows = []
    for seed in range(5):
        rows += [
            _row("c", "audio", seed, {"audio": 0.98}),  # shared rows: two modalities only
            _row("c", "image", seed, {"image": 0.80}),
            _row("c", "image2", seed, {"image2": 0.90}, modalities=three),
            _row("c", "joint+aux", seed, {"audio": 0.97, "image": 0.6, "image2": 0.8}, three),
        ]
    config = RegimeConfig(
        cells=[map_cell("noise0-speed1") | {"name": "c"}],
        methods=[{"label": "joint+aux", "strategy": "joint+aux"}],
    )
    (cell,) = summarize_regime(rows, config).cells
    assert cell["order"] == ["audio", "image2", "image"]
    assert cell["references"]["image2"] == pytest.approx(0.90)


def test_helped_cells_rule(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run `miles regime-map --part map"):
        helped_cells(tmp_path)

    def test(cell: str, mean: float, significant: bool) -> dict[str, Any]:
        return {
            "cell": cell,
            "quantity": "weak head",
            "a": "miles tau=0.2",
            "b": "joint+aux",
            "mean": mean,
            "significant": significant,
        }

    path = tmp_path / "regime_map.json"
    path.write_text(
        json.dumps(
            {"tests": [test("x", 0.05, True), test("y", 0.09, False), test("z", 0.02, True)]}
        )
    )
    assert helped_cells(tmp_path) == (["x", "z"], helped_cells(tmp_path)[1])
    path.write_text(json.dumps({"tests": [test("x", -0.05, False), test("y", 0.01, False)]}))
    cells, rule = helped_cells(tmp_path)
    assert cells == ["y"] and rule.startswith("no cell had a marked gain")


def test_a_tiny_study_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = quiet_base(epochs=2)
    base.dataset, base.latent_dim = "fsdd-mnist-regime", 8
    cell = map_cell("noise0.5-speed0.1")
    cell["params"]["max_train"] = 40
    config = RegimeConfig(
        base=base,
        cells=[cell],
        methods=[
            {"label": "joint+aux", "strategy": "joint+aux"},
            {"label": "miles tau=0", "strategy": "miles", "params": {"tau": 0.0}},
            {
                "label": "miles ref",
                "strategy": "miles",
                "params": {"tau": 0.0, "reference": "unimodal"},
            },
        ],
        seeds=[0, 1],
        fixed_epoch=1,
        workers=1,
        out_dir=str(tmp_path),
    )
    lines: list[str] = []
    payload = run_regime(config, echo=lines.append, show=lambda _t: None)
    assert payload["kind"] == "regime" and (tmp_path / "regime_map_heatmap.png").is_file()
    assert "8 runs planned (8 distinct)" in lines[0] and "2 runs planned" in " ".join(lines)
    ref_rows = [r for r in payload["rows"] if r["label"] == "miles ref"]
    assert all(r["run_dir"] for r in ref_rows) and len(ref_rows) == 2
    used = json.loads((tmp_path / ref_rows[0]["run_dir"] / "config.json").read_text())
    refs = used["strategy_params"]["references"]
    image_ref = next(r for r in payload["rows"] if r["label"] == "image" and r["seed"] == 0)
    assert set(refs) == {"audio", "image"} and 0 < refs["image"] <= 1
    assert image_ref["method"] == "unimodal"
    miles_row = next(r for r in payload["rows"] if r["label"] == "miles tau=0")
    assert {"image_fixed", "image_probe", "image_probe_last", "epochs95_image"} <= set(miles_row)
    assert {t["a"] for t in payload["tests"]} == {"miles tau=0", "miles ref"}
    md = (tmp_path / "regime_map.md").read_text()
    assert "## Cells" in md and "## Paired comparisons" in md and "regime_map_heatmap.png" in md

    monkeypatch.setattr(experiment, "run_experiment", lambda *a, **k: pytest.fail("trained"))
    again = run_regime(config, echo=lambda _m: None, show=lambda _t: None)
    assert again["tests"] == payload["tests"]

    from miles.report.page import build_report

    doc = build_report(tmp_path)
    assert any(f.path.name == "heatmap.png" for f in doc.figures)


def test_demo_config_is_the_map_cell_for_one_seed() -> None:
    config = demo_config("noise0.5-speed0.1", "out", seed=3)
    assert config.cells == [map_cell("noise0.5-speed0.1") | {"fusion": None}]
    assert config.seeds == [3] and config.methods == part_config("map", "x").methods
    assert config.base == part_config("map", "x").base
