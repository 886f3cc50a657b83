"""Greedy: the hand-computed conditional learning speed, the re-balancing window it triggers, and
the MMTM model it installs."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from miles.models import JointFusionModel
from miles.models.encoders import MLPEncoder
from miles.models.fusions import MMTMFusion
from miles.strategies import StrategyContext, build_strategy
from miles.strategies.greedy import Greedy, learning_speed_gap, speed_ratio
from tests.strategies.stepping import random_batch, small_model, step_context


def test_learning_speed_gap_by_hand() -> None:
    """Bypass ratios (0.02, 0.01), main ratios (0.01, 0.01): BDR_0 = log10 2 = 0.301030, BDR_1 = 0,
    d = 0.301030: branch 0 leans more on the bypass."""
    assert learning_speed_gap((0.02, 0.01), (0.01, 0.01)) == pytest.approx(0.301030, abs=1e-6)
    assert learning_speed_gap((0.01, 0.04), (0.01, 0.01)) == pytest.approx(-math.log10(4))


def test_speed_ratio_sums_squares_over_the_group() -> None:
    a = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # ||theta||^2 = 25
    b = torch.nn.Parameter(torch.tensor([0.0]))
    a.grad = torch.tensor([1.0, 2.0])  # ||g||^2 = 5
    assert speed_ratio([a, b]) == pytest.approx(5 / 25)  # b has no gradient: skipped


def _setup(**params: Any) -> tuple[Greedy, StrategyContext, dict[str, Any]]:
    model = small_model()
    strategy = Greedy(**params)
    strategy.configure_model(model)
    return strategy, step_context(model), random_batch()


def test_a_gap_over_epsilon_starts_a_window_of_rebalancing_steps() -> None:
    """Before ``starting_epoch`` d is tracked and nothing else; then |d| > epsilon makes the next
    ``window`` forwards replace the leaning branch's gate (accumulators paused), and the step after
    them measures d again."""
    strategy, ctx, batch = _setup(epsilon=0.0, window=2, starting_epoch=2)
    fusion = ctx.model.fusion
    assert isinstance(fusion, MMTMFusion)
    strategy.on_epoch_start(ctx, 1)
    strategy.training_step(ctx, batch)
    assert strategy.caring is None and strategy.gap is not None  # epoch 1: locked
    strategy.on_epoch_start(ctx, 2)
    strategy.training_step(ctx, batch)
    assert strategy.gap is not None
    expected = 0 if strategy.gap > 0 else 1
    assert strategy.caring == expected and strategy.steps_left == 2
    accumulated = (list(strategy.bypass), list(strategy.main))
    seen = []
    for _ in range(2):
        strategy.training_step(ctx, batch)
        seen.append(fusion.caring)
    assert seen == [("a", "v")[expected]] * 2  # the forwards ran re-balanced
    assert (strategy.bypass, strategy.main) == accumulated  # paused meanwhile
    assert strategy.caring is None
    strategy.training_step(ctx, batch)  # a regular step: the accumulators move again
    assert strategy.bypass != accumulated[0]
    record = strategy.on_epoch_end(ctx, 2, None, None)  # type: ignore[arg-type]
    assert record["rebalanced_fraction"][("a", "v")[expected]] == pytest.approx(2 / 4)


def test_the_loss_is_the_sum_of_the_branch_losses() -> None:
    strategy, ctx, batch = _setup(epsilon=math.inf)
    strategy.on_epoch_start(ctx, 1)
    out = strategy.training_step(ctx, batch)
    torch.testing.assert_close(out.loss, out.losses["a"] + out.losses["v"])
    assert strategy.caring is None
    assert strategy.describe()["fusion"] == "mmtm"


def test_settings_and_requirements() -> None:
    with pytest.raises(ValueError, match="window"):
        build_strategy("greedy", window=0)
    torch.manual_seed(0)
    three = JointFusionModel({m: MLPEncoder(3, 2) for m in ("a", "b", "c")}, 2)
    with pytest.raises(ValueError, match="exactly 2 modalities"):
        Greedy().configure_model(three)
