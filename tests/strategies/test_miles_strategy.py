"""MILESStrategy's options from the paper: Table VI (training-set metrics) and reset_other."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from miles.data import collate_multimodal
from miles.models import JointFusionModel
from miles.strategies import EvalResult, StrategyContext
from miles.strategies.miles import MILESStrategy
from miles.training import Trainer, TrainerConfig
from miles.training.copies import in_order
from miles.utilization import conditional_utilization
from tests.conftest import make_toy_splits


class _Spy(MILESStrategy):
    """Measures the training part itself after each epoch, the way Table VI's option should."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.measured: list[EvalResult] = []
        self.validation: list[EvalResult] = []

    def on_epoch_end(
        self, ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None
    ) -> dict[str, Any]:
        assert ctx.train_loader is not None
        with torch.random.fork_rng(devices=[]):
            self.measured.append(ctx.evaluate(in_order(ctx.train_loader)))
        self.validation.append(val)
        return super().on_epoch_end(ctx, epoch, val, holdout)


def _fit(strategy: MILESStrategy, epochs: int = 3) -> Any:
    data = make_toy_splits(n=(120, 40, 40))
    torch.manual_seed(0)
    model = JointFusionModel(data.build_encoders(8), data.num_classes)
    cfg = TrainerConfig(epochs=epochs, lr=1e-2, batch_size=32, seed=0, progress=False)
    trainer = Trainer(model, strategy, cfg, collate_fn=collate_multimodal)
    return trainer.fit(data.train, data.val, data.test)


def test_training_set_metrics_drive_the_decisions() -> None:
    spy = _Spy(tau=0.0, metrics="training")
    result = _fit(spy)
    for row, train, val in zip(result.history, spy.measured, spy.validation, strict=True):
        record = row["strategy"]
        assert record["training_metrics"] == {"fused": train.fused, "unimodal": train.unimodal}
        u = conditional_utilization(train.fused, train.unimodal)
        assert record["decision"]["u"] == pytest.approx(u)
        assert train.unimodal != val.unimodal  # another set: the decision is not validation's
    assert spy.describe()["metrics"] == "training"
    assert "metrics" not in MILESStrategy().describe()  # the default stays as it was


def test_training_metrics_need_the_heads_estimator() -> None:
    with pytest.raises(ValueError, match="estimator='heads'"):
        MILESStrategy(metrics="training", estimator="ablation")
    with pytest.raises(ValueError, match="metrics"):
        MILESStrategy(metrics="test")
