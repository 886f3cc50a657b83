"""MLA: hand-computed head-gradient projection, the alternation of per-modality steps, and the
shared head the strategy installs."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor

from miles.models import JointFusionModel
from miles.models.encoders import MLPEncoder
from miles.models.fusions import UncertaintyFusion
from miles.strategies import StrategyContext, build_strategy
from miles.strategies.mla import MLA, projection_update, rls_alpha
from tests.strategies.stepping import context_fields, random_batch, small_model


def test_projection_by_hand() -> None:
    """P0 = I, h = (1, 0), alpha = 0.1: P = I - h h^T / 1.1 = diag(0.090909, 1) (Eq. 3-4); the
    authors' Frobenius normalisation gives diag(0.090536, 0.995893). A weight gradient [[1, 1]]
    becomes [[0.090909, 1]] (paper) or [[0.090536, 0.995893]]."""
    h = torch.tensor([1.0, 0.0])
    paper = projection_update(torch.eye(2), h, 0.1)
    torch.testing.assert_close(paper, torch.diag(torch.tensor([0.090909, 1.0])), atol=1e-6, rtol=0)
    code = projection_update(torch.eye(2), h, 0.1, normalize=True)
    expected = torch.diag(torch.tensor([0.090536, 0.995893]))
    torch.testing.assert_close(code, expected, atol=1e-6, rtol=0)
    grad = torch.tensor([[1.0, 1.0]])
    torch.testing.assert_close(grad @ paper.T, torch.tensor([[0.090909, 1.0]]), atol=1e-6, rtol=0)


def test_rls_alpha_decays_within_each_epoch() -> None:
    assert rls_alpha(0, 10) == pytest.approx(0.1)
    assert rls_alpha(5, 10) == pytest.approx(0.1**1.5)
    assert rls_alpha(10, 10) == pytest.approx(0.01)


@dataclass
class RecordingContext(StrategyContext):
    """Keeps a copy of the parameters and of the shared head's gradient at every optimizer step."""

    snapshots: list[dict[str, Tensor]] = field(default_factory=list)
    head_grads: list[Tensor] = field(default_factory=list)

    def optimizer_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        grad = self.model.fusion.head.weight.grad
        assert grad is not None
        self.head_grads.append(grad.clone())
        super().optimizer_step(optimizer)
        self.snapshots.append({n: p.detach().clone() for n, p in self.model.named_parameters()})


def _setup(lr: float, **params: Any) -> tuple[MLA, RecordingContext, dict[str, Any]]:
    model = small_model()
    strategy = MLA(**params)
    strategy.configure_model(model)
    ctx = RecordingContext(**context_fields(model, lr=lr, train_loader=[None] * 4))
    strategy.on_fit_start(ctx)
    strategy.on_epoch_start(ctx, 1)
    return strategy, ctx, random_batch()


def test_one_batch_is_one_step_per_modality_each_moving_its_encoder_and_the_head() -> None:
    strategy, ctx, batch = _setup(lr=0.5)
    before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    out = strategy.training_step(ctx, batch)
    assert len(ctx.snapshots) == 2 and strategy.sub_steps == 2
    first, second = ctx.snapshots

    def moved(a: dict[str, Tensor], b: dict[str, Tensor], prefix: str) -> bool:
        return any(not torch.equal(a[n], b[n]) for n in a if n.startswith(prefix))

    assert moved(before, first, "encoders.a.") and moved(before, first, "fusion.head.")
    assert not moved(before, first, "encoders.v.")  # the idle encoder does not move
    assert moved(first, second, "encoders.v.") and moved(first, second, "fusion.head.")
    assert not moved(first, second, "encoders.a.")
    assert not moved(before, second, "heads.")  # the aux heads are unused, frozen
    assert set(out.losses) == {"fused", "a", "v"}
    torch.testing.assert_close(out.loss, out.losses["a"] + out.losses["v"])


def test_hgm_projects_the_head_gradient_from_the_second_update_on() -> None:
    """With lr 0 both runs see the same weights: the first update is never projected (the code
    skips the very first), the second is ``grad W P^T`` with ``P`` from v's batch-mean latent."""
    plain, plain_ctx, batch = _setup(lr=0.0, hgm=False)
    plain.training_step(plain_ctx, batch)
    hgm, hgm_ctx, _ = _setup(lr=0.0)
    hgm.training_step(hgm_ctx, batch)
    torch.testing.assert_close(hgm_ctx.head_grads[0], plain_ctx.head_grads[0])
    with torch.no_grad():
        v_mean = hgm_ctx.model.encode(batch["inputs"])["v"].mean(dim=0)
    projection = projection_update(torch.eye(2), v_mean, rls_alpha(0, 4))
    assert hgm.projection is not None
    torch.testing.assert_close(hgm.projection, projection)
    torch.testing.assert_close(hgm_ctx.head_grads[1], plain_ctx.head_grads[1] @ projection.T)


def test_the_model_gets_one_shared_head_read_on_every_modality() -> None:
    strategy, ctx, batch = _setup(lr=0.1, dynamic=False)
    model = ctx.model
    assert isinstance(model.fusion, UncertaintyFusion) and not model.fusion.dynamic
    out = model(batch["inputs"])
    for m in ("a", "v"):
        torch.testing.assert_close(out.unimodal[m], model.fusion.head(out.latents[m]))
    torch.testing.assert_close(out.fused, (out.unimodal["a"] + out.unimodal["v"]) / 2)
    assert strategy.describe()["fusion"] == "uncertainty"
    state = copy.deepcopy(strategy.state_dict())
    assert torch.equal(state["projection"], torch.eye(2))


def test_settings_and_requirements() -> None:
    with pytest.raises(TypeError, match="hgm"):
        build_strategy("mla", hgm="yes")
    torch.manual_seed(0)
    model = JointFusionModel({"a": MLPEncoder(3, 2), "v": MLPEncoder(3, 3)}, 2)
    with pytest.raises(ValueError, match="latent sizes must be equal"):
        MLA().configure_model(model)
    with pytest.raises(RuntimeError, match="no 'uncertainty' fusion"):
        MLA._head(JointFusionModel({"a": MLPEncoder(3, 2), "v": MLPEncoder(3, 2)}, 2))
