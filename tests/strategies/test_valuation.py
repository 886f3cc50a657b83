"""Sample- and modality-level valuation: hand-computed Shapley values, copies, extra rows, plans."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from miles.data import collate_multimodal
from miles.models import JointFusionModel
from miles.models.encoders import MLPEncoder
from miles.strategies import build_strategy
from miles.strategies.valuation import shapley_values
from miles.strategies.valuation_modality import ModalityValuation, extra_rows
from miles.strategies.valuation_sample import SampleValuation, copies_for_value
from miles.training import Trainer, TrainerConfig
from tests.conftest import make_toy_splits


def _identity_model(names: tuple[str, ...] = ("a", "v")) -> JointFusionModel:
    """Latent = input (2-d); concat head: class c reads unit c of every latent; bias 0."""
    torch.manual_seed(0)
    encoders = {m: MLPEncoder(2, 2, hidden=()) for m in names}
    model = JointFusionModel(encoders, 2)
    with torch.no_grad():
        for enc in encoders.values():
            enc.net[0].weight.copy_(torch.eye(2))
            enc.net[0].bias.zero_()
        model.fused_head.weight.copy_(torch.cat([torch.eye(2)] * len(names), dim=1))
        model.fused_head.bias.zero_()
    return model


# four samples, label 0; logits add up, so each prediction is read off the latents:
#   0: a = (1, 0) right, v = (0, .5) wrong, both (1, .5) right: v = (1, 0, 2) for (a, v, all)
#      -> phi_a = (1 + 2 - 0) / 2 = 1.5, phi_v = (0 + 2 - 1) / 2 = 0.5
#   1: a = (0, 1), v = (0, 1): all wrong -> phi = (0, 0)
#   2: a = (1, 0), v = (1, 0): all right -> phi = ((1 + 2 - 1) / 2, same) = (1, 1)
#   3: a = (1, 0) right, v = (0, 3) wrong, both (1, 3) wrong -> phi_a = (1 + 0 - 0) / 2 = 0.5,
#      phi_v = (0 + 0 - 1) / 2 = -0.5
LAT = {
    "a": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]),
    "v": torch.tensor([[0.0, 0.5], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]]),
}
Y = torch.zeros(4, dtype=torch.long)
PHI = [[1.5, 0.5], [0.0, 0.0], [1.0, 1.0], [0.5, -0.5]]


def test_two_modality_shapley_values_by_hand() -> None:
    assert shapley_values(_identity_model(), LAT, Y).tolist() == PHI


def test_shapley_values_of_three_modalities_add_up_to_the_full_coalition() -> None:
    # efficiency: sum_m phi_m = v(all) - v({}) = 3 * 1[fused prediction right]
    model = _identity_model(("x", "y", "z"))
    g = torch.Generator().manual_seed(0)
    lat = {m: torch.randn(50, 2, generator=g) for m in ("x", "y", "z")}
    y = torch.randint(2, (50,), generator=g)
    phi = shapley_values(model, lat, y)
    right = (model.fused_logits(lat).argmax(1) == y).float()
    assert torch.allclose(phi.sum(dim=1), 3 * right.double())
    # symmetric modalities get equal values: z copies y
    lat["z"] = lat["y"]
    phi = shapley_values(model, lat, y)
    assert torch.allclose(phi[:, 1], phi[:, 2])


def test_copies_follow_the_authors_thresholds() -> None:
    values = torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.5, 0.85, 0.39])
    assert copies_for_value(values).tolist() == [3, 2, 1, 0, 0, 1, 2]


def _ctx(model: JointFusionModel) -> Any:
    return SimpleNamespace(model=model, data=SimpleNamespace(seed=0))


def test_sample_level_plan_repeats_each_sample_with_its_weak_modality_alone() -> None:
    # copies: a (0, 2, 0, 1), v (1, 2, 0, 3) -> a rows 1, 1, 3; v rows 0, 1, 1, 3, 3, 3
    model = _identity_model()
    plan, info = SampleValuation().plan(_ctx(model), torch.tensor(PHI), 5)
    assert plan is not None and info["extra_rows"] == {"a": 3, "v": 6}
    assert plan.rows.tolist() == [0, 1, 2, 3, 1, 1, 3, 0, 1, 1, 3, 3, 3]
    assert plan.keep is not None
    assert plan.keep[:4].all()
    assert plan.keep[4:7].tolist() == [[True, False]] * 3
    assert plan.keep[7:].tolist() == [[False, True]] * 6
    nothing, _ = SampleValuation().plan(_ctx(model), torch.ones(4, 2), 5)
    assert nothing is None  # every modality relied on: the plain training set


def test_modality_level_count_and_direction_by_hand() -> None:
    # N = 100, mean phi_a = 0.8, mean phi_v = 0.2: gaps 0.2 / 0.8 -> int(0.6 * 2/3 * 1 * 100) = 40
    # extra rows, visual kept alone (its gap is larger)
    assert extra_rows([0.2, 0.8], 1.0, 100) == 40 and extra_rows([0.2, 0.8], 0.5, 100) == 20
    values = torch.tensor([[0.8, 0.2]]).repeat(100, 1)
    plan, info = ModalityValuation().plan(_ctx(_identity_model()), values, 5)
    assert info["gap"] == pytest.approx({"a": 0.2, "v": 0.8}) and info["extra_rows"] == 40
    assert info["trained_alone"] == "v"
    assert plan is not None and plan.keep is not None
    assert plan.rows[:100].tolist() == list(range(100)) and len(plan.rows) == 140
    assert plan.keep[100:].tolist() == [[False, True]] * 40
    again, _ = ModalityValuation().plan(_ctx(_identity_model()), values, 5)
    assert again is not None and torch.equal(again.rows, plan.rows)  # seeded by run and epoch
    none, info = ModalityValuation(alpha=0.0).plan(_ctx(_identity_model()), values, 5)
    assert none is None and info["extra_rows"] == 0
    # three modalities (ours): the largest minus the smallest gap, the largest kept alone
    three = torch.tensor([[0.8, 0.2, 0.5]]).repeat(100, 1)
    plan3, info3 = ModalityValuation().plan(_ctx(_identity_model(("x", "y", "z"))), three, 5)
    assert info3["extra_rows"] == 40 and info3["trained_alone"] == "y"
    assert plan3 is not None and plan3.keep is not None
    assert plan3.keep[100:].tolist() == [[False, True, False]] * 40


def test_a_run_trains_on_the_plan_from_the_epoch_after_warmup() -> None:
    data = make_toy_splits(n=(48, 24, 24))
    torch.manual_seed(0)
    model = JointFusionModel(data.build_encoders(4), data.num_classes)
    strategy = SampleValuation(warmup=1)
    cfg = TrainerConfig(epochs=3, lr=1e-2, batch_size=16, seed=0, progress=False)
    result = Trainer(model, strategy, cfg, collate_fn=collate_multimodal).fit(data.train, data.val)
    records = [row["strategy"] for row in result.history]
    assert records[0]["rows"] == 48  # epoch 1: the plain set; values after it
    extra = sum(records[0]["extra_rows"].values())
    assert records[1]["rows"] == 48 + extra  # epoch 2 trains on the plan
    assert "value_mean" in records[2]  # a plan after every epoch (a resumed run may go on)


def test_errors() -> None:
    with pytest.raises(ValueError, match="warmup must be"):
        build_strategy("valuation-sample", warmup=0)
    with pytest.raises(ValueError, match="part_ratio must be"):
        build_strategy("valuation-modality", part_ratio=0.0)
    multilabel = SimpleNamespace(model=_identity_model(), multilabel=True, data=None)
    with pytest.raises(ValueError, match="does not support multilabel"):
        SampleValuation().on_fit_start(multilabel)  # type: ignore[arg-type]
