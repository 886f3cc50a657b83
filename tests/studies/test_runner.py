"""The one run loop: progress lines with ETA, done markers, diverged runs, the settings check."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

import miles.studies.runner as runner
import miles.training.experiment as experiment
from miles.studies.config import quiet_base
from miles.studies.runner import (
    DONE,
    PlannedRun,
    Progress,
    check_same_settings,
    run_all,
    settings_diff,
)


def _planned(root: Path | None, name: str, **trainer: Any) -> PlannedRun:
    base = dataclasses.replace(quiet_base(epochs=2, **trainer), latent_dim=8, strategy="joint")
    if root is not None:
        base.out_dir = str(root / name)
    return PlannedRun(base, {"method": "joint", "label": name, "seed": 0}, name)


def test_runs_then_reads_finished_runs(
    tmp_path: Path, toy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = [_planned(tmp_path, "a"), _planned(tmp_path, "b")]
    lines: list[str] = []
    batch = run_all(runs, toy, echo=lines.append)
    assert lines[0] == "2 runs planned, 0 already done, 2 to train"
    assert lines[1] == "[1/2] a: training ..."
    assert lines[2].startswith("[1/2] a: test fused ") and "s left)" in lines[2]
    assert lines[4].startswith("[2/2] b: test fused ") and "left" not in lines[4]  # the last
    assert batch.trained == 2 and all(o.result is not None for o in batch.outcomes)
    assert json.loads((tmp_path / "a" / DONE).read_text())["finished"] is True
    row = batch.outcomes[0].row(tmp_path)
    assert row["run_dir"] == "a" and row["label"] == "a" and row["method"] == "joint"

    monkeypatch.setattr(experiment, "run_experiment", lambda *a, **k: pytest.fail("trained"))
    lines.clear()
    again = run_all(runs, toy, echo=lines.append)
    assert lines == [
        "2 runs planned, 2 already done, 0 to train",
        "[1/2] a: done earlier",
        "[2/2] b: done earlier",
    ]
    assert again.trained == 0
    assert [o.result for o in again.outcomes] == [o.result for o in batch.outcomes]


def test_diverged_run_is_recorded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def diverge(*_a: Any, **_k: Any) -> Any:
        raise FloatingPointError("training loss became nan; lower the learning rate")

    monkeypatch.setattr(experiment, "run_experiment", diverge)
    lines: list[str] = []
    (outcome,) = run_all([_planned(tmp_path, "a")], None, echo=lines.append).outcomes
    assert outcome.result is None and outcome.failed.startswith("training loss became nan")
    assert "a: DIVERGED (training loss became nan" in lines[-1]
    assert outcome.row()["failed"] == outcome.failed
    monkeypatch.setattr(experiment, "run_experiment", lambda *a, **k: pytest.fail("re-ran"))
    lines.clear()
    (again,) = run_all([_planned(tmp_path, "a")], None, echo=lines.append).outcomes
    assert again.failed == outcome.failed and not again.trained
    assert lines[-1].startswith("[1/1] a: done earlier (diverged: training loss became nan")


def test_settings_check(tmp_path: Path, toy: Any) -> None:
    run_all([_planned(tmp_path, "a")], toy, echo=lambda _m: None)
    with pytest.raises(
        ValueError,
        match=r"run .*a was started with different settings "
        r"\(differs in \['trainer.lr'\]: trainer.lr 0.001 -> 0.01\)",
    ):
        run_all([_planned(tmp_path, "a", lr=0.01)], toy, echo=lambda _m: None)
    # the device and the progress bars do not change what a run measures
    other = _planned(tmp_path, "a", progress=True)
    other.config.trainer.device = "cpu:0"
    assert run_all([other], toy, echo=lambda _m: None).trained == 0
    # the study-level check: the first call records, a later one compares
    path = tmp_path / "settings.json"
    check_same_settings(path, {"x": {"y": 1}, "z": 2}, what="study")
    check_same_settings(path, {"x": {"y": 1}, "z": 2}, what="study")
    with pytest.raises(ValueError, match=r"study was started with .*\['x.y'\]"):
        check_same_settings(path, {"x": {"y": 2}, "z": 2}, what="study")
    check_same_settings(path, {"x": {"y": 2}, "z": 2}, what="study", ignore=["x.y"])
    assert settings_diff({"a": {"b": 1, "c": 2}}, {"a": {"b": 1}, "d": 3}) == ["a.c", "d"]


def test_in_memory_runs_leave_no_files(tmp_path: Path, toy: Any, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    (outcome,) = run_all([_planned(None, "m")], toy, echo=lambda _m: None).outcomes
    assert outcome.result is not None and outcome.trained
    assert list(tmp_path.iterdir()) == [] and "run_dir" not in outcome.row()


def test_eta_is_elapsed_per_run_times_runs_left(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([100.0, 110.0, 130.0, 160.0])
    monkeypatch.setattr(runner.time, "perf_counter", lambda: next(clock))
    lines: list[str] = []
    progress = Progress(3, lines.append)  # starts at 100
    progress.finished("[1/3] x", "ok", 10.0)  # 10 s for 1 run: 2 left -> ~20 s
    progress.finished("[2/3] y", "ok", 20.0)  # 30 s for 2 runs: 1 left -> ~15 s
    progress.finished("[3/3] z", "ok", 30.0)
    assert lines == [
        "[1/3] x: ok (10.0 s; elapsed 10 s, ~20 s left)",
        "[2/3] y: ok (20.0 s; elapsed 30 s, ~15 s left)",
        "[3/3] z: ok (30.0 s; elapsed 60 s)",
    ]
