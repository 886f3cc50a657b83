"""LFM (heuristic schedule, InfoNCE matching) and CML (confidence ranking over removal levels):
hand-computed weights, losses and penalties."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from miles.models import JointFusionModel
from miles.models.encoders import MLPEncoder
from miles.models.losses import head_losses
from miles.strategies import build_strategy
from miles.strategies.cml import CML, ranking_penalty
from miles.strategies.lfm import LFM, heuristic_alpha, matching_loss


# -- LFM -------------------------------------------------------------------------------------------
def test_heuristic_schedule_by_hand() -> None:
    # 1 - e^-1 = 0.632121, 1 - e^-1/2 = 0.393469, 1 - e^-1/10 = 0.095163
    assert heuristic_alpha(1) == pytest.approx(0.632121, abs=1e-6)
    assert heuristic_alpha(2) == pytest.approx(0.393469, abs=1e-6)
    assert heuristic_alpha(10) == pytest.approx(0.095163, abs=1e-6)
    with pytest.raises(ValueError, match="epoch counts from 1"):
        heuristic_alpha(0)
    assert LFM(alpha=0.3).weight(1) == 0.3


def test_matching_loss_by_hand() -> None:
    # two pairs with cosine matrix [[1, 0], [0, 1]]: each row and column loses log(1 + e^(-1/tau))
    eye = torch.eye(2)
    assert float(matching_loss(eye, 3 * eye, 1.0)) == pytest.approx(math.log1p(math.exp(-1)))
    assert float(matching_loss(eye, eye, 1.0)) == pytest.approx(0.313262, abs=1e-6)
    assert float(matching_loss(eye, eye, 0.5)) == pytest.approx(0.126928, abs=1e-6)
    # asymmetric case: rows of first (1, 0), (1, 1) vs second (1, 0), (0, 1); cos matrix
    # [[1, 0], [1/sqrt2, 1/sqrt2]]: rows -> log(1 + e^-1) and log 2; columns -> log(1 + e^(1/sqrt2
    # - 1)) and log(1 + e^(-1/sqrt2)); the loss is their mean
    first = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    r = 1 / math.sqrt(2)
    rows = math.log1p(math.exp(-1)) + math.log(2)
    cols = math.log1p(math.exp(r - 1)) + math.log1p(math.exp(-r))
    assert float(matching_loss(first, eye, 1.0)) == pytest.approx((rows + cols) / 4)


def _model(names: tuple[str, ...] = ("a", "b")) -> JointFusionModel:
    torch.manual_seed(0)
    return JointFusionModel({m: MLPEncoder(3, 2, hidden=(4,)) for m in names}, 3)


def test_lfm_loss_mixes_the_fused_loss_and_matching() -> None:
    model = _model()
    strategy = LFM(alpha=0.25, temperature=0.5)
    strategy.configure_model(model)
    strategy.on_epoch_start(None, 1)  # type: ignore[arg-type]
    out = model({"a": torch.randn(4, 3), "b": torch.randn(4, 3)})
    losses = head_losses(out, torch.tensor([0, 1, 2, 0]))
    got = strategy.loss(losses, out, {})
    mm = matching_loss(out.latents["a"], out.latents["b"], 0.5)
    expected = 0.75 * losses["fused"] + losses["a"] + losses["b"] + 0.25 * mm
    assert float(got.detach()) == pytest.approx(float(expected.detach()))
    three = _model(("a", "b", "c"))
    with torch.no_grad():
        out3 = three({m: torch.randn(4, 3) for m in ("a", "b", "c")})
    pairs = [("a", "b"), ("a", "c"), ("b", "c")]
    mean = sum(float(matching_loss(out3.latents[x], out3.latents[y], 0.4)) for x, y in pairs) / 3
    assert float(LFM().matching(out3.latents)) == pytest.approx(mean, rel=1e-6)


# -- CML -------------------------------------------------------------------------------------------
def test_ranking_penalty_by_hand() -> None:
    # confidence full (0.9, 0.6), one modality removed (0.7, 0.9); label 0 for both samples;
    # full prediction right for sample 1 only, reduced prediction right for sample 1 only:
    #   trick 1: sample 1 relu(0.7 - 0.9) = 0; sample 2 gated off -> 0
    #   trick 2: sample 2 is wrong at both levels: relu(0.9 - 0.6) = 0.3  -> total 0.3
    # (BalanceBenchmark: max(0, (0.7 - 0.9) + (0.9 - 0.6)) = 0.1)
    full = torch.tensor([0.9, 0.6], requires_grad=True)
    reduced = torch.tensor([0.7, 0.9], requires_grad=True)
    preds = [torch.tensor([0, 1]), torch.tensor([0, 1])]
    target = torch.tensor([0, 0])
    rank = ranking_penalty([full, reduced], preds, target, 0.0)
    assert float(rank.detach()) == pytest.approx(0.3)
    rank.backward()
    assert full.grad is not None and full.grad.tolist() == [0.0, 0.0]  # trick 2 is one-sided
    assert reduced.grad is not None and reduced.grad.tolist() == [0.0, 1.0]
    margin = ranking_penalty([full, reduced], preds, target, 0.1)
    assert float(margin.detach()) == pytest.approx(0.2)


def _cml(model: JointFusionModel, **params: Any) -> CML:
    strategy = CML(**params)
    strategy.configure_model(model)
    ctx: Any = SimpleNamespace(model=model, multilabel=False, data=SimpleNamespace(seed=0))
    strategy.on_fit_start(ctx)
    return strategy


def test_removal_levels_are_nested_random_orders_per_sample() -> None:
    strategy = _cml(_model(("a", "b", "c")))
    masks = strategy.removal_masks(64, 3)
    assert [int(m.sum()) for m in masks] == [192, 128, 64]  # 3, 2, 1 modality kept per sample
    assert all(bool((masks[k + 1] <= masks[k]).all()) for k in range(2))
    assert len({tuple(row.tolist()) for row in masks[2]}) == 3  # each modality kept alone somewhere


def test_cml_loss_averages_the_levels_and_adds_the_penalty() -> None:
    model = _model()
    strategy = _cml(model, weight=0.5)
    x = {"a": torch.randn(6, 3), "b": torch.randn(6, 3)}
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    out = model(x)
    losses = head_losses(out, target)
    state = strategy.state_dict()
    got = strategy.loss(losses, out, {"target": target})
    # redo the same draw by hand: level 1 zeroes each sample's first modality in its order
    again = _cml(_model())
    again.load_state_dict(state)
    again.on_fit_start(SimpleNamespace(model=model, multilabel=False, data=SimpleNamespace(seed=0)))
    keep = again.removal_masks(6, 2)[1]
    reduced = model.fused_logits(
        {m: out.latents[m] * keep[:, j : j + 1] for j, m in enumerate("ab")}
    )
    ce = (losses["fused"] + torch.nn.functional.cross_entropy(reduced, target)) / 2
    probs = [torch.softmax(out.fused, 1).max(1), torch.softmax(reduced, 1).max(1)]
    rank = ranking_penalty([p.values for p in probs], [p.indices for p in probs], target, 0.0)
    expected = ce + losses["a"] + losses["b"] + 0.5 * rank
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)


def test_errors() -> None:
    with pytest.raises(ValueError, match="weight must be"):
        build_strategy("cml", weight=-1.0)
    with pytest.raises(ValueError, match="temperature must be"):
        build_strategy("lfm", temperature=0.0)
    with pytest.raises(ValueError, match="alpha must be"):
        build_strategy("lfm", alpha=1.5)
    with pytest.raises(RuntimeError, match="random stream is not started"):
        CML().removal_masks(2, 2)
