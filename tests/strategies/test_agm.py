"""AGM: hand-computed Shapley responses, coefficients, running scores and per-modality gradients."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from miles.models import JointFusionModel
from miles.strategies import StrategyContext, build_strategy
from miles.strategies.agm import (
    AGM,
    agm_coefficients,
    coalitions,
    mono_modal_responses,
    standing,
)
from tests.strategies.stepping import step_context


class Scalar(nn.Module):
    """A parameter-free identity encoder of a 1-d input (``phi(0) = 0``)."""

    out_features = 1

    def forward(self, x: Tensor) -> Tensor:
        return x


def _model() -> JointFusionModel:
    """Fused head ``W = [[1, 0.5], [-1, 0.5]]`` (columns a, v), ``b = (0.2, 0)``."""
    torch.manual_seed(0)
    model = JointFusionModel({"a": Scalar(), "v": Scalar()}, 2, "concat")
    with torch.no_grad():
        model.fused_head.weight.copy_(torch.tensor([[1.0, 0.5], [-1.0, 0.5]]))
        model.fused_head.bias.copy_(torch.tensor([0.2, 0.0]))
    return model


def _batch() -> dict[str, Any]:
    return {
        "inputs": {"a": torch.tensor([[2.0]]), "v": torch.tensor([[1.0]])},
        "lengths": {},
        "target": torch.tensor([0]),
    }


def _ctx(model: JointFusionModel) -> StrategyContext:
    return step_context(model, lr=0.0)  # lr 0: the gradients stay readable after the step


def test_coefficients_by_hand() -> None:
    """s = (0.5, 1.5), running t = (0.8, 1.2), alpha 1: r_a = e, r_v = 1/e, rbar_a = e^0.4,
    rbar_v = e^-0.4, c_a = exp(e^0.4 - e) = 0.293330, c_v = exp(e^-0.4 - 1/e) = 1.353157."""
    scores, running = {"a": 0.5, "v": 1.5}, {"a": 0.8, "v": 1.2}
    now = standing(scores)
    assert now["a"] == pytest.approx(2.718282, abs=1e-6)
    assert now["v"] == pytest.approx(0.367879, abs=1e-6)
    coeffs = agm_coefficients(scores, running, alpha=1.0, cap=10.0)
    assert coeffs["a"] == pytest.approx(0.293330, abs=1e-6)
    assert coeffs["v"] == pytest.approx(1.353157, abs=1e-6)
    # the cap bounds rbar - r inside the exponential
    capped = agm_coefficients(scores, running, alpha=1.0, cap=0.1)
    assert capped["v"] == pytest.approx(math.exp(0.1))
    assert capped["a"] == pytest.approx(0.293330, abs=1e-6)
    assert agm_coefficients(scores, running, alpha=0.0, cap=None) == {"a": 1.0, "v": 1.0}


def test_two_modality_responses_by_hand() -> None:
    """z_a = 2, z_v = 1: f(a,v) = (2.7, -1.5), f(0,v) = (0.7, 0.5), f(a,0) = (2.2, -2.0), so
    m_a = (f(a,v) - f(0,v) + f(a,0)) / 2 = (2.1, -2.0) and m_v = (0.6, 0.5)."""
    model, batch = _model(), _batch()
    strategy, ctx = AGM(), _ctx(model)
    output = ctx.forward(batch)
    values = strategy.coalition_logits(ctx, batch, output)
    a, v = frozenset("a"), frozenset("v")
    torch.testing.assert_close(values[a | v], torch.tensor([[2.7, -1.5]]))
    torch.testing.assert_close(values[v], torch.tensor([[0.7, 0.5]]))
    torch.testing.assert_close(values[a], torch.tensor([[2.2, -2.0]]))
    responses = mono_modal_responses(values, ("a", "v"))
    torch.testing.assert_close(responses["a"], torch.tensor([[2.1, -2.0]]))
    torch.testing.assert_close(responses["v"], torch.tensor([[0.6, 0.5]]))
    assert model.training  # the zeroed passes ran in eval mode and left the mode as it was


def test_three_modality_responses_are_the_authors_urfunny_weights() -> None:
    """``URFunny_net.py``: audio = (AVT - VT + A) / 3 + (AT - V + AV - T) / 6."""
    torch.manual_seed(0)
    names = ("a", "v", "t")
    values = {c: torch.randn(2, 3) for c in coalitions(names)}
    assert len(values) == 7

    def f(*ms: str) -> Tensor:
        return values[frozenset(ms)]

    responses = mono_modal_responses(values, names)
    expected = (f("a", "v", "t") - f("v", "t") + f("a")) / 3 + (
        f("a", "t") - f("v") + f("a", "v") - f("t")
    ) / 6
    torch.testing.assert_close(responses["a"], expected)
    torch.testing.assert_close(sum(responses.values()), f(*names))  # Shapley: they add up


def test_the_step_scales_each_modalitys_gradient_by_its_coefficient() -> None:
    """Label 0: s_a = log(1 + e^-4.1) = 0.016437, s_v = log(1 + e^-0.1) = 0.644397; with running
    scores 0, c_a = exp(1 - e^(s_v - s_a)) = 0.417369, c_v = exp(1 - e^(s_a - s_v)) = 1.594118.
    The fused head's gradient is the joint one times c_a on a's column, c_v on v's, and
    (c_a + c_v) / 2 on the bias (the hooks on m_a and m_v, Sec. (a) 6 of the research note)."""
    c_a, c_v = 0.417369, 1.594118
    model, batch = _model(), _batch()
    strategy, ctx = AGM(alpha=1.0, clip=None), _ctx(model)
    strategy.on_fit_start(ctx)
    strategy.on_epoch_start(ctx, 1)
    strategy.training_step(ctx, batch)
    assert strategy.steps == 1
    assert strategy.running["a"] == pytest.approx(0.016437, abs=1e-6)
    assert strategy.running["v"] == pytest.approx(0.644397, abs=1e-6)
    g = torch.softmax(torch.tensor([2.7, -1.5]), 0) - torch.tensor([1.0, 0.0])
    grad = model.fused_head.weight.grad
    assert grad is not None and model.fused_head.bias.grad is not None
    torch.testing.assert_close(grad[:, 0], c_a * 2 * g, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad[:, 1], c_v * 1 * g, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        model.fused_head.bias.grad, (c_a + c_v) / 2 * g, atol=1e-6, rtol=1e-5
    )
    record = strategy.on_epoch_end(ctx, 1, None, None)  # type: ignore[arg-type]
    assert record["coeff_mean"]["a"] == pytest.approx(c_a, abs=1e-6)
    assert record["response_accuracy"] == {"a": 1.0, "v": 1.0}


def test_running_scores_are_a_mean_over_every_step() -> None:
    """t <- t (i - 1) / i + s / i with i the global step: t_a = 0.8 after two steps, then
    s_a = 0.016437 at step 3 gives 0.8 * 2/3 + 0.016437 / 3."""
    model, batch = _model(), _batch()
    strategy, ctx = AGM(clip=None), _ctx(model)
    strategy.load_state_dict({"running": {"a": 0.8, "v": 1.2}, "steps": 2})
    strategy.on_epoch_start(ctx, 1)
    strategy.training_step(ctx, batch)
    assert strategy.running["a"] == pytest.approx(0.8 * 2 / 3 + 0.016437 / 3, abs=1e-6)
    assert strategy.state_dict()["steps"] == 3


def test_outside_the_window_nothing_is_scaled_but_scores_still_run() -> None:
    model, batch = _model(), _batch()
    strategy, ctx = AGM(modulation_starts=2, modulation_ends=3, clip=None), _ctx(model)
    strategy.on_epoch_start(ctx, 1)
    strategy.training_step(ctx, batch)
    record = strategy.on_epoch_end(ctx, 1, None, None)  # type: ignore[arg-type]
    assert not record["modulation_active"] and record["coeff_mean"] == {"a": 1.0, "v": 1.0}
    assert strategy.steps == 1
    g = torch.softmax(torch.tensor([2.7, -1.5]), 0) - torch.tensor([1.0, 0.0])
    assert model.fused_head.weight.grad is not None
    torch.testing.assert_close(model.fused_head.weight.grad[:, 0], 2 * g)


def test_conditional_clip_bounds_the_encoder_and_fusion_norm() -> None:
    model, batch = _model(), _batch()
    strategy, ctx = AGM(clip=0.01), _ctx(model)
    strategy.on_epoch_start(ctx, 1)
    strategy.training_step(ctx, batch)
    grads = [p.grad for p in model.fusion.parameters() if p.grad is not None]
    norm = torch.sqrt(sum((g**2).sum() for g in grads))  # type: ignore[arg-type]
    assert norm.item() == pytest.approx(0.01, rel=1e-4)
    assert not AGM(clip=10.0).clip_gradients(model)  # below the threshold: untouched


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"alpha": -1.0}, ValueError, "alpha"),
        ({"clip": 0.0}, ValueError, "clip"),
        ({"modulation_starts": 3, "modulation_ends": 2}, ValueError, "modulation_ends"),
        ({"cap": "x"}, TypeError, "cap"),
    ],
)
def test_bad_settings_are_refused(params: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        build_strategy("agm", **params)


def test_multilabel_and_single_modality_are_refused() -> None:
    ctx = _ctx(_model())
    ctx.multilabel = True
    with pytest.raises(ValueError, match="multilabel"):
        AGM().on_fit_start(ctx)
    single = JointFusionModel({"a": Scalar()}, 2)
    with pytest.raises(ValueError, match="at least 2 modalities"):
        AGM().configure_model(single)


def test_coalitions_cover_every_non_empty_subset() -> None:
    names = ("a", "b", "c")
    got = coalitions(names)
    assert got[0] == frozenset(names)
    expected = {frozenset(c) for k in (1, 2, 3) for c in itertools.combinations(names, k)}
    assert set(got) == expected and len(got) == len(expected)
