"""ctx.data: ordered passes with row positions, collected latents, and the training plan."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import Tensor

from miles.data import DatasetSplits, collate_multimodal
from miles.models import JointFusionModel
from miles.models.fusion import FusionOutput
from miles.strategies import StrategyContext
from miles.strategies.data import Collected, TrainPlan, keep_modalities
from miles.strategies.joint import Joint
from miles.training import Trainer, TrainerConfig
from tests.conftest import make_toy_splits
from tests.helpers import same_weights, strip_times


@pytest.fixture(scope="module")
def toy() -> DatasetSplits:
    return make_toy_splits(n=(40, 20, 20))


def _trainer(toy: DatasetSplits, strategy: Any, epochs: int = 1) -> tuple[Trainer, Any]:
    torch.manual_seed(0)
    model = JointFusionModel(toy.build_encoders(4), toy.num_classes)
    cfg = TrainerConfig(epochs=epochs, lr=1e-2, batch_size=16, seed=0, progress=False)
    return Trainer(model, strategy, cfg, collate_fn=collate_multimodal), model


class _Spy(Joint):
    """Joint that records ctx.data and optionally trains on a fixed plan from the start."""

    def __init__(self, plan: Any = None) -> None:
        self.plan = plan
        self.ctx: StrategyContext | None = None
        self.seen: list[Tensor] = []

    def on_fit_start(self, ctx: StrategyContext) -> None:
        self.ctx = ctx
        if self.plan is not None:
            assert ctx.data is not None
            ctx.data.set_train_plan(self.plan(ctx))

    def loss(self, losses: Mapping[str, Tensor], output: FusionOutput, batch: Any) -> Tensor:
        if "index" in batch:
            self.seen.append(batch["index"])
        return super().loss(losses, output, batch)


def test_loader_gives_positions_in_order_without_moving_the_global_stream(
    toy: DatasetSplits,
) -> None:
    spy = _Spy()
    trainer, _ = _trainer(toy, spy)
    trainer.fit(toy.train, toy.val)
    assert spy.ctx is not None and spy.ctx.data is not None
    data = spy.ctx.data
    torch.manual_seed(5)
    before = torch.get_rng_state()
    index = torch.cat([b["index"] for b in data.loader("val")])
    assert torch.equal(torch.get_rng_state(), before)  # a plain DataLoader would draw a seed
    assert index.tolist() == list(range(20)) and data.size("train") == 40
    with pytest.raises(ValueError, match="no 'holdout' split"):
        data.loader("holdout")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        data.loader("test")


def test_collect_is_the_encoders_in_eval_mode(toy: DatasetSplits) -> None:
    spy = _Spy()
    trainer, model = _trainer(toy, spy)
    trainer.fit(toy.train, toy.val)
    assert spy.ctx is not None and spy.ctx.data is not None
    model.train()
    got = spy.ctx.data.collect("train", model)
    assert isinstance(got, Collected) and model.training  # mode restored
    model.eval()
    with torch.no_grad():
        expected = model.encode(collate_multimodal([toy.train[i] for i in range(40)])["inputs"])
    for m in model.modalities:
        assert torch.allclose(got.latents[m], expected[m])
    assert torch.equal(got.target, toy.train.targets) and got.index.tolist() == list(range(40))


def test_the_identity_plan_trains_exactly_like_no_plan(toy: DatasetSplits) -> None:
    """Same rows, same shuffling stream: a plan of every row once is the plain epoch, bit for bit
    (the planned loader shuffles with the run's generator, as the default loader does)."""
    plain, m_plain = _trainer(toy, Joint(), epochs=2)
    ref = plain.fit(toy.train, toy.val)
    spy = _Spy(lambda ctx: TrainPlan(torch.arange(40), None, ctx.model.modalities))
    planned, m_planned = _trainer(toy, spy, epochs=2)
    got = planned.fit(toy.train, toy.val)
    assert same_weights(m_plain, m_planned)
    assert strip_times(got.history) == strip_times(ref.history)
    assert sorted(torch.cat(spy.seen[:3]).tolist()) == list(range(40))  # epoch 1: each row once


def test_a_plan_repeats_rows_and_masks_modalities(toy: DatasetSplits) -> None:
    rows = torch.tensor([0, 0, 0, 5])
    keep = torch.tensor([[True, True], [False, True], [True, False], [True, True]])
    spy = _Spy(lambda ctx: TrainPlan(rows, keep, ctx.model.modalities))
    trainer, _ = _trainer(toy, spy)
    trainer.fit(toy.train, toy.val)
    assert sorted(torch.cat(spy.seen).tolist()) == [0, 0, 0, 5]
    assert spy.ctx is not None and spy.ctx.data is not None
    batch = next(iter(spy.ctx.data.epoch_loader()))
    assert batch["keep"].shape == (4, 2) and batch["keep"].sum() == 6


def test_keep_modalities_zeroes_the_masked_latent_before_the_fused_head() -> None:
    torch.manual_seed(0)
    model = JointFusionModel(make_toy_splits().build_encoders(3), 4)
    x = {m: torch.randn(2, 8) for m in model.modalities}
    out = model(x)
    keep = torch.tensor([[True, False], [True, True]])
    got = keep_modalities(model, out, keep)
    zeroed = {"strong": out.latents["strong"], "weak": out.latents["weak"] * keep[:, 1:].float()}
    assert torch.equal(got.fused, model.fused_logits(zeroed))
    assert torch.equal(got.fused[1], out.fused[1]) and not torch.equal(got.fused[0], out.fused[0])
    assert got.unimodal is out.unimodal  # the heads read their own, unmasked latents
    assert keep_modalities(model, out, torch.ones(2, 2, dtype=torch.bool)) is out
    with pytest.raises(ValueError, match=r"keep must be \(batch, 2\)"):
        keep_modalities(model, out, torch.ones(2, 3, dtype=torch.bool))


def test_bad_plans_are_refused(toy: DatasetSplits) -> None:
    spy = _Spy()
    trainer, _ = _trainer(toy, spy)
    trainer.fit(toy.train, toy.val)
    assert spy.ctx is not None and spy.ctx.data is not None
    data = spy.ctx.data
    names = ("strong", "weak")
    with pytest.raises(ValueError, match=r"must lie in \[0, 40\)"):
        data.set_train_plan(TrainPlan(torch.tensor([40]), None, names))
    with pytest.raises(ValueError, match="the model's modalities"):
        data.set_train_plan(TrainPlan(torch.tensor([1]), None, ("weak", "strong")))
    with pytest.raises(TypeError, match="must be int64"):
        TrainPlan(torch.tensor([1.0]), None, names)
    with pytest.raises(ValueError, match="is empty"):
        TrainPlan(torch.tensor([], dtype=torch.long), None, names)
    with pytest.raises(ValueError, match=r"shape \(1, 2\)"):
        TrainPlan(torch.tensor([1]), torch.ones(1, 3, dtype=torch.bool), names)
    with pytest.raises(TypeError, match="must be a TrainPlan"):
        data.set_train_plan(object())  # type: ignore[arg-type]
    plan = TrainPlan(torch.tensor([1, 2]), torch.ones(2, 2, dtype=torch.bool), names)
    back = TrainPlan.from_state(plan.state_dict())
    assert torch.equal(back.rows, plan.rows) and back.modalities == names
    assert back.keep is not None and plan.keep is not None and torch.equal(back.keep, plan.keep)
    data.set_train_plan(None)
    assert data.train_plan is None and data.epoch_loader() is data.default_loader
