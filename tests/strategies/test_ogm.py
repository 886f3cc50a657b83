"""OGM and OGM-GE: hand-computed modulation, both modes (gradient for SGD, step for Adam),
neutral setting, noise scale, window, multilabel scores, errors."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import miles.strategies.ogm
import miles.strategies.ogm_ge
from miles.data import collate_multimodal
from miles.models import JointFusionModel
from miles.models.encoders import MLPEncoder
from miles.models.fusion import FusionOutput
from miles.models.losses import head_losses
from miles.strategies import StrategyContext, build_strategy
from miles.strategies.base import EvalResult, Strategy
from miles.strategies.ogm import (
    OGM,
    discrepancy_ratios,
    modality_logit_shares,
    modulation_coefficient,
)
from miles.strategies.ogm_ge import OGMGE, gradient_noise_std
from miles.training import Trainer, TrainerConfig
from tests.conftest import make_toy_splits
from tests.helpers import interrupted_after

LN3 = math.log(3.0)
ALPHA = 0.5
# Hand computation shared by the fixed-latent tests (see _fixed_batch):
#   dominant modality: softmax of its share is (3/5, 1/5, 1/5) on the true class -> s = 2 * 3/5
#   other modality: share is all zeros -> softmax 1/3 each -> s = 2 * 1/3
S_DOM, S_OTHER = 6 / 5, 2 / 3
RHO = S_DOM / S_OTHER  # 1.8
K = 1 - math.tanh(ALPHA * RHO)  # Eq. 10: 1 - tanh(0.9)


# -- helpers ---------------------------------------------------------------------------------------
def _model(fusion: str, modalities: tuple[str, ...] = ("a", "b"), hidden: int = 4) -> Any:
    torch.manual_seed(0)
    encoders = {m: MLPEncoder(3, 2, hidden=(hidden,)) for m in modalities}
    model = JointFusionModel(encoders, 3, fusion)
    n = len(modalities)
    with torch.no_grad():
        eye = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # class c reads latent unit c
        if fusion == "concat":
            model.fused_head.weight.copy_(torch.cat([eye] * n, dim=1))
        else:
            model.fused_head.weight.copy_(eye)
        # the bias is split evenly: each share gets (ln 3, 0, 0) / 2 when n = 2
        model.fused_head.bias.copy_(torch.tensor([LN3 * n / 2, 0.0, 0.0]))
    return model


def _fixed_latents(dominant: str, modalities: tuple[str, ...] = ("a", "b")) -> dict[str, Tensor]:
    """Latents whose shares are (ln3, 0, 0) / (0, ln3, 0) for the dominant modality, 0 otherwise.

    Each share is ``z W_m^T + (ln 3 / 2, 0, 0)`` with ``W_m`` the identity on the first two
    classes, so ``z = target share - (ln 3 / 2, 0)``.
    """
    h = LN3 / 2
    out = {}
    for m in modalities:
        if m == dominant:
            out[m] = torch.tensor([[LN3 - h, 0.0], [-h, LN3]])
        else:
            out[m] = torch.tensor([[-h, 0.0], [-h, 0.0]])
    return out


def _ctx(model: JointFusionModel, *, multilabel: bool = False, adam: bool = False) -> Any:
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(model.parameters(), lr=0.1)
        if adam
        else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    )

    def evaluate(loader: Any) -> EvalResult:
        raise AssertionError("not used")

    return StrategyContext(
        model=model,
        optimizer=opt,
        device=torch.device("cpu"),
        epochs=1,
        multilabel=multilabel,
        metric="accuracy",
        evaluate=evaluate,
    )


def _backward(strategy: Strategy, model: JointFusionModel, in_features: int = 3) -> Any:
    """A real forward/backward on random inputs so that every parameter has a gradient."""
    strategy.configure_model(model)
    g = torch.Generator().manual_seed(1)
    inputs = {m: torch.randn(2, in_features, generator=g) for m in model.modalities}
    target = torch.tensor([0, 1])
    out = model(inputs)
    loss = strategy.loss(head_losses(out, target, multilabel=False), out, {"target": target})
    model.zero_grad(set_to_none=True)
    loss.backward()
    return out, target


def _grads(model: JointFusionModel) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run_fixed(
    strategy: OGM,
    fusion: str,
    dominant: str,
    modalities: tuple[str, ...] = ("a", "b"),
    epoch: int = 1,
) -> tuple[JointFusionModel, dict[str, Tensor], dict[str, Any]]:
    model = _model(fusion, modalities)
    ctx = _ctx(model)
    out, target = _backward(strategy, model)
    before = _grads(model)
    strategy.on_fit_start(ctx)
    strategy.on_epoch_start(ctx, epoch)
    fixed = FusionOutput(out.fused, out.unimodal, _fixed_latents(dominant, modalities))
    strategy.on_after_backward(ctx, fixed, {"target": target})
    record = strategy.on_epoch_end(ctx, epoch, EvalResult(0.0, {}, 0.0), None)
    return model, before, record


def _fit(
    data: Any,
    strategy: str,
    *,
    epochs: int = 3,
    out_dir: Path | None = None,
    optimizer: str = "sgd",
    **params: Any,
) -> tuple[Any, JointFusionModel]:
    strat = build_strategy(strategy, **params)
    torch.manual_seed(0)
    model = JointFusionModel(data.build_encoders(8), data.num_classes, "concat")
    lr = 5e-2 if optimizer == "sgd" else 1e-2
    cfg = TrainerConfig(
        epochs=epochs, lr=lr, batch_size=32, seed=0, optimizer=optimizer, progress=False
    )
    trainer = Trainer(model, strat, cfg, out_dir=out_dir, collate_fn=collate_multimodal)
    return trainer.fit(data.train, data.val, data.test, resume=out_dir is not None), model


def _same_weights(a: JointFusionModel, b: JointFusionModel) -> bool:
    pa, pb = a.state_dict(), b.state_dict()
    return pa.keys() == pb.keys() and all(
        torch.equal(pa[k], pb[k]) for k in pa if isinstance(pa[k], Tensor)
    )


# -- the pieces of the mechanism -------------------------------------------------------------------
@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_logit_shares_add_up_to_the_fused_logits(fusion: str) -> None:
    model = _model(fusion)
    with torch.no_grad():
        model.fused_head.weight.normal_()
        model.fused_head.bias.normal_()
    out = model({m: torch.randn(5, 3) for m in model.modalities})
    shares = modality_logit_shares(model, out.latents)
    assert torch.allclose(shares["a"] + shares["b"], out.fused, atol=1e-6)
    assert not shares["a"].requires_grad


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_hand_computed_scores(fusion: str) -> None:
    model = _model(fusion)
    coeffs, scores = OGM(alpha=ALPHA).coefficients(model, _fixed_latents("a"), torch.tensor([0, 1]))
    assert scores["a"] == pytest.approx(S_DOM, rel=1e-6)
    assert scores["b"] == pytest.approx(S_OTHER, rel=1e-6)
    assert coeffs["a"] == pytest.approx(K, rel=1e-6)
    assert coeffs["b"] == 1.0


def test_concat_unequal_latent_sizes_use_each_modality_own_columns() -> None:
    # latent sizes 2 (a) and 3 (b): a reads columns 0-1 of the fused layer, b columns 2-4
    model = JointFusionModel(
        {"a": MLPEncoder(3, 2, hidden=()), "b": MLPEncoder(3, 3, hidden=())}, 2, "concat"
    )
    assert model.latent_sizes == {"a": 2, "b": 3}
    with torch.no_grad():
        model.fused_head.weight.copy_(torch.tensor([[1.0, 2, 3, 4, 5], [-1, 0, 1, 0, -2]]))
        model.fused_head.bias.copy_(torch.tensor([0.4, -0.2]))  # half to each: (0.2, -0.1)
    latents = {"a": torch.tensor([[1.0, -1.0]]), "b": torch.tensor([[0.5, 0.0, 1.0]])}
    shares = modality_logit_shares(model, latents)
    # a: (1 - 2, -1 + 0) + (0.2, -0.1) = (-0.8, -1.1)
    # b: (1.5 + 0 + 5, 0.5 + 0 - 2) + (0.2, -0.1) = (6.7, -1.6)
    assert torch.allclose(shares["a"], torch.tensor([[-0.8, -1.1]]), atol=1e-6)
    assert torch.allclose(shares["b"], torch.tensor([[6.7, -1.6]]), atol=1e-6)
    fused = model.fused_head(torch.cat([latents["a"], latents["b"]], dim=1))
    assert torch.allclose(shares["a"] + shares["b"], fused, atol=1e-6)
    # true class 0: s = softmax(share)[0] = sigmoid(share_0 - share_1)
    coeffs, scores = OGM(alpha=ALPHA).coefficients(model, latents, torch.tensor([0]))
    s_a, s_b = 1 / (1 + math.exp(-0.3)), 1 / (1 + math.exp(-8.3))
    assert scores == pytest.approx({"a": s_a, "b": s_b}, rel=1e-6)
    assert coeffs["a"] == 1.0
    assert coeffs["b"] == pytest.approx(1 - math.tanh(ALPHA * s_b / s_a), rel=1e-6)


def test_ratio_and_coefficient_rules() -> None:
    assert discrepancy_ratios({"a": 1.2, "b": 0.4}) == pytest.approx({"a": 3.0, "b": 1 / 3})
    # three modalities: rho_m = s_m / mean of the others; two can dominate at once
    r = discrepancy_ratios({"a": 3.0, "b": 3.0, "c": 0.0})
    assert r == pytest.approx({"a": 2.0, "b": 2.0, "c": 0.0})
    # zero denominators
    assert discrepancy_ratios({"a": 1.0, "b": 0.0})["a"] == math.inf
    assert discrepancy_ratios({"a": 0.0, "b": 0.0}) == {"a": 1.0, "b": 1.0}
    assert modulation_coefficient(math.inf, 0.5) == 0.0
    assert modulation_coefficient(math.inf, 0.0) == 1.0
    # Eq. 10 (CVPR) and Eq. 11 (journal); no modulation at or below 1
    assert modulation_coefficient(1.8, 0.5) == pytest.approx(1 - math.tanh(0.9))
    journal = modulation_coefficient(1.8, 0.5, coefficient="journal")
    assert journal == pytest.approx(1 - 0.5 * math.tanh(0.8))
    assert modulation_coefficient(1.0, 0.5) == 1.0
    assert modulation_coefficient(0.3, 0.5) == 1.0
    assert modulation_coefficient(math.inf, 2.0, coefficient="journal") == 0.0  # floored at 0
    # the research note's table: rho_a = 2.49985 (two samples, three classes)
    rho = 2.49985
    for alpha, cvpr, jour in (
        (0.1, 0.75510, 0.90949),
        (0.3, 0.36488, 0.72846),
        (0.5, 0.15174, 0.54744),
        (0.8, 0.03598, 0.27590),
    ):
        assert modulation_coefficient(rho, alpha) == pytest.approx(cvpr, abs=1e-5)
        assert modulation_coefficient(rho, alpha, coefficient="journal") == pytest.approx(
            jour, abs=1e-5
        )


# -- the gradients after on_after_backward ---------------------------------------------------------
@pytest.mark.parametrize("fusion", ["concat", "sum"])
@pytest.mark.parametrize("dominant", ["a", "b"])
def test_dominant_encoder_gradients_are_scaled_by_k(fusion: str, dominant: str) -> None:
    model, before, record = _run_fixed(OGM(alpha=ALPHA, params="all"), fusion, dominant)
    other = "b" if dominant == "a" else "a"
    after = _grads(model)
    assert before.keys() == after.keys()
    dom_names = [n for n in before if n.startswith(f"encoders.{dominant}.")]
    # every parameter of the dominant encoder: 2-D weights and 1-D biases of both layers
    assert len(dom_names) == 4 and {before[n].dim() for n in dom_names} == {1, 2}
    for name, g in before.items():
        if name in dom_names:
            assert torch.allclose(after[name], g * K, rtol=1e-6, atol=0), name
            assert not torch.equal(after[name], g) or not g.any(), name
        else:  # the other encoder, the unimodal heads and the fused head are untouched
            assert torch.equal(after[name], g), name
    assert record["coeff_mean"][dominant] == pytest.approx(K, rel=1e-6)
    assert record["coeff_mean"][other] == 1.0
    assert record["score_mean"][dominant] == pytest.approx(S_DOM / 2, rel=1e-6)
    assert record["modulated_fraction"] == 1.0 and record["modulation_active"] is True
    assert record["mode"] == "gradient"  # SGD: the authors' mode


def test_default_params_are_weights_and_kernels_not_biases() -> None:
    model, before, _ = _run_fixed(OGM(alpha=ALPHA), "concat", "a")
    after = _grads(model)
    for name, g in before.items():
        if name.startswith("encoders.a.") and g.dim() > 1:
            assert torch.allclose(after[name], g * K, rtol=1e-6, atol=0), name
        else:  # biases of a, everything else
            assert torch.equal(after[name], g), name


def test_conv_kernels_only_and_an_encoder_without_any_is_an_error() -> None:
    conv = torch.nn.Sequential(torch.nn.Conv1d(1, 2, 3), torch.nn.Flatten())
    assert [p.dim() for p in miles.strategies.ogm.modulated_parameters(conv, "conv_kernels")] == [3]
    assert len(miles.strategies.ogm.modulated_parameters(conv, "all")) == 2
    model = _model("concat")  # MLP encoders: no kernel
    with pytest.raises(ValueError, match="selects no parameter"):
        OGM(params="conv_kernels").on_fit_start(_ctx(model))


def test_journal_coefficient_scales_by_its_k() -> None:
    model, before, record = _run_fixed(OGM(alpha=ALPHA, coefficient="journal"), "concat", "a")
    k = 1 - ALPHA * math.tanh(RHO - 1)
    after = _grads(model)
    w = "encoders.a.net.0.weight"
    assert torch.allclose(after[w], before[w] * k, rtol=1e-6, atol=0)
    assert record["coeff_mean"]["a"] == pytest.approx(k, rel=1e-6)


def test_three_modalities_generalise_with_mean_of_the_others() -> None:
    mods = ("a", "b", "c")
    model, before, record = _run_fixed(OGM(alpha=ALPHA, params="all"), "sum", "a", mods)
    # shares of b and c are 0 -> s = 2/3 each; rho_a = (6/5) / mean(2/3, 2/3) = 1.8 -> same k
    after = _grads(model)
    for name, g in before.items():
        if name.startswith("encoders.a."):
            assert torch.allclose(after[name], g * K, rtol=1e-6, atol=0), name
        else:
            assert torch.equal(after[name], g), name
    assert record["coeff_mean"] == pytest.approx({"a": K, "b": 1.0, "c": 1.0}, rel=1e-6)


def test_no_modulation_outside_the_window() -> None:
    strategy = OGM(alpha=ALPHA, modulation_starts=2, modulation_ends=3)
    for epoch, active in [(1, False), (2, True), (3, True), (4, False)]:
        model, before, record = _run_fixed(strategy, "concat", "a", epoch=epoch)
        w = "encoders.a.net.2.weight"
        assert torch.equal(_grads(model)[w], before[w]) is not active, epoch
        assert record["modulation_active"] is active
        assert record["coeff_mean"]["a"] == (pytest.approx(K, rel=1e-6) if active else 1.0)
        assert record["modulated_fraction"] == float(active)


def test_epoch_record_averages_over_batches() -> None:
    strategy = OGM(alpha=ALPHA)
    model = _model("concat")
    ctx = _ctx(model)
    out, target = _backward(strategy, model)
    strategy.on_fit_start(ctx)
    strategy.on_epoch_start(ctx, 1)
    for dominant in ("a", "a", "b", "tie"):
        latents = _fixed_latents(dominant)  # "tie": both shares 0 -> rho = 1 -> no modulation
        strategy.on_after_backward(
            ctx, FusionOutput(out.fused, out.unimodal, latents), {"target": target}
        )
    record = strategy.on_epoch_end(ctx, 1, EvalResult(0.0, {}, 0.0), None)
    assert record["coeff_mean"]["a"] == pytest.approx((2 * K + 2) / 4, rel=1e-6)
    assert record["coeff_mean"]["b"] == pytest.approx((K + 3) / 4, rel=1e-6)
    assert record["modulated_fraction"] == 0.75
    strategy.on_epoch_start(ctx, 2)  # statistics restart every epoch
    assert strategy.on_epoch_end(ctx, 2, EvalResult(0.0, {}, 0.0), None)["coeff_mean"] == {}


# -- end to end ------------------------------------------------------------------------------------
def test_alpha_zero_equals_joint_bit_for_bit() -> None:
    data = make_toy_splits(n=(128, 40, 40))
    joint, m_joint = _fit(data, "joint")
    ogm, m_ogm = _fit(data, "ogm", alpha=0.0)
    assert _same_weights(m_joint, m_ogm)
    assert [r["val_fused"] for r in joint.history] == [r["val_fused"] for r in ogm.history]
    assert all(r["strategy"]["modulated_fraction"] == 0.0 for r in ogm.history)
    # with alpha > 0 it acts, and training differs
    acting, m_acting = _fit(data, "ogm", alpha=1.0)
    assert any(r["strategy"]["modulated_fraction"] > 0 for r in acting.history)
    assert not _same_weights(m_joint, m_acting)
    assert acting.strategy["name"] == "ogm" and acting.strategy["uses_aux_losses"] is False
    # under Adam too (step mode): alpha 0 is joint, alpha > 0 is not
    _, m_joint_a = _fit(data, "joint", optimizer="adam")
    _, m_zero_a = _fit(data, "ogm", alpha=0.0, optimizer="adam")
    assert _same_weights(m_joint_a, m_zero_a)


def _one_step(strategy: Strategy, model: JointFusionModel, opt: torch.optim.Optimizer) -> Any:
    """One training step of ``strategy`` on a fixed batch, from the model's current state."""
    ctx = StrategyContext(
        model, opt, torch.device("cpu"), 1, False, "accuracy", evaluate=lambda _: None
    )  # type: ignore[arg-type,return-value]
    strategy.on_fit_start(ctx)
    strategy.on_epoch_start(ctx, 1)
    g = torch.Generator().manual_seed(3)
    batch = {
        "inputs": {m: torch.randn(8, 3, generator=g) for m in model.modalities},
        "target": torch.randint(0, 3, (8,), generator=g),
        "lengths": {},
    }
    strategy.training_step(ctx, batch)
    return strategy.on_epoch_end(ctx, 1, EvalResult(0.0, {}, 0.0), None)


def _adam_after_a_warm_up_step() -> tuple[JointFusionModel, torch.optim.Optimizer]:
    """A model and an Adam optimizer with non-zero moments (one plain step already taken)."""
    model = _model("concat")
    Joint = build_strategy("joint")
    Joint.configure_model(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    _one_step(Joint, model, opt)
    return model, opt


def _clone(model: JointFusionModel, opt: torch.optim.Optimizer) -> Any:
    import copy

    twin = copy.deepcopy(model)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.05)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    return twin, twin_opt


def test_step_mode_scales_the_dominant_update_by_exactly_k_under_adam() -> None:
    model, opt = _adam_after_a_warm_up_step()
    plain, plain_opt = _clone(model, opt)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    _one_step(build_strategy("joint"), plain, plain_opt)  # unmodulated, from the same state
    record = _one_step(OGM(alpha=1.0), model, opt)  # mode auto -> step (Adam)
    assert record["mode"] == "step"
    coeffs = record["coeff_mean"]  # one batch: the k applied
    dominant = min(coeffs, key=coeffs.get)  # type: ignore[arg-type]
    k = coeffs[dominant]
    assert k < 1.0 and max(coeffs.values()) == 1.0
    got, ref = dict(model.named_parameters()), dict(plain.named_parameters())
    for name, p0 in start.items():
        if name.startswith(f"encoders.{dominant}.") and p0.dim() > 1:
            assert torch.allclose(got[name] - p0, k * (ref[name] - p0), rtol=1e-5, atol=1e-9)
            assert not torch.allclose(got[name], ref[name])
        else:
            assert torch.equal(got[name], ref[name]), name
    # the optimizer state is exactly that of the unmodulated step (moments, step count)
    for a, b in zip(opt.state.values(), plain_opt.state.values(), strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_gradient_mode_is_cancelled_by_adam_which_is_why_step_mode_exists() -> None:
    """Adam's first step is ``lr * g / (|g| + eps)``: a gradient scaled by ``k`` gives the same
    step (up to eps), so the authors' gradient mode leaves Adam's update as joint's."""
    model = _model("concat")
    build_strategy("joint").configure_model(model)
    plain = __import__("copy").deepcopy(model)
    _one_step(build_strategy("joint"), plain, torch.optim.Adam(plain.parameters(), lr=0.05))
    with pytest.warns(UserWarning, match="second-moment"):
        record = _one_step(
            OGM(alpha=1.0, mode="gradient"), model, torch.optim.Adam(model.parameters(), lr=0.05)
        )
    assert min(record["coeff_mean"].values()) < 0.5  # a strong modulation ...
    got, ref = dict(model.named_parameters()), dict(plain.named_parameters())
    for name in got:  # ... that changes nothing
        assert torch.allclose(got[name], ref[name], rtol=0, atol=1e-5), name


def test_step_mode_trains_heads_unlike_joint_under_adam() -> None:
    data = make_toy_splits(n=(128, 40, 40))
    joint, m_joint = _fit(data, "joint", optimizer="adam")
    ogm, m_ogm = _fit(data, "ogm", alpha=1.0, optimizer="adam")
    assert all(r["strategy"]["mode"] == "step" for r in ogm.history)
    assert any(r["strategy"]["modulated_fraction"] > 0 for r in ogm.history)
    for m in ("strong", "weak"):
        heads_j, heads_o = m_joint.heads[m].state_dict(), m_ogm.heads[m].state_dict()
        assert not all(torch.equal(heads_j[k], heads_o[k]) for k in heads_j), m
    assert [r["val_strong"] for r in joint.history] != [r["val_strong"] for r in ogm.history]


def test_step_mode_resumes_exactly(tmp_path: Path) -> None:
    data = make_toy_splits(n=(96, 40, 40))
    for name in ("ogm", "ogm-ge"):
        _, m_full = _fit(data, name, epochs=3, alpha=0.5, optimizer="adam")
        with interrupted_after(2):
            _fit(data, name, epochs=3, alpha=0.5, optimizer="adam", out_dir=tmp_path / name)
        _, m_res = _fit(data, name, epochs=3, alpha=0.5, optimizer="adam", out_dir=tmp_path / name)
        assert _same_weights(m_full, m_res), name


def test_ogm_ge_is_resumable_and_seeded(tmp_path: Path) -> None:
    data = make_toy_splits(n=(96, 40, 40))
    full, m_full = _fit(data, "ogm-ge", epochs=3, alpha=0.5, out_dir=tmp_path / "full")
    with interrupted_after(2):
        _fit(data, "ogm-ge", epochs=3, alpha=0.5, out_dir=tmp_path / "part")
    resumed, m_res = _fit(data, "ogm-ge", epochs=3, alpha=0.5, out_dir=tmp_path / "part")
    assert _same_weights(m_full, m_res)
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in full.history]
    assert strip == [{k: v for k, v in r.items() if k != "time_s"} for r in resumed.history]
    # GE is not neutral at alpha = 0: the noise remains
    _, m_joint = _fit(data, "joint", epochs=1)
    _, m_ge0 = _fit(data, "ogm-ge", epochs=1, alpha=0.0)
    assert not _same_weights(m_joint, m_ge0)


# -- OGM-GE noise ----------------------------------------------------------------------------------
def _ge_grads(seed: int) -> tuple[JointFusionModel, dict[str, Tensor], dict[str, Tensor]]:
    """One GE step on a model with a large first layer (3 x 4000 weights) and fixed latents."""
    torch.manual_seed(0)
    encoders = {m: MLPEncoder(3, 2, hidden=(4000,)) for m in ("a", "b")}
    model = JointFusionModel(encoders, 3, "concat")
    ref = _model("concat")
    model.fused_head.load_state_dict(ref.fused_head.state_dict())
    strategy = OGMGE(alpha=ALPHA, params="all")
    ctx = _ctx(model)
    out, target = _backward(strategy, model)
    with torch.no_grad():  # a known, large gradient for the statistical check
        g = torch.Generator().manual_seed(5)
        params = dict(model.named_parameters())
        for m in ("a", "b"):
            params[f"encoders.{m}.net.0.weight"].grad = 3.0 * torch.randn(4000, 3, generator=g)
    before = _grads(model)
    strategy.on_fit_start(ctx)
    strategy.on_epoch_start(ctx, 1)
    torch.manual_seed(seed)
    fixed = FusionOutput(out.fused, out.unimodal, _fixed_latents("a"))
    strategy.on_after_backward(ctx, fixed, {"target": target})
    return model, before, _grads(model)


def test_ogm_ge_noise_scale_and_targets() -> None:
    _, before, after = _ge_grads(seed=123)
    n = 4000 * 3
    for m, k in (("a", K), ("b", 1.0)):  # noise on both encoders, scaled by the original std
        w = f"encoders.{m}.net.0.weight"
        noise = after[w] - before[w] * k
        sd = float(before[w].std())
        assert float(noise.std()) == pytest.approx(sd, rel=0.05)
        assert abs(float(noise.mean())) < 5 * sd / math.sqrt(n)
        # every encoder parameter gets noise (biases and the second layer too)
        for name in before:
            if name.startswith(f"encoders.{m}."):
                assert not torch.allclose(after[name], before[name] * k), name
    for name in before:  # heads and fused head: untouched
        if not name.startswith("encoders."):
            assert torch.equal(after[name], before[name]), name


def test_gradient_noise_std_stays_a_tensor() -> None:
    g = torch.tensor([1.0, 2.0, 4.0])
    std = gradient_noise_std(g)
    assert isinstance(std, Tensor) and std.dim() == 0 and std.device == g.device
    assert float(std) == pytest.approx(math.sqrt(7 / 3) + 1e-8, rel=1e-6)  # unbiased
    assert float(gradient_noise_std(torch.tensor([5.0]))) == pytest.approx(1e-8)  # no spread


def test_ogm_ge_noise_is_reproducible_with_the_seed() -> None:
    _, _, a1 = _ge_grads(seed=7)
    _, _, a2 = _ge_grads(seed=7)
    _, _, a3 = _ge_grads(seed=8)
    assert all(torch.equal(a1[n], a2[n]) for n in a1)
    assert not torch.equal(a1["encoders.a.net.0.weight"], a3["encoders.a.net.0.weight"])


def test_ge_step_mode_is_the_authors_noise_under_plain_sgd() -> None:
    """Plain SGD: step mode's ``theta_0 + k D - std(D) r`` with ``D = -eta g`` is the authors'
    ``theta_0 - eta (k g + (std(g) + 1e-8) r)``, draw for draw."""
    results = {}
    for mode in ("gradient", "step"):
        model = _model("concat")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(11)
        _one_step(OGMGE(alpha=1.0, mode=mode), model, opt)
        results[mode] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, value in results["gradient"].items():
        assert torch.allclose(results["step"][name], value, rtol=1e-5, atol=1e-8), name


def test_ge_step_mode_keeps_the_noise_out_of_adams_moments() -> None:
    model, opt = _adam_after_a_warm_up_step()
    plain, plain_opt = _clone(model, opt)
    _one_step(build_strategy("joint"), plain, plain_opt)
    record = _one_step(OGMGE(alpha=1.0), model, opt)
    assert record["mode"] == "step"
    for a, b in zip(opt.state.values(), plain_opt.state.values(), strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)
    got, ref = dict(model.named_parameters()), dict(plain.named_parameters())
    for name in got:  # noise on the weights of both encoders, nothing else changed
        moved = not torch.equal(got[name], ref[name])
        assert moved is (name.startswith("encoders.") and got[name].dim() > 1), name


def test_ogm_ge_no_noise_outside_the_window() -> None:
    model, before, record = _run_fixed(OGMGE(alpha=ALPHA, modulation_starts=3), "sum", "a")
    after = _grads(model)
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert record["modulation_active"] is False


# -- multilabel ------------------------------------------------------------------------------------
def test_multilabel_scores_by_hand() -> None:
    """The research note's example: 2 samples x 3 labels, audio slice o_a, visual slice 0."""
    shares = {"a": torch.tensor([[2.0, -2.0, 0.0], [-1.0, 1.0, 3.0]]), "v": torch.zeros(2, 3)}
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    s = miles.strategies.ogm.batch_scores
    assert s(shares, y, multilabel="geometric") == pytest.approx({"a": 1.52779, "v": 1.0}, abs=1e-5)
    assert s(shares, y, multilabel="arithmetic") == pytest.approx(
        {"a": 1.55876, "v": 1.0}, abs=1e-5
    )
    assert s(shares, y, multilabel="positives") == pytest.approx({"a": 1.72261, "v": 1.0}, abs=1e-5)
    # the single-label score is the true class's probability, exp(-CE), summed over the batch
    target = torch.tensor([0, 2])
    ce = torch.nn.functional.cross_entropy(shares["a"], target, reduction="none")
    assert s({"a": shares["a"]}, target)["a"] == pytest.approx(float(torch.exp(-ce).sum()))


def test_multilabel_end_to_end() -> None:
    data = make_toy_splits(n=(96, 30, 30))

    def onehot(ds: Any) -> Any:
        from miles.data import MultimodalDataset

        items = [ds[i] for i in range(len(ds))]
        inputs = {m: torch.stack([it["inputs"][m] for it in items]) for m in data.modalities}
        y = torch.stack([it["target"] for it in items])
        return MultimodalDataset(inputs, torch.nn.functional.one_hot(y, 4).float())

    strategy = OGMGE(alpha=1.0)
    torch.manual_seed(0)
    model = JointFusionModel(data.build_encoders(8), 4, "sum")
    cfg = TrainerConfig(epochs=2, lr=1e-2, batch_size=32, seed=0, progress=False)
    trainer = Trainer(
        model, strategy, cfg, multilabel=True, metric="f1_micro", collate_fn=collate_multimodal
    )
    res = trainer.fit(onehot(data.train), onehot(data.val))
    assert any(r["strategy"]["modulated_fraction"] > 0 for r in res.history)


# -- settings it refuses ---------------------------------------------------------------------------


def test_single_modality_is_refused() -> None:
    model = JointFusionModel({"a": MLPEncoder(3, 2, hidden=(4,))}, 3)
    with pytest.raises(ValueError, match="at least 2 modalities"):
        OGM().configure_model(model)


@pytest.mark.parametrize(
    ("params", "match", "error"),
    [
        ({"alpha": -0.1}, "alpha", ValueError),
        ({"alpha": float("nan")}, "alpha", ValueError),
        ({"alpha": True}, "alpha", TypeError),
        ({"modulation_starts": 0}, "modulation_starts", ValueError),
        ({"modulation_ends": 1.5}, "modulation_ends", TypeError),
        ({"modulation_starts": 5, "modulation_ends": 4}, "modulation_ends", ValueError),
        ({"mode": "adam"}, "mode", ValueError),
        ({"params": "weights"}, "params", ValueError),
        ({"coefficient": "tpami"}, "coefficient", ValueError),
        ({"multilabel_score": "mean"}, "multilabel_score", ValueError),
    ],
)
def test_bad_arguments(params: dict[str, Any], match: str, error: type[Exception]) -> None:
    with pytest.raises(error, match=match):
        OGM(**params)


def test_adam_warning_only_when_it_matters() -> None:
    model = _model("concat")
    with pytest.warns(UserWarning, match="second-moment"):
        OGM(alpha=0.3, mode="gradient").on_fit_start(_ctx(model, adam=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OGM(alpha=0.3).on_fit_start(_ctx(model, adam=True))  # auto: step mode under Adam
        OGM(alpha=0.3).on_fit_start(_ctx(model))  # SGD
        OGM(alpha=0.0, mode="gradient").on_fit_start(_ctx(model, adam=True))  # does nothing


def test_float_targets_are_refused() -> None:
    strategy = OGM()
    model = _model("concat")
    with pytest.raises(ValueError, match="class-index targets"):
        strategy.coefficients(model, _fixed_latents("a"), torch.tensor([[1.0, 0, 0], [0, 1, 0]]))


def test_registry_and_describe() -> None:
    ogm = build_strategy("ogm", alpha=0.8)
    ge = build_strategy("ogm-ge")
    assert isinstance(ogm, miles.strategies.ogm.OGM) and isinstance(ge, OGMGE)
    assert ogm.describe() == {
        "name": "ogm",
        "uses_aux_losses": False,
        "alpha": 0.8,
        "modulation_starts": 1,
        "modulation_ends": 51,
        "mode": "auto",
        "params": "non_1d",
        "coefficient": "cvpr",
        "multilabel_score": "geometric",
        "gaussian_noise": False,
    }
    assert OGM.authors_optimizer == {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 1e-4}
    assert miles.strategies.ogm.AUTHORS_ALPHA == {"cremad": 0.8, "vggsound": 0.1}
    assert ge.describe()["name"] == "ogm-ge" and ge.describe()["gaussian_noise"] is True
    assert ogm.state_dict() == {}
