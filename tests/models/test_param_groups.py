"""Parameter groups tagged by modality, and the checks that keep per-modality LRs meaningful."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from miles.models import JointFusionModel, modality_param_groups, param_groups_by_modality
from miles.models.encoders import MLPEncoder
from miles.models.param_groups import param_groups_by_prefix, split_weight_decay


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


# ---------------------------------------------------------------- any model, by name prefix


class TwoTower(nn.Module):
    """A CLIP-like model: two towers, two projections and a bare parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.audio_tower = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6))
        self.vision_model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6))
        self.audio_proj = nn.Linear(6, 3)
        self.vision_proj = nn.Linear(6, 3)
        self.logit_scale = nn.Parameter(torch.zeros(()))


def _names(model: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_prefix_groups_with_shared_rest() -> None:
    model = TwoTower()
    groups = param_groups_by_prefix(
        model, {"audio": ["audio_tower.", "audio_proj."], "image": "vision_"}, shared="", lr=0.1
    )
    assert [(g["modality"], g["name"], g["lr"]) for g in groups] == [
        ("audio", "audio", 0.1),
        ("image", "image", 0.1),
        (None, "shared", 0.1),
    ]
    assert _names(model, groups[0]) == {
        "audio_tower.0.weight",
        "audio_tower.0.bias",
        "audio_tower.1.weight",
        "audio_tower.1.bias",
        "audio_proj.weight",
        "audio_proj.bias",
    }
    assert _names(model, groups[2]) == {"logit_scale"}  # a bare parameter
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(
        id(p) for p in model.parameters()
    )


def test_prefix_groups_refuse_to_leave_a_trainable_parameter_out() -> None:
    model = TwoTower()
    pattern = r"3 trainable parameter\(s\).*'audio_proj.weight'"
    with pytest.raises(ValueError, match=pattern) as info:
        param_groups_by_prefix(model, {"audio": "audio_tower.", "image": "vision_"})
    assert "logit_scale" in str(info.value) and "shared=''" in str(info.value)
    model.audio_proj.requires_grad_(False)
    model.logit_scale.requires_grad_(False)
    groups = param_groups_by_prefix(model, {"audio": "audio_tower.", "image": "vision_"})
    assert [g["modality"] for g in groups] == ["audio", "image"]  # frozen ones may stay out


def test_longest_prefix_wins_and_conflicts_are_refused() -> None:
    model = TwoTower()
    groups = param_groups_by_prefix(
        model, {"audio": "audio_", "image": "vision_"}, shared=["audio_proj.", "logit_scale"]
    )
    assert _names(model, groups[2]) == {"audio_proj.weight", "audio_proj.bias", "logit_scale"}
    with pytest.raises(ValueError, match="given to both"):
        param_groups_by_prefix(model, {"audio": "audio_", "image": "audio_"}, shared="")
    with pytest.raises(ValueError, match="'image' matched no parameter"):
        param_groups_by_prefix(model, {"audio": "audio_", "image": "image_"}, shared="")
    with pytest.raises(TypeError, match="prefix"):
        param_groups_by_prefix(model, {"audio": 3, "image": "vision_"})  # type: ignore[dict-item]


def test_bare_parameters_and_the_model_check_in_param_groups_by_modality() -> None:
    model = TwoTower()
    modalities = {
        "audio": [model.audio_tower, model.audio_proj],
        "image": [model.vision_model, model.vision_proj],
    }
    groups = param_groups_by_modality(modalities, shared=model.logit_scale, model=model)
    assert _names(model, groups[2]) == {"logit_scale"}
    with pytest.raises(ValueError, match=r"1 trainable parameter\(s\).*\['logit_scale'\]"):
        param_groups_by_modality(modalities, model=model)  # shared= forgotten
    with pytest.raises(TypeError, match=r"nn\.Module or nn\.Parameter"):
        param_groups_by_modality({"audio": [torch.zeros(2)], "image": model.vision_model})


# ---------------------------------------------------------------- weight-decay split


def test_decay_split_keeps_the_modality() -> None:
    model = TwoTower()
    groups = param_groups_by_prefix(
        model, {"audio": "audio_", "image": "vision_"}, shared="", weight_decay=0.01, lr=0.1
    )
    assert [(g["modality"], g["name"], g["weight_decay"]) for g in groups] == [
        ("audio", "audio", 0.01),
        ("audio", "audio/no_decay", 0.0),
        ("image", "image", 0.01),
        ("image", "image/no_decay", 0.0),
        (None, "shared", 0.01),
    ]
    assert all(g["lr"] == 0.1 for g in groups)
    assert _names(model, groups[0]) == {"audio_tower.0.weight", "audio_proj.weight"}
    assert _names(model, groups[1]) == {
        "audio_tower.0.bias",
        "audio_tower.1.weight",  # LayerNorm
        "audio_tower.1.bias",
        "audio_proj.bias",
    }
    assert _names(model, groups[3]) >= {"vision_model.1.weight"}  # BatchNorm
    opt = torch.optim.AdamW(groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0, 0.01, 0.0, 0.01]


def test_decay_split_matches_the_hugging_face_rule() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(
        text_config={
            "vocab_size": 50,
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": 0,
            "eos_token_id": 1,
        },
        vision_config={
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 8,
            "patch_size": 4,
        },
        projection_dim=8,
    )
    clip = transformers.CLIPModel(config)
    groups = param_groups_by_prefix(
        clip,
        {"text": ["text_model.", "text_projection."], "image": ["vision_model.", "visual_"]},
        shared="",  # logit_scale
        weight_decay=0.1,
    )
    decayed = set().union(*(_names(clip, g) for g in groups if g["weight_decay"] > 0))
    assert decayed == set(transformers.Trainer.get_decay_parameter_names(None, clip))
    assert {g["modality"] for g in groups} == {"text", "image", None}


def test_joint_fusion_groups_can_split_decay() -> None:
    model = _model()
    groups = modality_param_groups(model, weight_decay=0.05)
    assert [(g["modality"], g["name"]) for g in groups] == [
        ("a", "a"),
        ("a", "a/no_decay"),
        ("b", "b"),
        ("b", "b/no_decay"),
        (None, "shared"),
        (None, "shared/no_decay"),
    ]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="weight_decay"):
        split_weight_decay(groups, model, -1.0)
