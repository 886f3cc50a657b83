"""UMT (teachers distilled into the student) and UME (ensemble of unimodal heads): hand-computed
losses and predictions, what trains, and the teachers' selection and freezing."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from miles.data import DatasetSplits, collate_multimodal
from miles.models import JointFusionModel
from miles.models.encoders import MLPEncoder
from miles.models.fusion import FusionOutput
from miles.models.fusions.ensemble import UnimodalEnsembleFusion
from miles.models.losses import head_losses
from miles.strategies import build_strategy
from miles.strategies.ume import UME
from miles.strategies.umt import UMT
from miles.training import Trainer, TrainerConfig
from tests.conftest import make_toy_splits


def _identity_model(classes: int = 3) -> JointFusionModel:
    """Encoders are one linear layer set to the identity: the latent is the input."""
    torch.manual_seed(0)
    encoders = {m: MLPEncoder(2, 2, hidden=()) for m in ("a", "b")}
    for enc in encoders.values():
        layer = enc.net[0]
        assert isinstance(layer, nn.Linear)
        with torch.no_grad():
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
    return JointFusionModel(encoders, classes)


# -- UMT -------------------------------------------------------------------------------------------
def test_umt_distillation_is_the_scaled_sum_of_latent_mses() -> None:
    # student latents a = (1, 2), b = (3, 3); teacher latents a = (0, 0), b = (3, 1)
    #   MSE_a = (1 + 4) / 2 = 2.5, MSE_b = (0 + 4) / 2 = 2  ->  sum 4.5, times s = 10 -> 45
    strategy = UMT(scaling=10.0)
    student = _identity_model()
    strategy.configure_model(student)
    teacher = _identity_model()
    with torch.no_grad():
        teacher.encoders["a"].net[0].weight.zero_()  # teacher a: latent 0
        teacher.encoders["b"].net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1 / 3]]))
    strategy.teacher = teacher
    batch = {"inputs": {"a": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([[3.0, 3.0]])}}
    batch["target"] = torch.tensor([0])
    out = student(batch["inputs"])
    assert float(strategy.distillation(out, batch).detach()) == pytest.approx(4.5)
    losses = head_losses(out, batch["target"])
    base = float((losses["fused"] + losses["a"] + losses["b"]).detach())  # joint: fused + probes
    got = float(strategy.loss(losses, out, batch).detach())
    assert got == pytest.approx(base + 45.0, rel=1e-6)
    strategy.scaling = 0.0
    assert float(strategy.loss(losses, out, batch).detach()) == pytest.approx(base)


@pytest.fixture(scope="module")
def bn_toy() -> DatasetSplits:
    return make_toy_splits(n=(60, 30, 30), batchnorm=True)


def _fit(data: DatasetSplits, strategy: Any, epochs: int = 3) -> JointFusionModel:
    torch.manual_seed(0)
    model = JointFusionModel(data.build_encoders(4), data.num_classes)
    cfg = TrainerConfig(epochs=epochs, lr=1e-2, batch_size=16, seed=0, progress=False)
    Trainer(model, strategy, cfg, collate_fn=collate_multimodal).fit(data.train, data.val)
    return model


def test_umt_teachers_are_trained_kept_at_their_best_epoch_and_frozen(
    bn_toy: DatasetSplits,
) -> None:
    strategy = UMT(teacher_epochs=3)
    student = _fit(bn_toy, strategy)
    teacher = strategy.teacher
    assert teacher is not None and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    # the saved state is what the teacher still holds: the student's training (BatchNorm in
    # train mode for the student) changed neither its weights nor its running statistics
    state = teacher.state_dict()
    assert strategy._teacher_state is not None
    for key, value in strategy._teacher_state.items():
        assert torch.equal(state[key], value), key
    # each teacher is at its best validation epoch: re-scoring it gives the recorded best
    info = strategy._teacher_info
    assert set(info["best_epoch"]) == {"strong", "weak"} and info["epochs"] == 3
    loader = torch.utils.data.DataLoader(bn_toy.val, batch_size=64, collate_fn=collate_multimodal)
    trainer = Trainer(student, UMT(), TrainerConfig(progress=False), collate_fn=collate_multimodal)
    scores = trainer.evaluate(loader, model=teacher).unimodal
    for m in ("strong", "weak"):
        assert scores[m] == pytest.approx(info["best_val"][m])
    # trained, not the initial encoder (the student started from the same weights)
    torch.manual_seed(0)
    init = JointFusionModel(bn_toy.build_encoders(4), bn_toy.num_classes)
    assert not torch.equal(
        init.encoders["strong"][1].net[0].weight, teacher.encoders["strong"][1].net[0].weight
    )


def test_umt_errors() -> None:
    with pytest.raises(ValueError, match="scaling must be"):
        build_strategy("umt", scaling=-1.0)
    with pytest.raises(ValueError, match="teacher_epochs must be"):
        build_strategy("umt", teacher_epochs=0)
    strategy = UMT()
    out = FusionOutput(torch.zeros(1, 3), {}, {"a": torch.zeros(1, 2)})
    with pytest.raises(RuntimeError, match="on_fit_start was not called"):
        strategy.distillation(out, {"inputs": {}})


# -- UME -------------------------------------------------------------------------------------------
def _ume_model(rule: str) -> JointFusionModel:
    model = _identity_model(3)
    UME(rule).configure_model(model)
    with torch.no_grad():  # head a reads (2, 0, 0) from latent (1, 0); head b (0, 2.5, 2.4)
        model.heads["a"].weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
        model.heads["b"].weight.copy_(torch.tensor([[0.0, 0.0], [2.5, 0.0], [2.4, 0.0]]))
        model.heads["a"].bias.zero_()
        model.heads["b"].bias.zero_()
    return model


X = {"a": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([[1.0, 0.0]])}


def test_ume_predicts_with_the_ensemble_of_the_unimodal_heads() -> None:
    # logits a = (2, 0, 0), b = (0, 2.5, 2.4)
    #   rule "logits": mean = (1, 1.25, 1.2) -> class 1
    #   rule "probs": softmax a = (e^2, 1, 1) / 9.389056 = (0.786986, 0.106507, 0.106507),
    #                 softmax b = (1, e^2.5, e^2.4) / 24.205670 = (0.041313, 0.503290, 0.455398)
    #                 -> mean (0.414149, 0.304899, 0.280952)
    #                 -> log (-0.881529, -1.187776, -1.269572) -> class 0
    logits = _ume_model("logits")
    assert isinstance(logits.fusion, UnimodalEnsembleFusion)
    out = logits(X)
    assert out.fused[0].tolist() == pytest.approx([1.0, 1.25, 1.2])
    assert int(out.fused.argmax()) == 1
    shares = [logits.fusion.modality_logits(out.latents, m) for m in ("a", "b")]
    assert torch.allclose(shares[0] + shares[1], out.fused)  # additive: head_m / M
    probs = _ume_model("probs")
    fused = probs(X).fused[0]
    assert fused.tolist() == pytest.approx([-0.881529, -1.187776, -1.269572], abs=1e-5)
    assert int(fused.argmax()) == 0
    with pytest.raises(NotImplementedError, match="not additive"):
        probs.fusion.modality_logits(out.latents, "a")


def test_ume_trains_each_encoder_on_its_own_loss_only() -> None:
    model = _ume_model("logits")
    torch.manual_seed(1)
    x = {m: torch.randn(5, 2) for m in ("a", "b")}
    y = torch.tensor([0, 1, 2, 0, 1])
    strategy = UME()
    out = model(x)
    strategy.loss(head_losses(out, y), out, {}).backward()
    grad_a = model.encoders["a"].net[0].weight.grad.clone()  # type: ignore[union-attr]
    assert model.fused_head.weight.grad is None  # the fusion's own head is never used
    model.zero_grad()
    alone = model(x)
    nn.functional.cross_entropy(alone.unimodal["a"], y).backward()
    assert torch.allclose(model.encoders["a"].net[0].weight.grad, grad_a)  # type: ignore[arg-type]
    assert not model.detach_unimodal_heads


def test_ume_building_draws_nothing_and_checks_its_rule() -> None:
    torch.manual_seed(2)
    expected = torch.rand(1)
    model = _identity_model()
    torch.manual_seed(2)
    UME().configure_model(model)  # building the fusion draws nothing from the global stream
    assert torch.equal(torch.rand(1), expected)
    with pytest.raises(ValueError, match="rule must be one of"):
        UME("vote")
