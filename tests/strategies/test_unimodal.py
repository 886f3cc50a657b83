"""The unimodal reference: only one encoder and its head train; selection on that head."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import miles.strategies.unimodal  # noqa: F401  (registers "unimodal")
from miles.data import collate_multimodal
from miles.models import JointFusionModel
from miles.strategies import build_strategy
from miles.strategies.unimodal import Unimodal
from miles.training import Trainer, TrainerConfig


def _cfg(epochs: int) -> TrainerConfig:
    return TrainerConfig(epochs=epochs, lr=1e-2, batch_size=32, seed=0, progress=False)


def _fit(data: Any, model: JointFusionModel, modality: str, epochs: int = 3) -> Any:
    trainer = Trainer(model, Unimodal(modality), _cfg(epochs), collate_fn=collate_multimodal)
    return trainer.fit(data.train, data.val, data.test)


def _model(data: Any) -> JointFusionModel:
    torch.manual_seed(0)
    return JointFusionModel(data.build_encoders(8), data.num_classes)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_only_the_chosen_branch_trains(toy: Any) -> None:
    model = _model(toy)
    before = {
        "strong_enc": _state(model.encoders["strong"]),
        "strong_head": _state(model.heads["strong"]),
        "weak_enc": _state(model.encoders["weak"]),
        "weak_head": _state(model.heads["weak"]),
        "fused": _state(model.fused_head),
    }
    result = _fit(toy, model, "weak")
    assert _equal(before["strong_enc"], model.encoders["strong"].state_dict())
    assert _equal(before["strong_head"], model.heads["strong"].state_dict())
    # the fused head gets no gradient from L_weak: it stays at its initialisation
    assert _equal(before["fused"], model.fused_head.state_dict())
    assert not _equal(before["weak_enc"], model.encoders["weak"].state_dict())
    assert not _equal(before["weak_head"], model.heads["weak"].state_dict())
    assert model.frozen_modalities == {"strong"}
    # the training loss is L_weak alone
    assert all(r["train_loss"] == r["train_loss_weak"] for r in result.history)


def test_best_epoch_is_chosen_on_the_trained_head(toy: Any) -> None:
    result = _fit(toy, _model(toy), "weak", epochs=5)
    weak = [r["val_weak"] for r in result.history]
    assert result.best_epoch == weak.index(max(weak)) + 1
    assert [r["selection_score"] for r in result.history] == weak
    assert result.val["unimodal"]["weak"] == max(weak)


def test_equals_a_model_that_only_has_that_modality(toy: Any) -> None:
    """The frozen second branch changes nothing: same weights as a truly unimodal model."""
    two = _model(toy)
    one = JointFusionModel({"weak": copy.deepcopy(two.encoders["weak"])}, toy.num_classes)
    one.heads["weak"].load_state_dict(two.heads["weak"].state_dict())
    _fit(toy, two, "weak")
    _fit(toy, one, "weak")
    assert _equal(_state(two.encoders["weak"]), _state(one.encoders["weak"]))
    assert _equal(_state(two.heads["weak"]), _state(one.heads["weak"]))


def test_bad_modality_and_description(toy: Any) -> None:
    with pytest.raises(ValueError, match=r"unknown modality 'audio'.*\['strong', 'weak'\]"):
        Unimodal("audio").configure_model(_model(toy))
    with pytest.raises(ValueError, match="modality must be a non-empty str"):
        Unimodal("")
    with pytest.raises(TypeError, match="modality must be a str"):
        Unimodal(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bad parameters"):
        build_strategy("unimodal")
    strategy = build_strategy("unimodal", modality="strong")
    info = strategy.describe()
    assert info["name"] == "unimodal" and info["modality"] == "strong"
    assert info["uses_aux_losses"] is False and "unimodal reference" in info["note"]
