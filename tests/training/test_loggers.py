"""The trainer's loggers: one flat numeric view per epoch, in CSV and TensorBoard, resumable."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch

from miles.data import collate_multimodal
from miles.models import JointFusionModel
from miles.strategies import build_strategy
from miles.training import Trainer, TrainerConfig
from miles.training.loggers import (
    Logger,
    available_loggers,
    check_loggers,
    epoch_scalars,
    register_logger,
)
from tests.conftest import make_toy_splits
from tests.helpers import interrupted_after


def _fit(out_dir: Path | None, epochs: int, *, resume: bool = False, loggers: Any = None) -> Any:
    data = make_toy_splits(n=(96, 32, 32))
    torch.manual_seed(0)
    model = JointFusionModel(data.build_encoders(8), data.num_classes)
    cfg = TrainerConfig(
        epochs=epochs,
        lr=1e-2,
        batch_size=32,
        progress=False,
        loggers=["csv", "tensorboard"] if loggers is None else loggers,
    )
    trainer = Trainer(
        model,
        build_strategy("miles", tau=0.0),
        cfg,
        out_dir=out_dir,
        collate_fn=collate_multimodal,
    )
    return trainer.fit(data.train, data.val, resume=resume)


def test_epoch_scalars_are_flat_and_named_by_modality(tmp_path: Path) -> None:
    result = _fit(None, 2, loggers=[])
    scalars = epoch_scalars(result.history[1])
    assert all(isinstance(v, float) for v in scalars.values())
    for name in (
        "train/loss",
        "train/loss_strong",
        "val/fused",
        "val/weak",
        "val/loss",
        "lr/strong",
        "lr/weak",
        "lr/shared",
        "miles/u/strong",
        "miles/delta",
        "miles/factor/weak",
        "miles/slowed/strong",
        "miles/lr/strong",
        "selection_score",
        "time/epoch_s",
    ):
        assert name in scalars, name
    decision = result.history[1]["strategy"]["decision"]
    assert scalars["miles/delta"] == decision["delta"]
    assert scalars["lr/strong"] == result.history[1]["lr_strong"]


def test_csv_and_tensorboard_logs_survive_a_resume(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    full = _fit(tmp_path / "full", 3)
    with interrupted_after(2):
        _fit(tmp_path / "part", 3)
    _fit(tmp_path / "part", 3, resume=True)
    tables = {}
    for folder in ("full", "part"):
        with (tmp_path / folder / "metrics.csv").open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert [int(r["epoch"]) for r in rows] == [1, 2, 3], folder  # no epoch twice
        assert float(rows[2]["miles/delta"]) == full.history[2]["strategy"]["decision"]["delta"]
        tables[folder] = [{k: v for k, v in r.items() if k != "time/epoch_s"} for r in rows]
        events = EventAccumulator(str(tmp_path / folder / "tensorboard"))
        events.Reload()
        assert {"miles/delta", "lr/strong", "val/fused"} <= set(events.Tags()["scalars"])
        steps = [e.step for e in events.Scalars("miles/delta")]
        assert sorted(steps) == [1, 2, 3], folder
    assert tables["part"] == tables["full"]


def test_logger_names_are_checked_and_a_logger_can_be_added(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown logger 'mlflow'; available:"):
        TrainerConfig(loggers=["mlflow"])
    with pytest.raises(TypeError, match="loggers must be a list"):
        TrainerConfig(loggers="csv")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="twice"):
        check_loggers(["csv", "csv"])
    with pytest.raises(ValueError, match="write into out_dir"):
        _fit(None, 1, loggers=["csv"])
    seen: list[tuple[int, float]] = []

    @register_logger("test-memory")
    class Memory(Logger):
        def log(self, scalars: Any, step: int) -> None:
            seen.append((step, scalars["val/fused"]))

    assert "test-memory" in available_loggers()
    result = _fit(tmp_path, 2, loggers=["test-memory"])
    assert seen == [(r["epoch"], r["val_fused"]) for r in result.history]
