"""OPM and the TPAMI OGM: hand-computed scores, ratios, drop probabilities, rescaling and
coefficients; what a step drops, removes and modulates."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from miles.models import JointFusionModel
from miles.models.encoders import MLPEncoder
from miles.models.fusion import FusionOutput
from miles.strategies import StrategyContext, build_strategy
from miles.strategies.ogm_tpami import OGMTPAMI, tpami_coefficient
from miles.strategies.onthefly import mean_ratios, unimodal_scores
from miles.strategies.opm import OPM, drop_probability, feature_scale

TANH1 = math.tanh(1.0)


# -- shared pieces ---------------------------------------------------------------------------------
def test_eq7_is_the_mean_of_pairwise_ratios() -> None:
    # two modalities: s_a / s_b
    assert mean_ratios({"a": 3.0, "v": 1.5}) == pytest.approx({"a": 2.0, "v": 0.5})
    # three, sums (3, 1.5, 1): rho_1 = (3/1.5 + 3/1) / 2 = 2.5, rho_2 = (0.5 + 1.5) / 2 = 1,
    # rho_3 = (1/3 + 1/1.5) / 2 = 0.5 (BalanceBenchmark's s_m / sum_others: 1.2, 0.375, 0.222)
    got = mean_ratios({"x": 3.0, "y": 1.5, "z": 1.0})
    assert got == pytest.approx({"x": 2.5, "y": 1.0, "z": 0.5})
    assert mean_ratios({"a": 1.0, "v": 0.0})["a"] == math.inf
    with pytest.raises(ValueError, match="at least 2 modalities"):
        mean_ratios({"a": 1.0})


def _identity_model() -> JointFusionModel:
    """Identity encoders (latent = input, 2-d), concat head [[1, 0, 1, 0], [0, 1, 0, 1]], bias 0."""
    torch.manual_seed(0)
    encoders = {m: MLPEncoder(2, 2, hidden=()) for m in ("a", "v")}
    model = JointFusionModel(encoders, 2)
    with torch.no_grad():
        for enc in encoders.values():
            enc.net[0].weight.copy_(torch.eye(2))
            enc.net[0].bias.zero_()
        model.fused_head.weight.copy_(torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]))
        model.fused_head.bias.zero_()
    return model


# latent a = (ln 3, 0): softmax (3/4, 1/4) -> s_a = 0.75; v = (0, 0): s_v = 0.5 -> rho_a = 1.5
X = {"a": torch.tensor([[math.log(3.0), 0.0]]), "v": torch.tensor([[0.0, 0.0]])}
Y = torch.tensor([0])


def test_scores_are_the_softmax_of_each_share_at_the_true_class() -> None:
    model = _identity_model()
    scores = unimodal_scores(model, model(X).latents, Y)
    assert scores == pytest.approx({"a": 0.75, "v": 0.5})
    with pytest.raises(ValueError, match="class-index targets"):
        unimodal_scores(model, model(X).latents, torch.tensor([[1.0, 0.0]]))


# -- OPM -------------------------------------------------------------------------------------------
def test_drop_probability_and_rescaling_by_hand() -> None:
    # rho_a = 2, rho_v = 0.5; q_base = 0.5, lambda = 0.5: q_a = 0.5 (1 + 0.5 tanh 1) = 0.690399
    q_a = drop_probability(2.0, 0.5, 0.5)
    assert q_a == pytest.approx(0.5 * (1 + 0.5 * TANH1)) and q_a == pytest.approx(0.690399, 1e-6)
    assert drop_probability(2.0, 0.4, 0.5) == pytest.approx(0.552319, abs=1e-6)  # BB's q_base
    assert drop_probability(0.5, 0.5, 0.5) == 0.0 and drop_probability(1.0, 0.5, 0.5) == 0.0
    assert drop_probability(3.0, 0.9, 1.0) == 1.0  # clipped
    # d = (512, 512): theta = 0.690399 / 2 = 0.345199 -> 1 / (1 - theta) = 1.527182
    scale = feature_scale({"a": q_a, "v": 0.0}, {"a": 512, "v": 512})
    assert scale == pytest.approx(1.527182, abs=1e-6)
    assert feature_scale({"a": 0.5, "v": 0.0}, {"a": 2, "v": 6}) == pytest.approx(1 / (1 - 1 / 8))


def _ctx(model: JointFusionModel, strategy: Any, lr: float = 0.1) -> StrategyContext:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    data: Any = SimpleNamespace(seed=0)
    ctx = StrategyContext(
        model=model,
        optimizer=opt,
        device=torch.device("cpu"),
        epochs=1,
        multilabel=False,
        metric="accuracy",
        evaluate=lambda loader: None,  # type: ignore[arg-type,return-value]
        data=data,
    )
    strategy.configure_model(model)
    strategy.on_fit_start(ctx)
    return ctx


def test_an_executed_drop_removes_the_leader_and_rescales_the_rest() -> None:
    # q_base = 1: q_a = 1 (rho_a = 1.5 > 1), q_v = 0; p_exe = 1: always executed, so a is dropped
    # in every row, theta = (2 * 1 + 2 * 0) / 4 = 1/2 and v's latent is doubled:
    #   fused = W_v (2 * (0, 0)) = (0, 0) -> CE = ln 2 for the one sample
    # with v = (0.1, 0): fused = (0.2, 0) -> CE(class 0) = ln(1 + e^-0.2) = 0.598139
    model = _identity_model()
    strategy = OPM(q_base=1.0, lam=0.5, p_exe=1.0, warmup=0)
    ctx = _ctx(model, strategy)
    strategy.on_epoch_start(ctx, 1)
    batch = {"inputs": {"a": X["a"], "v": torch.tensor([[0.1, 0.0]])}, "target": Y}
    step = strategy.training_step(ctx, batch)
    assert float(step.losses["fused"]) == pytest.approx(0.598139, abs=1e-6)
    record = strategy.on_epoch_end(ctx, 1, None, None)  # type: ignore[arg-type]
    assert record["q_mean"]["a"] == 1.0 and record["q_mean"]["v"] == 0.0
    assert record["dropped_fraction"] == {"a": 1.0, "v": 0.0}
    assert record["executed_fraction"] == 1.0


def test_warmup_and_p_exe_zero_change_nothing() -> None:
    batch = {"inputs": X, "target": Y}
    for strategy in (OPM(q_base=1.0, p_exe=1.0, warmup=1), OPM(q_base=1.0, p_exe=0.0, warmup=0)):
        model = _identity_model()
        ctx = _ctx(model, strategy)
        strategy.on_epoch_start(ctx, 1)
        step = strategy.training_step(ctx, batch)
        plain = nn.functional.cross_entropy(_identity_model()(X).fused, Y)
        assert float(step.losses["fused"]) == pytest.approx(float(plain.detach()))


class _DropAll(OPM):
    def draw(self, q: Any, batch_size: int) -> Tensor | None:
        return torch.zeros(batch_size, 2, dtype=torch.bool)


def test_a_batch_that_lost_every_modality_is_skipped() -> None:
    model = _identity_model()
    strategy = _DropAll(q_base=0.5, warmup=0)
    ctx = _ctx(model, strategy)
    strategy.on_epoch_start(ctx, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strategy.training_step(ctx, {"inputs": X, "target": Y})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert strategy.on_epoch_end(ctx, 1, None, None)["skipped_batches"] == 1  # type: ignore[arg-type]


def test_opm_stream_is_its_own_and_resumes() -> None:
    model = _identity_model()
    strategy = OPM(q_base=0.3, warmup=0)
    _ctx(model, strategy)
    q = {"a": 0.3, "v": 0.0}
    torch.manual_seed(0)
    before = torch.get_rng_state()
    strategy.draw(q, 8)
    assert torch.equal(torch.get_rng_state(), before)  # the global stream is untouched
    state = strategy.state_dict()
    expected = [strategy.draw(q, 8) for _ in range(3)]
    again = OPM(q_base=0.3, warmup=0)
    again.load_state_dict(state)
    _ctx(_identity_model(), again)
    for want in expected:
        got = again.draw(q, 8)
        assert (got is None and want is None) or torch.equal(got, want)  # type: ignore[arg-type]


def test_opm_errors() -> None:
    with pytest.raises(ValueError, match="q_base must be"):
        build_strategy("opm", q_base=1.5)
    with pytest.raises(ValueError, match="p_exe must be"):
        build_strategy("opm", p_exe=-0.1)
    with pytest.raises(RuntimeError, match="random stream is not started"):
        OPM().draw({"a": 0.1}, 2)


# -- OGM (TPAMI) -----------------------------------------------------------------------------------
def test_eq11_coefficient_by_hand() -> None:
    # rho = 2, alpha = 0.5: 1 - 0.5 tanh(1) = 0.619203 (the CVPR/code form 1 - tanh(0.8 * 2) would
    # be 0.078331); rho <= 1: 1; clipped at 0
    assert tpami_coefficient(2.0, 0.5) == pytest.approx(1 - 0.5 * TANH1)
    assert tpami_coefficient(2.0, 0.5) == pytest.approx(0.619203, abs=1e-6)
    assert tpami_coefficient(1.0, 0.5) == 1.0 and tpami_coefficient(0.3, 0.5) == 1.0
    assert tpami_coefficient(3.0, 2.0) == 0.0
    assert tpami_coefficient(1.0 + 1e-9, 0.8) == pytest.approx(1.0)  # continuous at rho = 1


def _backward_once(strategy: OGMTPAMI, epoch: int = 1) -> tuple[JointFusionModel, dict[str, Any]]:
    model = _identity_model()
    ctx = _ctx(model, strategy)
    strategy.on_epoch_start(ctx, epoch)
    out = model(X)
    for p in model.parameters():
        p.grad = torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) + 1.0
    strategy.on_after_backward(
        ctx, FusionOutput(out.fused, out.unimodal, out.latents), {"target": Y}
    )
    return model, strategy.on_epoch_end(ctx, epoch, None, None)  # type: ignore[arg-type]


def test_the_leading_encoder_is_scaled_by_eq11_and_nothing_else_without_noise() -> None:
    # rho_a = 0.75 / 0.5 = 1.5 -> k_a = 1 - 0.8 tanh(0.5) = 0.630136; rho_v = 2/3 -> k_v = 1
    model, record = _backward_once(OGMTPAMI(alpha=0.8, noise=False, modulation_starts=1))
    k_a = 1 - 0.8 * math.tanh(0.5)
    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.allclose(model.encoders["a"].net[0].weight.grad, k_a * base)  # type: ignore[arg-type]
    assert torch.equal(model.encoders["v"].net[0].weight.grad, base)  # type: ignore[arg-type]
    assert torch.equal(model.fused_head.bias.grad, torch.tensor([1.0, 2.0]))  # type: ignore[arg-type]
    assert record["coeff_mean"] == pytest.approx({"a": k_a, "v": 1.0})
    assert record["ratio_mean"] == pytest.approx({"a": 1.5, "v": 2 / 3})
    _, outside = _backward_once(OGMTPAMI(alpha=0.8, noise=False), epoch=1)  # before epoch 7
    assert outside["coeff_mean"] == {"a": 1.0, "v": 1.0} and not outside["modulation_active"]


def test_ge_noise_reaches_every_encoder_with_the_gradients_spread() -> None:
    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    model, _ = _backward_once(OGMTPAMI(alpha=0.8, modulation_starts=1))
    noisy = model.encoders["v"].net[0].weight.grad
    assert noisy is not None and not torch.equal(noisy, base)  # k_v = 1, yet noise was added
    again, _ = _backward_once(OGMTPAMI(alpha=0.8, modulation_starts=1))  # same seed, same noise
    assert torch.equal(again.encoders["v"].net[0].weight.grad, noisy)  # type: ignore[arg-type]
    quiet, _ = _backward_once(OGMTPAMI(alpha=0.8, noise=False, modulation_starts=1))
    assert torch.equal(quiet.encoders["v"].net[0].weight.grad, base)  # type: ignore[arg-type]


def test_ogm_tpami_errors() -> None:
    with pytest.raises(ValueError, match="modulation_ends"):
        build_strategy("ogm-tpami", modulation_starts=5, modulation_ends=4)
    with pytest.raises(ValueError, match="at least 2 modalities"):
        OGMTPAMI().configure_model(JointFusionModel({"a": MLPEncoder(2, 2, hidden=())}, 2))
