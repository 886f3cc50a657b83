"""The strategy interface's training step: the one override point and the context primitives."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from miles.data import collate_multimodal
from miles.models import JointFusionModel
from miles.strategies import JointAux, StepOutput, Strategy, StrategyContext
from miles.training import Trainer, TrainerConfig
from tests.conftest import make_toy_splits
from tests.helpers import same_weights, strip_times


def _fit(strategy: Strategy, epochs: int = 2, optimizer: str = "adam") -> tuple[Any, Any]:
    data = make_toy_splits()
    torch.manual_seed(0)
    model = JointFusionModel(data.build_encoders(16), data.num_classes, "concat")
    config = TrainerConfig(epochs=epochs, seed=0, progress=False, optimizer=optimizer)
    trainer = Trainer(model, strategy, config, collate_fn=collate_multimodal)
    return trainer.fit(data.train, data.val, data.test), model


class ExplicitStep(JointAux):
    """The default step written out with the primitives: must change nothing."""

    def training_step(self, ctx: StrategyContext, batch: Mapping[str, Any]) -> StepOutput:
        output = ctx.forward(batch)
        losses = ctx.head_losses(output, batch)
        loss = self.loss(losses, output, batch)
        ctx.zero_grad()
        ctx.backward(loss)
        self.on_after_backward(ctx, output, batch)
        ctx.optimizer_step()
        return StepOutput(
            loss.detach(), {k: v.detach() for k, v in losses.items()}, len(batch["target"])
        )


class FusedThenHeads(JointAux):
    """Two optimizer steps per batch (fused loss, then the unimodal losses): a step the default
    cannot express, as alternating methods need."""

    calls = 0

    def training_step(self, ctx: StrategyContext, batch: Mapping[str, Any]) -> StepOutput:
        type(self).calls += 1
        output = ctx.forward(batch)
        fused = ctx.head_losses(output, batch)["fused"]
        ctx.zero_grad()
        ctx.backward(fused)
        ctx.optimizer_step()
        output = ctx.forward(batch)
        losses = ctx.head_losses(output, batch)
        heads = sum(v for k, v in losses.items() if k != "fused")
        ctx.zero_grad()
        ctx.backward(heads)
        ctx.optimizer_step()
        return StepOutput((fused + heads).detach(), {k: v.detach() for k, v in losses.items()}, 8)


def test_the_default_step_written_with_the_primitives_changes_nothing() -> None:
    reference, ref_model = _fit(JointAux())
    explicit, model = _fit(ExplicitStep())
    assert strip_times(explicit.history) == strip_times(reference.history)
    assert same_weights(model, ref_model)


def test_a_custom_training_step_replaces_the_default() -> None:
    FusedThenHeads.calls = 0
    custom, model = _fit(FusedThenHeads(), epochs=1)
    reference, ref_model = _fit(JointAux(), epochs=1)
    batches = -(-240 // 64)  # the toy training split, batch size 64
    assert FusedThenHeads.calls == batches
    assert not same_weights(model, ref_model)
    # the trainer averages what the step reports, weighted by its batch_size
    assert custom.history[0]["train_loss"] != reference.history[0]["train_loss"]


def test_context_offers_the_run_loader_and_its_optimizer_factory() -> None:
    seen: dict[str, Any] = {}

    class Probe(JointAux):
        def on_fit_start(self, ctx: StrategyContext) -> None:
            seen["loader_len"] = len(ctx.train_loader)
            assert ctx.make_optimizer is not None
            copy = torch.nn.Linear(2, 2)
            seen["optimizer"] = ctx.make_optimizer([{"params": list(copy.parameters())}])

    _fit(Probe(), epochs=1, optimizer="sgd")
    assert seen["loader_len"] == -(-240 // 64)
    opt = seen["optimizer"]
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["momentum"] == 0.9
