"""``miles demo`` as a study: its table, its warning, resuming, and matplotlib checked first."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import pytest

import miles.training.experiment as experiment
from miles.extras import MissingExtraError
from miles.studies.config import quiet_base
from miles.studies.demo import DemoConfig, run_demo


def _config(tmp_path: Path, **kw: Any) -> DemoConfig:
    base = dataclasses.replace(quiet_base(epochs=2), latent_dim=8)
    return DemoConfig(**({"base": base, "out_dir": str(tmp_path)} | kw))


def test_demo_table_warning_and_resume(
    tmp_path: Path, toy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines: list[str] = []
    shown: list[str] = []
    payload = run_demo(
        _config(tmp_path, miles_params={"tau": 5.0}), data=toy, echo=lines.append, show=shown.append
    )
    assert payload["kind"] == "demo" and len(payload["rows"]) == 6
    assert "6 runs planned, 0 already done, 6 to train" in lines
    order = payload["dominant_order"]  # by the joint runs' heads (no unimodal reference here)
    assert payload["dominant_rule"] == "head under joint training (test)"
    for row in payload["rows"]:
        assert row["gap"] == pytest.approx(row[order[0]] - row[order[-1]])  # signed
        assert (row["acted"] is None) == (row["method"] != "miles")
    # tau = 5 never acts: each MILES run says so, with why
    report = "\n".join(shown)
    for fusion in ("concat", "sum"):
        assert f"warning: MILES never acted in {fusion}/miles (" in report
    assert f"gap = {order[0]} head - {order[-1]} head (signed" in report
    assert (tmp_path / "results.md").read_text() in report
    assert (tmp_path / "learning_dynamics.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        json.loads((tmp_path / "results.json").read_text())["runs"].keys() == payload["runs"].keys()
    )
    # run again into the same folder: every run is read, none trained
    monkeypatch.setattr(experiment, "run_experiment", lambda *a, **k: pytest.fail("trained"))
    again = run_demo(_config(tmp_path, miles_params={"tau": 5.0}), data=toy, echo=lambda _m: None)
    assert again["rows"] == payload["rows"]
    with pytest.raises(ValueError, match="different settings"):
        run_demo(_config(tmp_path, miles_params={"tau": 0.1}), data=toy, echo=lambda _m: None)


def test_matplotlib_is_checked_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    monkeypatch.setattr(experiment, "run_experiment", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(MissingExtraError, match=r"pip install 'miles-lr\[plot\]'"):
        run_demo(_config(tmp_path / "out"), echo=lambda _m: None)
    assert not (tmp_path / "out").exists()


def test_bad_settings_fail_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mu"):
        _config(tmp_path, miles_params={"mu": 0})
    with pytest.raises(ValueError, match="unknown methods"):
        _config(tmp_path, methods=["joint", "magic"])
