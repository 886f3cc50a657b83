"""`miles regime-map` and `miles demo --regime`: options reach the study, mistakes are one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from miles.cli import main


def test_regime_map_builds_the_part_from_the_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import miles.studies.study as study

    seen: dict[str, Any] = {}

    def fake(kind: Any, config: Any, **_options: Any) -> dict[str, Any]:
        seen["config"] = config
        return {}

    monkeypatch.setattr(study, "run_study", fake)
    out = tmp_path / "o"
    argv = [
        "regime-map",
        "--part",
        "estimators",
        "--seeds",
        "2",
        "--workers",
        "1",
        "--epochs",
        "4",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    config = seen["config"]
    assert config.part == "estimators" and config.seeds == [0, 1] and config.workers == 1
    assert config.base.trainer.epochs == 4 and config.base.dataset == "fsdd-mnist-regime"
    assert config.out_dir == str(out)
    assert main(["demo", "--regime", "noise0.5-speed0.1", "--seed", "2", "--out", str(out)]) == 0
    demo = seen["config"]
    assert demo.part == "demo" and demo.seeds == [2] and demo.base.trainer.epochs == 30


def test_mistakes_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["regime-map", "--part", "everything", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert main(["demo", "--regime", "nosuch", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("miles demo: error: no map cell 'nosuch'; cells: [")
    assert main(["regime-map", "--part", "fusions", "--out", str(tmp_path)]) == 2
    assert "run `miles regime-map --part map" in capsys.readouterr().err
