"""MMCosine: hand-computed cosine logits, invariances, readouts, what trains, errors."""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest
import torch
from torch import Tensor, nn

from miles.models import JointFusionModel
from miles.models.encoders import MLPEncoder
from miles.models.fusions import Fusion
from miles.models.fusions.cosine import CosineConcatFusion, CosineSumFusion, cosine_fusion
from miles.strategies import build_strategy

# z_a = (3, 4), z_v = (1, 0); W_a = [[1, 0], [0, 2]], W_v = [[0, 1], [1, 1]] (class rows), s=10
#   cos_a = (3/5, 8/10) = (0.6, 0.8); cos_v = (0, 1/sqrt 2)
#   training logits = 10 * (0.6 + 0, 0.8 + 0.707107) = (6, 15.071068)
#   CE(label 0) = 9.071068 + log(1 + e^-9.071068) = 9.071183
#   linear head (bias 0): (3*1 + 4*0 + 1*0 + 0*1, 3*0 + 4*2 + 1*1 + 0*1) = (3, 9)
LATENTS = {"a": torch.tensor([[3.0, 4.0]]), "v": torch.tensor([[1.0, 0.0]])}
TRAIN_LOGITS = [6.0, 15.071068]


def _model(fusion: str = "concat") -> JointFusionModel:
    torch.manual_seed(0)
    encoders = {m: MLPEncoder(3, 2, hidden=(4,)) for m in ("a", "v")}
    model = JointFusionModel(encoders, 2, fusion)
    with torch.no_grad():
        if fusion == "concat":
            model.fused_head.weight.copy_(
                torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 2.0, 1.0, 1.0]])
            )
        else:
            model.fused_head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        model.fused_head.bias.zero_()
    return model


def _configured(fusion: str = "concat", **params: object) -> JointFusionModel:
    model = _model(fusion)
    build_strategy("mmcosine", **params).configure_model(model)
    return model


def test_training_logits_are_the_scaled_sum_of_modality_cosines() -> None:
    model = _configured()
    fusion = model.fusion
    assert isinstance(fusion, CosineConcatFusion)
    fusion.train()
    logits = fusion(LATENTS)
    assert logits[0].tolist() == pytest.approx(TRAIN_LOGITS, abs=1e-5)
    assert fusion.modality_logits(LATENTS, "a")[0].tolist() == pytest.approx([6.0, 8.0])
    assert fusion.modality_logits(LATENTS, "v")[0].tolist() == pytest.approx([0.0, 7.071068])
    loss = nn.functional.cross_entropy(logits.detach(), torch.tensor([0]))
    assert float(loss) == pytest.approx(9.071068 + math.log1p(math.exp(-9.071068)), abs=1e-5)
    assert float(loss) == pytest.approx(9.071183, abs=1e-5)


def test_norms_of_latents_and_class_rows_do_not_change_the_logits() -> None:
    model = _configured()
    fusion = model.fusion
    fusion.train()
    before = fusion(LATENTS)
    with torch.no_grad():
        fusion.head.weight.mul_(torch.tensor([[2.0], [0.5]]))  # rescale each class row
        fusion.head.bias.fill_(5.0)  # the bias is not part of the cosine logits
    scaled = {"a": 7 * LATENTS["a"], "v": 0.1 * LATENTS["v"]}
    assert torch.allclose(fusion(scaled), before, atol=1e-6)


def test_eval_readout_is_the_linear_head_by_default_and_the_cosine_sum_on_request() -> None:
    linear = _configured()
    linear.eval()
    assert linear.fusion(LATENTS)[0].tolist() == pytest.approx([3.0, 9.0])
    cosine = _configured(readout="cosine", scaling=15.0)
    cosine.eval()
    expected = [15 / 10 * v for v in TRAIN_LOGITS]  # BalanceBenchmark: s = 15, cosine readout
    assert cosine.fusion(LATENTS)[0].tolist() == pytest.approx(expected, abs=1e-5)


def test_sum_fusion_reads_the_whole_head_for_every_modality() -> None:
    model = _configured("sum")
    assert isinstance(model.fusion, CosineSumFusion)
    model.fusion.train()
    # W = [[1, 0], [0, 2]]: cos_a = (0.6, 0.8), cos_v = (1, 0) -> 10 * (1.6, 0.8)
    assert model.fusion(LATENTS)[0].tolist() == pytest.approx([16.0, 8.0], abs=1e-5)


def test_swapping_keeps_the_weights_and_the_random_stream() -> None:
    model = _model()
    weight = model.fused_head.weight.detach().clone()
    torch.manual_seed(3)
    expected_draw = torch.rand(1)
    torch.manual_seed(3)
    build_strategy("mmcosine").configure_model(model)
    assert torch.equal(torch.rand(1), expected_draw)
    assert torch.equal(model.fused_head.weight, weight)
    assert list(model.state_dict()) == list(_model().state_dict())  # same checkpoint keys
    assert model.detach_unimodal_heads  # heads are probes, as in joint


def test_one_step_trains_the_head_weights_but_not_its_bias() -> None:
    model = _configured()
    model.train()
    bias = model.fused_head.bias.detach().clone()
    weight = model.fused_head.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = model({"a": torch.randn(4, 3), "v": torch.randn(4, 3)})
    nn.functional.cross_entropy(out.fused, torch.tensor([0, 1, 0, 1])).backward()
    assert model.fused_head.bias.grad is None or not model.fused_head.bias.grad.any()
    opt.step()
    assert torch.equal(model.fused_head.bias, bias)
    assert not torch.equal(model.fused_head.weight, weight)


class _Product(Fusion):
    def fused_features(self, latent_sizes: Mapping[str, int]) -> int:
        return 2

    def fuse(self, latents: Mapping[str, Tensor]) -> Tensor:
        return latents["a"] * latents["v"]


def test_errors() -> None:
    with pytest.raises(ValueError, match="scaling must be"):
        build_strategy("mmcosine", scaling=0.0)
    with pytest.raises(ValueError, match="readout must be one of"):
        build_strategy("mmcosine", readout="mean")
    model = JointFusionModel(
        {m: MLPEncoder(3, 2, hidden=(4,)) for m in ("a", "v")}, 2, _Product({"a": 2, "v": 2}, 2)
    )
    with pytest.raises(NotImplementedError, match="MMCosine: MMCosine needs a linear additive"):
        build_strategy("mmcosine").configure_model(model)
    again = cosine_fusion(_configured().fusion, scaling=2.0)  # re-configuring: new s, same weights
    assert isinstance(again, CosineConcatFusion) and again.scaling == 2.0
