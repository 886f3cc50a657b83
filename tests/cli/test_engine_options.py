"""The engine options every training command shares, and torchrun with the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from miles.cli import build_parser, main
from miles.cli.common import base_config

STUDIES = [
    ["demo"],
    ["compare"],
    ["ablate", "--param", "tau", "--values", "0.1"],
    ["sweep", "--method", "miles"],
    ["regime-map"],
]
ENGINE = [
    *("--precision", "bf16-mixed", "--grad-clip-norm", "1.5", "--schedule", "cosine"),
    *("--warmup-epochs", "2", "--num-workers", "3", "--no-pin-memory", "--loader", "dataloader"),
    *("--compile", "--logger", "csv,tensorboard"),
]
EXPECTED = {
    "precision": "bf16-mixed",
    "grad_clip_norm": 1.5,
    "schedule": "cosine",
    "warmup_epochs": 2,
    "num_workers": 3,
    "pin_memory": False,
    "loader": "dataloader",
    "compile": True,
    "loggers": ["csv", "tensorboard"],
}


@pytest.mark.parametrize("argv", STUDIES, ids=lambda a: a[0])
def test_every_study_command_takes_the_engine_options(argv: list[str]) -> None:
    trainer = base_config(build_parser().parse_args([*argv, *ENGINE])).trainer
    assert {k: getattr(trainer, k) for k in EXPECTED} == EXPECTED
    default = base_config(build_parser().parse_args(argv)).trainer
    assert (default.precision, default.schedule, default.loggers) == ("32", "constant", [])
    assert default.pin_memory and not default.compile and default.device == "cpu"


def test_miles_train_overrides_the_config_with_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "run.yaml").write_text(
        "dataset: fsdd-mnist\ntrainer: {epochs: 2, precision: '16-mixed', num_workers: 1}\n",
        encoding="utf-8",
    )
    seen: list[Any] = []

    class Captured(Exception):
        pass

    def capture(config: Any, **_: Any) -> Any:
        seen.append(config)
        raise Captured

    monkeypatch.setattr("miles.training.experiment.run_experiment", capture)
    argv = ["train", "--config", str(tmp_path / "run.yaml"), *ENGINE, "--seed", "4"]
    argv += ["--backend", "gloo", "--find-unused-parameters"]
    with pytest.raises(Captured):
        main(argv)
    trainer = seen[0].trainer
    assert {k: getattr(trainer, k) for k in EXPECTED} == EXPECTED
    assert (trainer.seed, trainer.backend, trainer.find_unused_parameters) == (4, "gloo", True)
    assert trainer.epochs == 2 and trainer.progress is False
    with pytest.raises(Captured):
        main(["train", "--config", str(tmp_path / "run.yaml")])
    kept = seen[1].trainer
    assert (kept.precision, kept.num_workers, kept.find_unused_parameters) == ("16-mixed", 1, None)


def test_a_bad_engine_value_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as usage:  # argparse's own usage error
        main(["compare", "--precision", "fp8", "--out", "x"])
    assert usage.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("miles compare: error: argument --precision: invalid choice: 'fp8'")
    assert main(["compare", "--logger", "mlflow", "--epochs", "1", "--out", "x"]) == 2
    assert "unknown logger 'mlflow'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", STUDIES, ids=lambda a: a[0])
def test_study_commands_refuse_torchrun(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"miles {argv[0]}: error: miles {argv[0]} trains")
    assert "torchrun ... -m miles train" in err[0]
    assert not (tmp_path / "out").exists()
