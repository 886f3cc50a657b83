"""ReconBoost: the hand-computed reconcilement loss, the stage/phase alternation, ensemble
membership and what each phase trains."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from miles.models.fusions import BoostedSumFusion
from miles.strategies import StrategyContext, build_strategy
from miles.strategies.reconboost import (
    BOOST,
    RECTIFY,
    ReconBoost,
    boosting_loss,
    ensemble_members,
    schedule,
)
from tests.strategies.stepping import random_batch, small_model, step_context

LN3 = math.log(3.0)


def test_boosting_loss_by_hand() -> None:
    """C = 3, y = 0, the others' logits (1, 0, 0): q_y = e / (e + 2) = 0.576117; this learner's
    logits 0: log p_y = -ln 3, so L = (5 - 0.576117) ln 3 / 3 = 1.620044 (an effective CE weight of
    1.474628). With no ensemble yet q_y = 1: L = (5 - 1) ln 3 / 3."""
    logits, target = torch.zeros(1, 3), torch.tensor([0])
    others = torch.tensor([[1.0, 0.0, 0.0]])
    got = boosting_loss(logits, others, target, weight1=5.0, weight2=1.0)
    assert got.item() == pytest.approx(1.620044, abs=1e-6)
    assert (got / LN3).item() == pytest.approx(1.474628, abs=1e-6)  # L / CE
    alone = boosting_loss(logits, None, target, weight1=5.0, weight2=1.0)
    assert alone.item() == pytest.approx(4 * LN3 / 3, abs=1e-6)


def test_schedule_alternates_boosting_and_rectification_per_modality() -> None:
    """M = 2 over 16 epochs: a boosted x4, rectified x4, then v boosted x4, rectified x4."""
    phases = [schedule(e, ("a", "v"), 4, 4) for e in range(1, 18)]
    labels = [f"{p.modality}:{p.kind}" for p in phases]
    expected = (
        ["a:boost"] * 4 + ["a:rectify"] * 4 + ["v:boost"] * 4 + ["v:rectify"] * 4 + ["a:boost"]
    )
    assert labels == expected
    assert [e for e, p in enumerate(phases, 1) if p.first_epoch] == [1, 5, 9, 13, 17]
    assert [p.stage for p in phases[::4]] == [0, 0, 1, 1, 2]


def test_learners_join_the_ensemble_after_their_first_boosting_phase() -> None:
    names = ("a", "v")
    members = [ensemble_members(schedule(e, names, 1, 1), names) for e in range(1, 6)]
    assert members == [[], ["a"], ["a"], ["a", "v"], ["a", "v"]]


def _setup() -> tuple[ReconBoost, StrategyContext, dict[str, Any]]:
    model = small_model()
    strategy = ReconBoost(boost_epochs=1, rectify_epochs=1)
    strategy.configure_model(model)
    return strategy, step_context(model, momentum=0.9), random_batch()


def _has_grad(module: torch.nn.Module) -> bool:
    return any(p.grad is not None for p in module.parameters())


def test_each_phase_trains_what_the_authors_train() -> None:
    strategy, ctx, batch = _setup()
    model = ctx.model
    fusion = model.fusion
    assert isinstance(fusion, BoostedSumFusion)
    strategy.on_epoch_start(ctx, 1)  # a boosted: only encoder a and the shared head learn
    assert strategy.phase is not None and strategy.phase.kind == BOOST
    assert fusion.member_names() == []
    strategy.training_step(ctx, batch)
    assert _has_grad(model.encoders["a"]) and _has_grad(fusion.head)
    assert not _has_grad(model.encoders["v"]) and fusion.boost_rate.grad is None
    assert ctx.optimizer.state  # momentum buffers exist
    strategy.on_epoch_start(ctx, 2)  # a rectified: the ensemble {a}, boost_rate learns
    assert not ctx.optimizer.state  # a fresh optimizer state for the new phase
    assert strategy.phase is not None and strategy.phase.kind == RECTIFY
    assert fusion.member_names() == ["a"]
    out = strategy.training_step(ctx, batch)
    assert fusion.boost_rate.grad is not None and _has_grad(model.encoders["a"])
    assert not _has_grad(model.encoders["v"])  # not in the ensemble yet
    assert set(out.losses) == {"fused", "a", "v"}
    torch.testing.assert_close(out.loss, out.losses["fused"])
    record = strategy.on_epoch_end(ctx, 2, None, None)  # type: ignore[arg-type]
    assert record["phase"] == RECTIFY and record["members"] == ["a"]


def test_settings_and_requirements() -> None:
    with pytest.raises(ValueError, match="boost_epochs"):
        build_strategy("reconboost", boost_epochs=0)
    with pytest.raises(ValueError, match="weight2"):
        build_strategy("reconboost", weight2=-1.0)
    strategy, ctx, batch = _setup()
    with pytest.raises(RuntimeError, match="on_epoch_start was not called"):
        strategy.training_step(ctx, batch)
    ctx.multilabel = True
    with pytest.raises(ValueError, match="multilabel"):
        strategy.on_fit_start(ctx)
