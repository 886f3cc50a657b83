"""Parameter groups tagged by modality, and the checks that keep per-modality LRs meaningful."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from miles.models import JointFusionModel, modality_param_groups, param_groups_by_modality
from miles.models.encoders import MLPEncoder


def _model() -> JointFusionModel:
    return JointFusionModel({"a": MLPEncoder(5, 6), "b": MLPEncoder(3, 6)}, 4)


def _ids(group: dict) -> set[int]:
    return {id(p) for p in group["params"]}


def test_groups_follow_modalities() -> None:
    model = _model()
    groups = modality_param_groups(model, lr=0.1)
    assert [(g["modality"], g["name"]) for g in groups] == [
        ("a", "a"),
        ("b", "b"),
        (None, "shared"),
    ]
    assert all(g["lr"] == 0.1 for g in groups)
    assert _ids(groups[0]) == {
        id(p) for p in [*model.encoders["a"].parameters(), *model.heads["a"].parameters()]
    }
    assert _ids(groups[2]) == {id(p) for p in model.fused_head.parameters()}
    # every parameter exactly once
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())


def test_heads_can_stay_shared() -> None:
    model = _model()
    groups = modality_param_groups(model, head_follows_encoder=False)
    assert _ids(groups[0]) == {id(p) for p in model.encoders["a"].parameters()}
    assert id(model.heads["a"].weight) in _ids(groups[2])


def test_tied_parameters_are_rejected() -> None:
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    with pytest.raises(ValueError, match="shared"):
        param_groups_by_modality({"a": a, "b": b})
    with pytest.raises(ValueError, match="shared"):
        param_groups_by_modality({"a": a, "b": nn.Linear(2, 2)}, shared=a)


def test_empty_modality_and_reserved_name() -> None:
    with pytest.raises(ValueError, match="no parameters"):
        param_groups_by_modality({"a": nn.Identity(), "b": nn.Linear(2, 2)})
    with pytest.raises(ValueError, match="reserved"):
        param_groups_by_modality({"shared": nn.Linear(2, 2), "b": nn.Linear(2, 2)})


def test_groups_feed_an_optimizer() -> None:
    opt = torch.optim.Adam(modality_param_groups(_model()), lr=1e-3)
    assert [g["modality"] for g in opt.param_groups] == ["a", "b", None]
