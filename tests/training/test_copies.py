"""train_copy: a side model trained with the run's settings, leaving the run untouched."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import Tensor

from miles.data import collate_multimodal
from miles.models import JointFusionModel
from miles.models.fusion import FusionOutput
from miles.strategies import JointAux, StrategyContext
from miles.training import Trainer, TrainerConfig
from miles.training.copies import train_copy
from tests.conftest import make_toy_splits
from tests.helpers import same_weights, strip_times


def _audio_only(
    losses: Mapping[str, Tensor], output: FusionOutput, batch: Mapping[str, Any]
) -> Tensor:
    return losses["strong"]


class CopyEachEpoch(JointAux):
    """Trains a copy for one epoch at every epoch start and keeps the copies for inspection."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[tuple[JointFusionModel, JointFusionModel]] = []

    def on_epoch_start(self, ctx: StrategyContext, epoch: int) -> None:
        before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
        trained = train_copy(ctx, _audio_only, epochs=1, seed=epoch)
        after = ctx.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), "run's model changed"
        snapshot = train_copy(ctx, _audio_only, epochs=0, seed=epoch)
        self.copies.append((snapshot, trained))


def _fit(strategy: JointAux, epochs: int = 2) -> tuple[Any, JointFusionModel]:
    data = make_toy_splits()
    torch.manual_seed(0)
    model = JointFusionModel(data.build_encoders(16), data.num_classes, "concat")
    config = TrainerConfig(epochs=epochs, seed=0, progress=False)
    trainer = Trainer(model, strategy, config, collate_fn=collate_multimodal)
    return trainer.fit(data.train, data.val, data.test), model


def test_copies_leave_the_run_exactly_as_without_them() -> None:
    reference, ref_model = _fit(JointAux())
    strategy = CopyEachEpoch()
    with_copies, model = _fit(strategy)
    assert strip_times(with_copies.history) == strip_times(reference.history)
    assert same_weights(model, ref_model)
    assert len(strategy.copies) == 2


def test_a_copy_trains_only_what_its_loss_reaches() -> None:
    strategy = CopyEachEpoch()
    _fit(strategy, epochs=1)
    snapshot, trained = strategy.copies[0]
    start, end = snapshot.state_dict(), trained.state_dict()
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert changed, "the copy did not train"
    assert all(k.startswith(("encoders.strong.", "heads.strong.")) for k in changed), changed


def test_the_copy_is_seeded() -> None:
    a, b = CopyEachEpoch(), CopyEachEpoch()
    _fit(a, epochs=1)
    _fit(b, epochs=1)
    assert same_weights(a.copies[0][1], b.copies[0][1])


def test_train_copy_needs_an_optimizer_factory() -> None:
    data = make_toy_splits()
    model = JointFusionModel(data.build_encoders(4), data.num_classes, "concat")
    ctx = StrategyContext(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.device("cpu"),
        1,
        False,
        "accuracy",
        lambda _: None,  # type: ignore[arg-type,return-value]
    )
    with pytest.raises(ValueError, match="make_optimizer"):
        train_copy(ctx, _audio_only, epochs=1, seed=0)
    with pytest.raises(ValueError, match="epochs"):
        train_copy(ctx, _audio_only, epochs=-1, seed=0)
