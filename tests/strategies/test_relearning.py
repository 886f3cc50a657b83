"""Diagnosing & Re-learning: purity, k-means, strength, the soft re-initialisation, its schedule."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from miles.data import collate_multimodal
from miles.models import JointFusionModel
from miles.models.encoders import MLPEncoder
from miles.strategies import build_strategy
from miles.strategies.relearning import (
    Relearning,
    kmeans,
    minmax_scale,
    purity,
    reinit_strength,
)
from miles.training import Trainer, TrainerConfig
from tests.conftest import make_toy_splits


def test_purity_is_the_majority_share_per_cluster() -> None:
    # cluster 0 holds labels (0, 0, 1): majority 2; cluster 1 holds (1): 1 -> (2 + 1) / 4
    assert purity(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 1])) == 0.75
    assert purity(torch.tensor([2, 2, 0]), torch.tensor([5, 5, 1])) == 1.0
    with pytest.raises(ValueError, match="equal-length 1-D"):
        purity(torch.tensor([0, 1]), torch.tensor([0]))


def test_minmax_scale_maps_each_column_to_minus_one_one() -> None:
    x = torch.tensor([[0.0, 5.0, 2.0], [10.0, 5.0, 4.0], [5.0, 5.0, 3.0]])
    got = minmax_scale(x)
    assert got[:, 0].tolist() == [-1.0, 1.0, 0.0]
    assert got[:, 1].tolist() == [-1.0, -1.0, -1.0]  # constant column -> low, as scikit-learn
    assert got[:, 2].tolist() == [-1.0, 1.0, 0.0]


def test_kmeans_finds_separated_groups_deterministically_without_the_global_stream() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(20)
    x = centers[truth] + 0.3 * torch.randn(60, 2, generator=g)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    labels = kmeans(x, 3)
    assert torch.equal(torch.get_rng_state(), before)
    assert purity(truth, labels) == 1.0
    assert torch.equal(kmeans(x, 3), labels)
    with pytest.raises(ValueError, match="at least k = 3 rows"):
        kmeans(x[:2], 3)


def test_strength_and_soft_reinitialisation_by_hand() -> None:
    # g = 0.25, lambda = 3: alpha = tanh(0.75) = 0.635149; a parameter at 1 with initial value 0
    # becomes (1 - alpha) * 1 + alpha * 0 = 0.364851; one at 1 with initial 3: 1 + 2 alpha = 2.2703
    alpha = reinit_strength(0.25, 3.0)
    assert alpha == pytest.approx(0.635149, abs=1e-6)
    torch.manual_seed(0)
    model = JointFusionModel({m: MLPEncoder(2, 2, hidden=()) for m in ("a", "b")}, 2)
    strategy = Relearning()
    ctx: Any = SimpleNamespace(model=model, multilabel=False, data=object())
    with torch.no_grad():
        model.encoders["a"].net[0].weight.zero_()
        model.encoders["a"].net[0].bias.fill_(3.0)
    strategy.on_fit_start(ctx)  # the initial parameters: weight 0, bias 3 for encoder a
    heads = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("encoders")}
    b_before = model.encoders["b"].net[0].weight.detach().clone()
    with torch.no_grad():
        model.encoders["a"].net[0].weight.fill_(1.0)
        model.encoders["a"].net[0].bias.fill_(1.0)
    strategy.reinitialise(ctx, {"a": alpha, "b": 0.0})
    weight, bias = model.encoders["a"].net[0].weight, model.encoders["a"].net[0].bias
    assert torch.allclose(weight, torch.full_like(weight, 0.364851), atol=1e-6)
    assert torch.allclose(bias, torch.full_like(bias, 1 + 2 * 0.635149), atol=1e-6)
    assert torch.equal(model.encoders["b"].net[0].weight, b_before)  # alpha 0: untouched
    for key, value in heads.items():  # heads, fused head and buffers are never re-initialised
        assert torch.equal(model.state_dict()[key], value), key


def test_schedule_follows_the_authors_loop() -> None:
    # 0-based t % 20 == 0 and t > 0 -> after 1-based epochs 21, 41, 61 -> before 22, 42, 62
    strategy = Relearning(every=20, max_reinits=2)
    before = [e for e in range(1, 100) if strategy.diagnoses_before(e)]
    assert before == [22, 42, 62, 82]
    strategy._reinits = 2
    assert not strategy.diagnoses_before(62)


def test_a_run_records_the_diagnosis_on_the_epoch_it_starts() -> None:
    data = make_toy_splits(n=(60, 40, 20))
    torch.manual_seed(0)
    model = JointFusionModel(data.build_encoders(4), data.num_classes)
    strategy = Relearning(lam=3.0, every=1, max_reinits=1)
    cfg = TrainerConfig(epochs=4, lr=1e-2, batch_size=16, seed=0, progress=False)
    result = Trainer(model, strategy, cfg, collate_fn=collate_multimodal).fit(data.train, data.val)
    records = [row["strategy"] for row in result.history]
    assert records[0] == {} and records[1] == {} and records[3] == {}  # once, before epoch 3
    got = records[2]
    assert got["reinit"] == 1
    for m in data.modalities:
        gap = abs(got["purity_train"][m] - got["purity_val"][m])
        assert got["gap"][m] == pytest.approx(gap)
        assert got["alpha"][m] == pytest.approx(math.tanh(3.0 * gap))


def test_errors() -> None:
    with pytest.raises(ValueError, match="lam must be"):
        build_strategy("relearning", lam=-1.0)
    with pytest.raises(ValueError, match="every must be"):
        build_strategy("relearning", every=0)
    ctx: Any = SimpleNamespace(multilabel=True, data=object())
    with pytest.raises(ValueError, match="does not support multilabel"):
        Relearning().on_fit_start(ctx)
