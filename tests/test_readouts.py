"""The probe and slice readouts: hand-computed slices, a seeded probe that leaves the run alone,
and the same numbers for the same encoders whatever method trained them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from miles.data import DatasetSplits, MultimodalDataset
from miles.models import JointFusionModel
from miles.models.fusions import Fusion
from miles.readouts import DEFAULT_RECIPE, ProbeRecipe, linear_probe, readouts, slice_scores
from miles.results import load_result, readout_scores, run_row
from miles.strategies import build_strategy
from miles.training.experiment import ExperimentConfig, run_experiment, run_readouts
from miles.training.trainer import TrainerConfig
from tests.conftest import make_toy_splits


class _Scalar(nn.Module):
    """A 1-d latent: the input itself (no parameters)."""

    out_features = 1

    def forward(self, x: Tensor) -> Tensor:
        return x


def _scalar_model(fusion: str) -> JointFusionModel:
    return JointFusionModel({"a": _Scalar(), "b": _Scalar()}, 2, fusion)


def test_slice_hand_computed_concat_and_sum() -> None:
    latents = {"a": torch.tensor([[1.0], [-1.0]]), "b": torch.tensor([[2.0], [0.0]])}
    target = torch.tensor([0, 1])
    concat = _scalar_model("concat")
    with torch.no_grad():
        concat.fused_head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        concat.fused_head.bias.copy_(torch.tensor([0.0, 0.4]))
    # a's share: (z_a, 0) + (0, 0.2): (1, 0.2) -> 0 right, (-1, 0.2) -> 1 right: 1.0
    # b's share: (0, z_b) + (0, 0.2): (0, 2.2) -> 1 wrong, (0, 0.2) -> 1 right: 0.5
    assert slice_scores(concat, latents, target, metric="accuracy") == {"a": 1.0, "b": 0.5}
    summed = _scalar_model("sum")
    with torch.no_grad():
        summed.fused_head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        summed.fused_head.bias.copy_(torch.tensor([0.0, 3.0]))
    # share: (z, -z) + (0, 1.5). a: (1, 0.5) -> 0 right, (-1, 2.5) -> 1 right: 1.0
    # b: (2, -0.5) -> 0 right, (0, 1.5) -> 1 right: 1.0
    assert slice_scores(summed, latents, target, metric="accuracy") == {"a": 1.0, "b": 1.0}
    flipped = torch.tensor([1, 1])
    # a: predictions (0, 1) vs (1, 1): 0.5; b: predictions (0, 1): 0.5
    assert slice_scores(summed, latents, flipped, metric="accuracy") == {"a": 0.5, "b": 0.5}


class _Product(Fusion):
    """Not additive: the head reads the element-wise product of the latents."""

    def fused_features(self, latent_sizes: Mapping[str, int]) -> int:
        return next(iter(latent_sizes.values()))

    def fuse(self, latents: Mapping[str, Tensor]) -> Tensor:
        out = torch.ones_like(next(iter(latents.values())))
        for m in self.modalities:
            out = out * latents[m]
        return out


def test_slice_is_none_for_a_fusion_that_is_not_additive() -> None:
    model = JointFusionModel({"a": _Scalar(), "b": _Scalar()}, 2, _Product({"a": 1, "b": 1}, 2))
    latents = {"a": torch.ones(2, 1), "b": torch.ones(2, 1)}
    assert slice_scores(model, latents, torch.tensor([0, 1]), metric="accuracy") is None


def test_probe_learns_separable_features_is_seeded_and_leaves_the_rng_alone() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (90,), generator=g)
    centers = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]])
    feats = {"a": centers[y] + 0.1 * torch.randn(90, 2, generator=g), "b": torch.randn(90, 5)}
    train = {m: v[:60] for m, v in feats.items()}
    test = {m: v[60:] for m, v in feats.items()}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    scores = linear_probe(train, y[:60], test, y[60:], num_classes=3, metric="accuracy", seed=4)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's stream is untouched
    assert scores["a"] == 1.0  # separable: the probe finds it
    assert scores["b"] < 0.8  # noise: it cannot
    again = linear_probe(train, y[:60], test, y[60:], num_classes=3, metric="accuracy", seed=4)
    assert again == scores
    with pytest.raises(ValueError, match="modalities"):
        linear_probe(train, y[:60], {"a": test["a"]}, y[60:], num_classes=3, metric="accuracy")
    with pytest.raises(TypeError, match="recipe"):
        linear_probe(train, y[:60], test, y[60:], num_classes=3, metric="accuracy", recipe={})  # type: ignore[arg-type]


def test_probe_recipe_defaults_and_validation() -> None:
    assert (
        ProbeRecipe(epochs=100, lr=1e-2, batch_size=256, weight_decay=0.0, standardize=True)
        == DEFAULT_RECIPE
    )
    for bad in ({"epochs": -1}, {"lr": 0.0}, {"batch_size": 0}, {"weight_decay": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ProbeRecipe(**bad)  # type: ignore[arg-type]


def test_multilabel_probe_and_slice() -> None:
    y = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]] * 10)
    feats = {"a": y.float() * 4 - 2, "b": torch.zeros(40, 2)}
    scores = linear_probe(
        feats, y, feats, y, num_classes=2, metric="f1_micro", multilabel=True, seed=0
    )
    assert scores["a"] == 1.0 and scores["b"] < 1.0


@pytest.fixture(scope="module")
def toy() -> DatasetSplits:
    return make_toy_splits(n=(80, 30, 30))


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_same_encoders_same_readouts_whatever_the_method(toy: DatasetSplits, fusion: str) -> None:
    """One checkpoint through every method's reporting path (its model as the method configures
    it, then ``run_readouts``): the probe and slice readouts are identical."""
    torch.manual_seed(0)
    trained = JointFusionModel(toy.build_encoders(8), toy.num_classes, fusion)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.3 * torch.randn_like(p))  # some checkpoint, not the initialisation
    checkpoint = trained.state_dict()
    config = ExperimentConfig(fusion=fusion, latent_dim=8, trainer=TrainerConfig(seed=3))
    seen = {}
    for method, params in (
        ("joint", {}),
        ("joint+aux", {}),
        ("ogm", {}),
        ("gblend", {}),
        ("mses", {}),
        ("mslr-k", {"unimodal_lrs": {"strong": 1e-3, "weak": 1e-2}}),
        ("miles", {}),
    ):
        torch.manual_seed(0)
        model = JointFusionModel(toy.build_encoders(8), toy.num_classes, fusion)
        build_strategy(method, **params).configure_model(model)
        model.load_state_dict(checkpoint)
        seen[method] = run_readouts(model, toy, config)
    first = seen["joint"]
    assert first["slice"] is not None and set(first["probe"]) == {"strong", "weak"}
    assert all(r == first for r in seen.values()), seen


def test_readouts_leave_the_model_as_it_was(toy: DatasetSplits) -> None:
    torch.manual_seed(0)
    model = JointFusionModel(toy.build_encoders(8), toy.num_classes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    readouts(model, toy.train, toy.test, metric="accuracy", seed=0, collate_fn=_collate())
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _collate():  # type: ignore[no-untyped-def]
    from miles.data import collate_multimodal

    return collate_multimodal


def test_run_experiment_stores_the_readouts_and_run_row_reads_them(
    toy: DatasetSplits, tmp_path: Path
) -> None:
    config = ExperimentConfig(
        strategy="joint",
        latent_dim=8,
        trainer=TrainerConfig(epochs=2, lr=1e-2, batch_size=32, progress=False),
        out_dir=str(tmp_path),
    )
    result = run_experiment(config, data=toy)
    stored = json.loads((tmp_path / "result.json").read_text())["extra"]["readouts"]
    assert stored == result.extra["readouts"]
    assert stored["split"] == "test" and stored["recipe"]["epochs"] == DEFAULT_RECIPE.epochs
    row = run_row(load_result(tmp_path))
    for kind in ("probe", "slice"):
        scores = readout_scores(result, kind)
        assert scores is not None
        assert {m: row[f"{kind}_{m}"] for m in ("strong", "weak")} == scores
    # the probe is measured on the chosen epoch's encoders, with the run's seed: recomputing it
    # from the saved best weights gives the same numbers
    torch.manual_seed(0)
    model = JointFusionModel(toy.build_encoders(8), toy.num_classes)
    model.load_state_dict(torch.load(tmp_path / "best.pt", weights_only=True)["model"])
    assert run_readouts(model, toy, config) == stored
    # a result without readouts (older run) reads as "not measured"
    assert readout_scores({"extra": {}}, "probe") is None
    with pytest.raises(ValueError, match="kind"):
        readout_scores(result, "head")


def test_constant_features_score_like_a_constant_classifier(toy: DatasetSplits) -> None:
    data = MultimodalDataset(
        {"strong": torch.zeros(4, 8), "weak": torch.zeros(4, 8)}, torch.tensor([0, 1, 2, 3])
    )
    torch.manual_seed(0)
    model = JointFusionModel(toy.build_encoders(8), toy.num_classes)
    out = readouts(model, data, data, metric="f1_macro", seed=0, collate_fn=_collate())
    # constant features: every probe and slice predicts one class for the 4 samples, one per
    # class: macro F1 = (F1 of that class, 2 * 1/4 * 1 / (1/4 + 1) = 0.4, + 3 zeros) / 4 = 0.1
    assert out["probe"] == {"strong": pytest.approx(0.1), "weak": pytest.approx(0.1)}
    assert out["slice"] == {"strong": pytest.approx(0.1), "weak": pytest.approx(0.1)}
