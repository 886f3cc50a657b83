"""PMR: hand-computed prototypes, imbalance ratio, rebalancing weights and entropy term."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from miles.data import collate_multimodal
from miles.models import JointFusionModel
from miles.strategies import StrategyContext, build_strategy
from miles.strategies.pmr import (
    PMR,
    class_means,
    prototype_logits,
    rebalance_coefficients,
    updated_prototypes,
)
from tests.conftest import make_toy_splits

LN2 = math.log(2.0)
RHO = 1 / (1 + math.exp(-2)) / 0.5  # 1.761594


def _prototyped(**params: Any) -> PMR:
    """Modality a's prototypes (0,0) and (2,0); v's (0,0) and (0,2)."""
    strategy = PMR(**params)
    strategy.prototypes = {
        "a": torch.tensor([[0.0, 0.0], [2.0, 0.0]]),
        "v": torch.tensor([[0.0, 0.0], [0.0, 2.0]]),
    }
    return strategy


def _sample() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Label 0, z_a = (0,0) (distances 0 and 2), z_v = (0,1) (distances 1 and 1)."""
    return {"a": torch.tensor([[0.0, 0.0]]), "v": torch.tensor([[0.0, 1.0]])}, torch.tensor([0])


def test_prototype_classifier_and_ratio_by_hand() -> None:
    """p_a(0) = 1 / (1 + e^-2) = 0.880797, p_v(0) = 0.5, so rho = s_a / s_v = 1.761594."""
    latents, target = _sample()
    strategy = _prototyped(alpha=1.0)
    p_a = torch.softmax(prototype_logits(latents["a"], strategy.prototypes["a"]), dim=1)
    assert p_a[0, 0].item() == pytest.approx(0.880797, abs=1e-6)
    _, coeffs, scores = strategy.rebalancing_loss(latents, target)
    assert scores["a"] / scores["v"] == pytest.approx(1.761594, abs=1e-6)
    assert coeffs == {"a": 0.0, "v": 1.0}  # the code's rule: alpha for the weaker modality


@pytest.mark.parametrize(
    ("rule", "weight"),
    [("code", 1.0), ("paper", RHO - 1)],  # paper: clip(rho - 1, 0, 1)
)
def test_the_added_loss_is_the_weaker_modalitys_prototypical_ce(rule: str, weight: float) -> None:
    """PCE_v = CE(-(1, 1), 0) = ln 2: the loss adds alpha * ln 2 (code) or
    alpha * 0.761594 * ln 2 (paper); the stronger modality adds nothing."""
    latents, target = _sample()
    extra, coeffs, _ = _prototyped(alpha=2.0, rule=rule).rebalancing_loss(latents, target)
    assert coeffs["a"] == 0.0 and coeffs["v"] == pytest.approx(2.0 * weight)
    assert extra is not None
    assert extra.item() == pytest.approx(2.0 * weight * LN2, abs=1e-6)
    assert pytest.approx(0.761594, abs=1e-6) == RHO - 1


def test_coefficient_rules_for_either_side_and_ties() -> None:
    assert rebalance_coefficients({"a": 1.0, "v": 2.0}, 1.0, "paper") == {"a": 1.0, "v": 0.0}
    assert rebalance_coefficients({"a": 1.0, "v": 1.5}, 1.0, "paper")["a"] == pytest.approx(0.5)
    assert rebalance_coefficients({"a": 1.0, "v": 1.0}, 1.0, "code") == {"a": 0.0, "v": 0.0}
    assert rebalance_coefficients({"a": 0.0, "v": 1.0}, 0.5, "paper") == {"a": 0.5, "v": 0.0}
    three = rebalance_coefficients({"a": 3.0, "b": 1.0, "c": 2.0}, 1.0, "paper")
    assert three == {"a": 0.0, "b": pytest.approx(1.0), "c": pytest.approx(0.0)}


def test_entropy_regularisation_slows_the_stronger_modality() -> None:
    """PER (Eq. 13): with v the weaker (weight gamma = 1), subtract mu * gamma * H(p_a), and
    H(p_a) = H(0.880797, 0.119203) = 0.365334."""
    latents, target = _sample()
    strategy = _prototyped(alpha=1.0, per_weight=0.1)
    strategy._epoch = 1
    extra, _, _ = strategy.rebalancing_loss(latents, target)
    assert extra is not None
    assert extra.item() == pytest.approx(LN2 - 0.1 * 0.365334, abs=1e-6)
    strategy = _prototyped(alpha=1.0, per_weight=0.1, per_epochs=1)
    strategy._epoch = 2  # after E_r: no entropy term
    extra, _, _ = strategy.rebalancing_loss(latents, target)
    assert extra is not None and extra.item() == pytest.approx(LN2, abs=1e-6)


def test_prototype_momentum_and_missing_classes() -> None:
    """Eq. 12 with epsilon = 0.5: old (0, 0) and new (1, 1) give (0.5, 0.5)."""
    new = torch.tensor([[1.0, 1.0], [4.0, 4.0]])
    old = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    counts = torch.tensor([3.0, 0.0])  # class 1 is missing from the subset: it keeps (2, 2)
    got = updated_prototypes(new, counts, old, 0.5, torch.zeros(2))
    torch.testing.assert_close(got, torch.tensor([[0.5, 0.5], [2.0, 2.0]]))
    first = updated_prototypes(new, counts, None, 0.5, torch.tensor([9.0, 9.0]))
    torch.testing.assert_close(first, torch.tensor([[1.0, 1.0], [9.0, 9.0]]))
    means, n = class_means(
        torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]]), torch.tensor([0, 0, 2]), 3
    )
    torch.testing.assert_close(means, torch.tensor([[2.0, 1.0], [0.0, 0.0], [5.0, 5.0]]))
    assert n.tolist() == [2.0, 0.0, 1.0]


def _ctx(model: JointFusionModel, data: Any) -> StrategyContext:
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(7)
    loader = DataLoader(
        data.train, batch_size=16, shuffle=True, generator=generator, collate_fn=collate_multimodal
    )
    return StrategyContext(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        device=torch.device("cpu"),
        epochs=2,
        multilabel=False,
        metric="accuracy",
        evaluate=lambda loader: None,
        train_loader=loader,  # type: ignore[arg-type,return-value]
    )


def test_epoch_start_takes_class_means_over_a_seeded_training_subset() -> None:
    data = make_toy_splits(n=(40, 8, 8))
    torch.manual_seed(0)
    model = JointFusionModel(data.build_encoders(4), data.num_classes)
    ctx = _ctx(model, data)
    assert ctx.train_loader is not None
    before = ctx.train_loader.generator.get_state()  # type: ignore[union-attr]
    strategy = PMR(subset=1.0)  # the whole training set: the prototypes are the class means
    strategy.on_epoch_start(ctx, 1)
    whole = collate_multimodal([data.train[i] for i in range(len(data.train))])
    with torch.no_grad():
        latents = model.encode(whole["inputs"])
    target = whole["target"]
    for m in data.modalities:
        expected, _ = class_means(latents[m], target, data.num_classes)
        torch.testing.assert_close(strategy.prototypes[m], expected)
    assert torch.equal(ctx.train_loader.generator.get_state(), before)  # type: ignore[union-attr]
    assert model.training
    tenth = PMR()
    assert len(tenth.subset_loader(ctx, 1).dataset) == 4  # type: ignore[arg-type]
    first = tenth.subset_loader(ctx, 1).dataset.indices  # type: ignore[attr-defined]
    assert tenth.subset_loader(ctx, 1).dataset.indices == first  # type: ignore[attr-defined]
    assert tenth.subset_loader(ctx, 2).dataset.indices != first  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"rule": "exact"}, ValueError, "rule"),
        ({"momentum": 1.0}, ValueError, "momentum"),
        ({"subset": 0.0}, ValueError, "subset"),
        ({"per_epochs": 0}, ValueError, "per_epochs"),
    ],
)
def test_bad_settings_are_refused(params: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        build_strategy("pmr", **params)


def test_three_modalities_refuse_the_entropy_term() -> None:
    data = make_toy_splits(("a", "b", "c"), (0.3, 0.5, 1.0), n=(8, 4, 4))
    model = JointFusionModel(data.build_encoders(4), data.num_classes)
    with pytest.raises(ValueError, match="two modalities"):
        PMR(per_weight=0.1).configure_model(model)
    PMR().configure_model(model)


def test_prototype_accuracy_reads_the_validation_latents() -> None:
    from miles.strategies.base import EvalResult

    latents, target = _sample()  # a is nearest its class-0 prototype; v is a tie (argmax: 0)
    latents["v"] = torch.tensor([[0.0, 1.5]])  # now nearer v's class-1 prototype: wrong
    val = EvalResult(fused=0.0, unimodal={}, loss=0.0, latents=latents, target=target)
    assert _prototyped().prototype_accuracy(val) == {"a": 1.0, "v": 0.0}
    assert _prototyped().prototype_accuracy(EvalResult(0.0, {}, 0.0)) == {}
