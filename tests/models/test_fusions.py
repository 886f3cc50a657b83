"""Fusion modules: the registry, the additive shares, custom fusions and seeded construction."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from torch import Tensor, nn

from miles.models import JointFusionModel
from miles.models.encoders import MLPEncoder
from miles.models.fusions import (
    ConcatFusion,
    Fusion,
    SumFusion,
    available_fusions,
    build_fusion,
    register_fusion,
)
from miles.strategies import build_strategy

SIZES = {"a": 2, "b": 3, "c": 2}


class ProductFusion(Fusion):
    """Not additive: the head reads the element-wise product of equal-size latents."""

    def fused_features(self, latent_sizes: Mapping[str, int]) -> int:
        return next(iter(latent_sizes.values()))

    def fuse(self, latents: Mapping[str, Tensor]) -> Tensor:
        out = latents[self.modalities[0]]
        for m in self.modalities[1:]:
            out = out * latents[m]
        return out


def _encoders(sizes: Mapping[str, int]) -> dict[str, nn.Module]:
    return {m: MLPEncoder(4, d, hidden=(5,)) for m, d in sizes.items()}


def test_builtins_are_registered_by_name() -> None:
    assert {"concat", "sum"} <= set(available_fusions())
    assert isinstance(build_fusion("concat", SIZES, 3), ConcatFusion)
    assert build_fusion("sum", {"a": 4, "b": 4}, 3).name == "sum"
    with pytest.raises(ValueError, match=r"unknown fusion 'nosuch'; available: \["):
        build_fusion("nosuch", SIZES, 3)
    with pytest.raises(TypeError, match="fusion must be a str"):
        build_fusion(3, SIZES, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already registered"):
        register_fusion("concat")(ProductFusion)
    with pytest.raises(TypeError, match="needs a Fusion subclass"):
        register_fusion("linear")(nn.Linear)  # type: ignore[type-var]


def test_the_head_width_follows_the_rule() -> None:
    assert build_fusion("concat", SIZES, 3).head.in_features == 7
    assert build_fusion("sum", {"a": 4, "b": 4}, 3).head.in_features == 4
    with pytest.raises(ValueError, match="sum fusion needs equal latent sizes"):
        build_fusion("sum", SIZES, 3)
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        build_fusion("concat", SIZES, 0)


@pytest.mark.parametrize("name", ["concat", "sum"])
def test_modality_shares_add_up_to_the_fused_logits(name: str) -> None:
    torch.manual_seed(0)
    sizes = SIZES if name == "concat" else {m: 3 for m in SIZES}
    fusion = build_fusion(name, sizes, 4)
    with torch.no_grad():
        fusion.head.bias.normal_()  # a non-zero bias: it must be split evenly
    latents = {m: torch.randn(6, d) for m, d in sizes.items()}
    shares = [fusion.modality_logits(latents, m) for m in sizes]
    torch.testing.assert_close(sum(shares), fusion(latents))
    with pytest.raises(ValueError, match="unknown modality 'd'"):
        fusion.modality_logits(latents, "d")


def test_concat_share_reads_its_own_columns() -> None:
    fusion = ConcatFusion({"a": 2, "b": 1}, 1)
    with torch.no_grad():
        fusion.head.weight.copy_(torch.tensor([[1.0, 2.0, 10.0]]))
        fusion.head.bias.fill_(4.0)
    latents = {"a": torch.tensor([[1.0, 1.0]]), "b": torch.tensor([[1.0]])}
    assert fusion.columns("b") == slice(2, 3)
    assert fusion.modality_logits(latents, "a").item() == 1 + 2 + 4 / 2
    assert fusion.modality_logits(latents, "b").item() == 10 + 4 / 2


def test_a_custom_fusion_plugs_in_and_a_non_additive_one_says_why_ogm_cannot_use_it() -> None:
    sizes = {"a": 3, "b": 3}
    model = JointFusionModel(_encoders(sizes), 2, fusion=ProductFusion(sizes, 2))
    out = model({m: torch.randn(5, 4) for m in sizes})
    assert out.fused.shape == (5, 2)
    torch.testing.assert_close(out.fused, model.fused_head(out.latents["a"] * out.latents["b"]))
    with pytest.raises(NotImplementedError, match="is not additive"):
        model.fusion.modality_logits(out.latents, "a")
    with pytest.raises(NotImplementedError, match=r"OGM: .*not additive"):
        build_strategy("ogm").configure_model(model)


def test_a_fusion_instance_must_fit_the_encoders() -> None:
    with pytest.raises(ValueError, match="built for latents"):
        JointFusionModel(_encoders({"a": 3, "b": 3}), 2, fusion=SumFusion({"b": 3, "a": 3}, 2))
    with pytest.raises(ValueError, match="classes"):
        JointFusionModel(_encoders({"a": 3, "b": 3}), 2, fusion=SumFusion({"a": 3, "b": 3}, 5))
    with pytest.raises(TypeError, match="fusion must be a registered name"):
        JointFusionModel(_encoders({"a": 3}), 2, fusion=nn.Linear(3, 2))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["concat", "sum"])
def test_seeded_weights_match_the_explicit_construction_order(name: str) -> None:
    """Encoders, then one ``nn.Linear`` head per modality, then the fused ``nn.Linear``: the
    order (and RNG draws) of the original model, so seeded results do not change."""
    sizes = {"a": 3, "b": 3}
    torch.manual_seed(0)
    model = JointFusionModel(_encoders(sizes), 4, name)
    torch.manual_seed(0)
    encoders = _encoders(sizes)
    heads = [nn.Linear(3, 4) for _ in sizes]
    fused = nn.Linear(6 if name == "concat" else 3, 4)
    expected = [
        *(p for e in encoders.values() for p in e.parameters()),
        *(p for h in heads for p in h.parameters()),
        *fused.parameters(),
    ]
    got = list(model.parameters())
    assert len(got) == len(expected)
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    assert model.fusion.name == name and model.fused_head is model.fusion.head
