"""The command line end to end: a 1-epoch ``miles demo`` and ``miles train --config``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from miles.cli import main


def test_demo_one_epoch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--epochs", "1", "--out", str(tmp_path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| fusion | method | fused | audio | image | gap | best_epoch | acted |" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["rows"]) == 6
    assert {(r["fusion"], r["method"]) for r in results["rows"]} == {
        (f, m) for f in ("concat", "sum") for m in ("joint", "joint+aux", "miles")
    }
    for row in results["rows"]:
        assert 0.0 <= row["fused"] <= 1.0 and row["best_epoch"] == 1
        assert row["gap"] == pytest.approx(abs(row["audio"] - row["image"]))
        assert (row["acted"] is None) == (row["method"] != "miles")
    # the table printed is the one computed in this run
    assert results["table_markdown"] in printed
    png = tmp_path / "learning_dynamics.png"
    assert (
        png.is_file()
        and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        and png.stat().st_size > 10_000
    )
    # with 1 epoch no MILES decision can change training: acted is 0 and the warning says so
    for fusion in ("concat", "sum"):
        row = next(r for r in results["rows"] if r["fusion"] == fusion and r["method"] == "miles")
        assert row["acted"] == 0
        assert f"MILES never acted in {fusion}/miles" in printed


def test_train_from_yaml_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "run.yaml"
    out = tmp_path / "out"
    config.write_text(
        "dataset: fsdd-mnist\n"
        "dataset_params: {max_train: 100}\n"
        "fusion: concat\n"
        "latent_dim: 16\n"
        "strategy: miles\n"
        "strategy_params: {tau: 0.1, mu: 0.5}\n"
        "trainer: {epochs: 2, lr: 0.003, batch_size: 32}\n"
    )
    assert main(["train", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    first = json.loads((out / "result.json").read_text())
    assert first["epochs_run"] == 2 and first["strategy"]["tau"] == 0.1
    assert "| miles | concat |" in capsys.readouterr().out
    # resuming a finished run trains nothing more and reproduces the result
    assert main(["train", "--config", str(config), "--out", str(out), "--quiet", "--resume"]) == 0
    again = json.loads((out / "result.json").read_text())
    assert again["test"] == first["test"] and again["history"] == first["history"]


def test_bad_cli_input(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="not found"):
        main(["train", "--config", str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: fsdd-mnist\nepochs: 3\n")
    with pytest.raises(ValueError, match="unknown config keys"):
        main(["train", "--config", str(bad)])
    with pytest.raises(SystemExit):
        main(["demo", "--epochs", "0"])
    with pytest.raises(ValueError, match="mu"):
        main(["demo", "--mu", "0", "--out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "fsdd-mnist" in out and "miles" in out and "joint+aux" in out
