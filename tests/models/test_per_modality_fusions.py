"""Fusions that compute each modality's own logits: installing them, and their hand-computed
outputs (MLA's uncertainty weights, ReconBoost's boosted sum, Greedy's MMTM)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from miles.models import JointFusionModel
from miles.models.encoders import MLPEncoder
from miles.models.fusions import (
    BoostedSumFusion,
    MMTMFusion,
    UncertaintyFusion,
    build_fusion,
    entropy_weights,
)
from miles.models.param_groups import modality_param_groups


def _model(fusion: str = "concat", sizes: tuple[int, int] = (2, 2)) -> JointFusionModel:
    torch.manual_seed(0)
    encoders = {m: MLPEncoder(3, d, hidden=(4,)) for m, d in zip("ab", sizes, strict=True)}
    return JointFusionModel(encoders, 2, fusion)


def _identity_head(fusion: nn.Module) -> None:
    with torch.no_grad():
        fusion.head.weight.copy_(torch.eye(2))
        fusion.head.bias.zero_()


def test_entropy_weights_by_hand() -> None:
    """g(a) = [2, 0]: p = (0.880797, 0.119203), e_a = 0.365334; g(v) = [0, 0]: e_v = ln 2;
    lambda_a = 1 / (1 + exp(e_a - e_v)) = 0.581227 (Eq. 6-7)."""
    logits = {"a": torch.tensor([[2.0, 0.0]]), "v": torch.tensor([[0.0, 0.0]])}
    weights = entropy_weights(logits)
    e_a = -(0.880797 * math.log(0.880797) + 0.119203 * math.log(0.119203))
    assert e_a == pytest.approx(0.365334, abs=1e-6)
    assert weights["a"].item() == pytest.approx(0.581227, abs=1e-6)
    assert weights["v"].item() == pytest.approx(0.418773, abs=1e-6)
    assert weights["a"].shape == (1, 1)


@pytest.mark.parametrize(("dynamic", "expected"), [(True, [1.162454, 0.0]), (False, [1.0, 0.0])])
def test_uncertainty_fusion_weighs_the_shared_head_by_certainty(
    dynamic: bool, expected: list[float]
) -> None:
    fusion = UncertaintyFusion({"a": 2, "v": 2}, 2, dynamic=dynamic)
    _identity_head(fusion)
    latents = {"a": torch.tensor([[2.0, 0.0]]), "v": torch.tensor([[0.0, 0.0]])}
    fused, unimodal = fusion.forward_with_unimodal(latents)
    torch.testing.assert_close(unimodal["a"], torch.tensor([[2.0, 0.0]]))
    torch.testing.assert_close(fused, torch.tensor([expected]), atol=1e-6, rtol=0)
    shares = sum(fusion.modality_logits(latents, m) for m in "av")
    torch.testing.assert_close(shares, fused)


def test_per_example_weights_do_not_depend_on_the_batch() -> None:
    """Eq. 7 weighs each example by its own entropies (the authors' code: by the batch's)."""
    torch.manual_seed(1)
    fusion = build_fusion("uncertainty", {"a": 3, "v": 3}, 4)
    latents = {m: torch.randn(5, 3) for m in "av"}
    whole = fusion(latents)
    alone = torch.cat([fusion({m: z[i : i + 1] for m, z in latents.items()}) for i in range(5)])
    torch.testing.assert_close(whole, alone)


def test_boosted_sum_counts_ensemble_members_only() -> None:
    fusion = BoostedSumFusion({"a": 2, "v": 2}, 2, boost_rate=2.0)
    _identity_head(fusion)
    latents = {"a": torch.tensor([[1.0, 0.0]]), "v": torch.tensor([[0.0, 3.0]])}
    torch.testing.assert_close(fusion(latents), torch.tensor([[2.0, 6.0]]))
    fusion.set_members(["a"])
    assert fusion.member_names() == ["a"]
    torch.testing.assert_close(fusion(latents), torch.tensor([[2.0, 0.0]]))
    torch.testing.assert_close(
        fusion.modality_logits(latents, "v"), torch.zeros(1, 2)
    )  # not a member: no share
    fusion.set_members([])
    torch.testing.assert_close(fusion(latents), torch.zeros(1, 2))  # no learner yet
    with pytest.raises(ValueError, match="unknown modalities"):
        fusion.set_members(["x"])
    fusion.set_members(["a", "v"])
    fusion(latents).sum().backward()
    assert fusion.boost_rate.grad is not None and fusion.boost_rate.grad.item() == 4.0


def test_mmtm_gates_branches_and_curation() -> None:
    """With a zero squeeze the excitation is 0, so each gate is sigmoid(excite bias): with bias
    0 every gate is 1/2 and branch m reads z_m / 2; curating replaces a gate by its running mean."""
    fusion = MMTMFusion({"a": 2, "v": 2}, 2)
    assert fusion.squeeze.out_features == 2  # int(2 * (2 + 2) / 4)
    with torch.no_grad():
        for p in fusion.parameters():
            p.zero_()
        for branch in fusion.branches.values():
            branch.weight.copy_(torch.eye(2))
    latents = {"a": torch.tensor([[2.0, 4.0]]), "v": torch.tensor([[6.0, 0.0]])}
    fusion.eval()
    fused, branches = fusion.forward_with_unimodal(latents)
    torch.testing.assert_close(branches["a"], torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(fused, torch.tensor([[2.0, 1.0]]))  # mean of the branches
    assert int(fusion.gate_steps) == 0  # evaluation leaves the running means alone
    fusion.train()
    fusion(latents)
    torch.testing.assert_close(fusion.running_gate("v"), torch.tensor([0.5, 0.5]))
    with torch.no_grad():
        fusion.excite["v"].bias.fill_(2.0)  # now the live gate of v is sigmoid(2)
    fusion.caring = "v"
    curated = fusion.unimodal_logits(latents)["v"]
    # the running mean became (0.5 + sigmoid(2)) / 2 before it replaced the gate
    mean = (0.5 + torch.sigmoid(torch.tensor(2.0))) / 2
    torch.testing.assert_close(curated, torch.tensor([[6.0 * mean.item(), 0.0]]))
    fusion.eval()
    live = fusion.unimodal_logits(latents)["v"]
    torch.testing.assert_close(
        live, torch.tensor([[6.0 * torch.sigmoid(torch.tensor(2.0)).item(), 0.0]])
    )


def test_set_fusion_reports_the_fusions_readouts_and_freezes_the_aux_heads() -> None:
    model = _model()
    x = {m: torch.randn(4, 3) for m in "ab"}
    model.set_fusion("uncertainty")
    out = model(x)
    assert isinstance(model.fusion, UncertaintyFusion)
    torch.testing.assert_close(out.unimodal["a"], model.fusion.head(out.latents["a"]))
    torch.testing.assert_close(model.unimodal_logits(out.latents)["b"], out.unimodal["b"])
    assert not any(p.requires_grad for p in model.heads.parameters())
    groups = modality_param_groups(model)
    shared = next(g for g in groups if g["modality"] is None)
    assert {id(p) for p in model.fusion.parameters()} <= {id(p) for p in shared["params"]}
    model.set_fusion("concat")  # back to one linear head: the aux heads train again
    assert all(p.requires_grad for p in model.heads.parameters())
    model.freeze("a")
    model.set_fusion("mmtm")
    model.set_fusion("sum")
    assert not any(p.requires_grad for p in model.heads["a"].parameters())  # stays frozen


def test_set_fusion_errors_and_heads() -> None:
    model = _model(sizes=(2, 3))
    with pytest.raises(ValueError, match="latent sizes must be equal"):
        model.set_fusion("boosted-sum")
    with pytest.raises(TypeError, match="registered name"):
        model.set_fusion(nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="built by name only"):
        model.set_fusion(build_fusion("concat", {"a": 2, "b": 3}, 2), ratio=2)
    with pytest.raises(ValueError, match="built for latents"):
        model.set_fusion(build_fusion("concat", {"a": 2, "b": 2}, 2))
    model.set_fusion("mmtm")
    with pytest.raises(NotImplementedError, match="no single fused linear head"):
        _ = model.fused_head
    with pytest.raises(NotImplementedError, match="has no per-modality logits"):
        build_fusion("concat", {"a": 2}, 2).unimodal_logits({"a": torch.zeros(1, 2)})


def test_an_installed_fusion_round_trips_through_the_state_dict() -> None:
    model = _model()
    model.set_fusion("boosted-sum", boost_rate=0.5)
    model.fusion.set_members(["b"])  # type: ignore[operator]
    state = model.state_dict()
    fresh = _model()
    fresh.set_fusion("boosted-sum")
    fresh.load_state_dict(state)
    assert fresh.fusion.member_names() == ["b"]  # type: ignore[operator]
    assert fresh.fusion.boost_rate.item() == 0.5  # type: ignore[union-attr]
    x = {m: torch.randn(3, 3) for m in "ab"}
    torch.testing.assert_close(fresh(x).fused, model(x).fused)
