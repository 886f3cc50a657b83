"""MSLR Keep / Smooth / Dynamic: rates by hand, neutral settings bit for bit, exact resumption."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from miles.data import collate_multimodal
from miles.models import JointFusionModel
from miles.strategies import EvalResult, Strategy, StrategyContext, build_strategy
from miles.strategies.mslr import (  # importing registers mslr-k, mslr-s, mslr-d
    MSLRDynamic,
    MSLRKeep,
    MSLRSmooth,
    smooth_lrs,
)
from miles.training import Trainer, TrainerConfig
from tests.helpers import interrupted_after, same_weights, strip_times

BASE = 1e-2


def _fit(
    data: Any,
    strategy: str | Strategy,
    *,
    epochs: int = 3,
    out_dir: Path | None = None,
    resume: bool = False,
    **params: Any,
) -> tuple[Any, JointFusionModel]:
    strat = build_strategy(strategy, **params) if isinstance(strategy, str) else strategy
    torch.manual_seed(0)
    model = JointFusionModel(data.build_encoders(8), data.num_classes, "concat")
    cfg = TrainerConfig(epochs=epochs, lr=BASE, batch_size=32, seed=0, progress=False)
    trainer = Trainer(model, strat, cfg, out_dir=out_dir, collate_fn=collate_multimodal)
    return trainer.fit(data.train, data.val, data.test, resume=resume), model


def _ctx(model: JointFusionModel, strategy: Strategy, lr: float = BASE) -> StrategyContext:
    opt = torch.optim.Adam(strategy.param_groups(model), lr=lr)
    return StrategyContext(
        model, opt, torch.device("cpu"), 10, False, "accuracy", evaluate=lambda _: None
    )  # type: ignore[arg-type,return-value]


def _tiny_model() -> JointFusionModel:
    torch.manual_seed(0)
    return JointFusionModel(
        {"a": torch.nn.Linear(2, 3), "b": torch.nn.Linear(2, 3)},  # type: ignore[dict-item]
        num_classes=2,
    )


def _group_lrs(ctx: StrategyContext) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in ctx.optimizer.param_groups}


# -- registry, validation -----------------------------------------------------------------------
def test_registered_and_described() -> None:
    keep = build_strategy("mslr-k", unimodal_lrs={"a": 1e-3, "b": 1e-2})
    assert isinstance(keep, MSLRKeep) and not keep.uses_aux_losses  # the paper: no aux losses
    assert keep.describe()["aux_losses"] is False and keep.describe()["uses_aux_losses"] is False
    with_aux = build_strategy("mslr-k", unimodal_lrs={"a": 1e-3}, aux_losses=True)
    assert with_aux.uses_aux_losses and with_aux.describe()["uses_aux_losses"] is True
    assert isinstance(build_strategy("mslr-s", unimodal_lrs={"a": 1e-3}), MSLRSmooth)
    assert isinstance(build_strategy("mslr-d"), MSLRDynamic)
    d = build_strategy("mslr-d", window=3, strength=0.5).describe()
    assert d["name"] == "mslr-d" and d["window"] == 3 and d["rule"] == "eq2"
    assert d["warmup"] == "available" and d["signal"] == "slice" and "update_every" not in d
    assert d["strength"] == 0.5 and d["uses_aux_losses"] is False
    c = build_strategy("mslr-d", rule="compounding", window=3).describe()
    assert c["update_every"] == 3 and "warmup" not in c
    s = build_strategy("mslr-s", unimodal_lrs={"a": 1e-3}, smoothing=0.25).describe()
    assert s["smoothing"] == 0.25 and s["mean"] == "geometric" and s["unimodal_lrs"] == {"a": 1e-3}
    assert s["target"] == "mean" and "joint_lr" not in s
    j = build_strategy("mslr-s", unimodal_lrs={"a": 1e-3}, target="joint").describe()
    assert j["target"] == "joint" and j["joint_lr"] == "base"


def test_aux_losses_attach_the_heads() -> None:
    for aux, detached in ((False, True), (True, False)):
        model = _tiny_model()
        MSLRKeep({"a": 1e-3, "b": 1e-2}, aux_losses=aux).configure_model(model)
        assert model.detach_unimodal_heads is detached


@pytest.mark.parametrize(
    ("key", "params", "match", "error"),
    [
        ("mslr-k", {}, "required", ValueError),
        ("mslr-k", {"unimodal_lrs": {}}, "non-empty", ValueError),
        ("mslr-k", {"unimodal_lrs": {"a": -1e-3}}, "'a'", ValueError),
        ("mslr-k", {"unimodal_lrs": {"a": math.nan}}, "finite number > 0", ValueError),
        ("mslr-k", {"unimodal_lrs": {"a": True}}, "finite number > 0", TypeError),
        ("mslr-s", {"unimodal_lrs": {"a": 1e-3}, "smoothing": 1.5}, "smoothing", ValueError),
        ("mslr-s", {"unimodal_lrs": {"a": 1e-3}, "mean": "harmonic"}, "mean", ValueError),
        ("mslr-s", {"unimodal_lrs": {"a": 1e-3}, "target": "median"}, "target", ValueError),
        ("mslr-s", {"unimodal_lrs": {"a": 1e-3}, "joint_lr": 1e-3}, "joint_lr", ValueError),
        (
            "mslr-s",
            {"unimodal_lrs": {"a": 1e-3}, "target": "joint", "joint_lr": 0},
            "joint_lr",
            ValueError,
        ),
        ("mslr-k", {"unimodal_lrs": {"a": 1e-3}, "aux_weights": 0.5}, "aux_losses", ValueError),
        ("mslr-d", {"window": 0}, "window", ValueError),
        ("mslr-d", {"rule": "cumulative"}, "rule", ValueError),
        ("mslr-d", {"warmup": "skip"}, "warmup", ValueError),
        ("mslr-d", {"signal": "probe"}, "signal", ValueError),
        ("mslr-d", {"update_every": 2}, "compounding", ValueError),
        ("mslr-d", {"rule": "compounding", "update_every": 0}, "update_every", ValueError),
        ("mslr-d", {"strength": -1.0}, "strength", ValueError),
    ],
)
def test_bad_arguments(key: str, params: dict, match: str, error: type[Exception]) -> None:
    with pytest.raises(error, match=match):
        build_strategy(key, **params)


def test_names_must_match_model() -> None:
    model = _tiny_model()
    strategy = MSLRKeep({"a": 1e-3, "c": 1e-2})
    with pytest.raises(ValueError, match=r"missing \['b'\], unknown \['c'\]"):
        strategy.param_groups(model)
    # also caught at on_fit_start when the optimizer was built elsewhere
    opt = torch.optim.Adam(Strategy().param_groups(model), lr=BASE)
    ctx = StrategyContext(model, opt, torch.device("cpu"), 1, False, "accuracy", lambda _: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="missing"):
        strategy.on_fit_start(ctx)


# -- Keep ----------------------------------------------------------------------------------------
def test_keep_sets_group_rates_and_shared_stays_base() -> None:
    model = _tiny_model()
    strategy = MSLRKeep({"a": 1e-4, "b": 3e-3})
    groups = strategy.param_groups(model)
    assert {g["name"]: g.get("lr") for g in groups} == {"a": 1e-4, "b": 3e-3, "shared": None}
    ctx = _ctx(model, strategy)
    strategy.on_fit_start(ctx)
    assert _group_lrs(ctx) == {"a": 1e-4, "b": 3e-3, "shared": BASE}
    rec = strategy.on_epoch_end(ctx, 1, EvalResult(0.5, {"a": 0.1, "b": 0.9}, 1.0), None)
    assert rec == {"lrs": {"a": 1e-4, "b": 3e-3}}
    assert strategy.state_dict() == {}


def test_keep_trains_with_its_rates(toy: Any) -> None:
    _, m_aux = _fit(toy, "joint+aux", epochs=2)
    res, m_keep = _fit(toy, "mslr-k", epochs=2, unimodal_lrs={"strong": 1e-3, "weak": 3e-2})
    for row in res.history:
        assert (row["lr_strong"], row["lr_weak"], row["lr_shared"]) == (1e-3, 3e-2, BASE)
        assert row["strategy"]["lrs"] == {"strong": 1e-3, "weak": 3e-2}
    assert not same_weights(m_aux, m_keep)


def test_heads_can_stay_at_base_rate() -> None:
    model = _tiny_model()
    strategy = MSLRKeep({"a": 1e-4, "b": 3e-3}, head_follows_encoder=False)
    ctx = _ctx(model, strategy)
    strategy.on_fit_start(ctx)
    lr_of = {id(p): g["lr"] for g in ctx.optimizer.param_groups for p in g["params"]}
    assert lr_of[id(model.heads["a"].weight)] == BASE
    assert lr_of[id(model.encoders["a"].weight)] == 1e-4
    assert strategy.describe()["head_follows_encoder"] is False
    with pytest.raises(TypeError, match="head_follows_encoder"):
        MSLRKeep({"a": 1e-4}, head_follows_encoder=1)  # type: ignore[arg-type]


# -- Smooth --------------------------------------------------------------------------------------
def test_smooth_by_hand() -> None:
    lrs = {"a": 1e-4, "b": 1e-2}
    # geometric mean 1e-3; half way on a log scale: sqrt(1e-4 * 1e-3), sqrt(1e-2 * 1e-3)
    geo = smooth_lrs(lrs, 0.5)
    assert geo["a"] == pytest.approx(math.sqrt(1e-7), rel=1e-12)
    assert geo["b"] == pytest.approx(math.sqrt(1e-5), rel=1e-12)
    # arithmetic mean 5.05e-3; a quarter of the way
    ari = smooth_lrs(lrs, 0.25, "arithmetic")
    assert ari["a"] == pytest.approx(0.75 * 1e-4 + 0.25 * 5.05e-3, rel=1e-12)
    assert ari["b"] == pytest.approx(0.75 * 1e-2 + 0.25 * 5.05e-3, rel=1e-12)
    assert smooth_lrs(lrs, 0.0) == lrs
    full = smooth_lrs(lrs, 1.0)
    assert full["a"] == pytest.approx(1e-3) and full["b"] == pytest.approx(1e-3)
    model = _tiny_model()
    strategy = MSLRSmooth(lrs, smoothing=0.5)
    ctx = _ctx(model, strategy)
    strategy.on_fit_start(ctx)
    assert _group_lrs(ctx) == {**geo, "shared": BASE}


PAPER_EXAMPLES = {  # best unimodal rates, best joint rate -> the paper's Smooth rates
    "MuSE": ({"text": 2e-5, "audio": 5e-3}, 3e-4, {"text": 1e-4, "audio": 1e-3}),
    "MELD": ({"text": 1e-4, "audio": 1e-3}, 5e-4, {"text": 2.5e-4, "audio": 7.5e-4}),
    "MM-IMDb": ({"text": 1e-2, "image": 1e-4}, 1e-3, {"text": 3e-3, "image": 3e-4}),
}


@pytest.mark.parametrize(
    ("target", "mean", "error"),
    [("joint", "geometric", 0.11), ("mean", "geometric", 0.15), ("joint", "arithmetic", 0.42)],
)
def test_smooth_rules_on_the_papers_three_examples(target: str, mean: str, error: float) -> None:
    """The docstring's table: each rule's largest error over the six rates, in decades."""
    worst = 0.0
    for lrs, joint, paper in PAPER_EXAMPLES.values():
        strategy = MSLRSmooth(lrs, mean=mean, target=target)
        got = strategy.initial_lrs(list(lrs), joint)
        assert got is not None
        worst = max(worst, *(abs(math.log10(got[m] / paper[m])) for m in lrs))
    assert round(worst, 2) == error


def test_smooth_toward_the_joint_rate_by_hand() -> None:
    # sqrt(2e-5 * 3e-4) and sqrt(5e-3 * 3e-4)
    got = smooth_lrs({"t": 2e-5, "a": 5e-3}, 0.5, target=3e-4)
    assert got == pytest.approx({"t": math.sqrt(6e-9), "a": math.sqrt(1.5e-6)}, rel=1e-12)
    model = _tiny_model()
    strategy = MSLRSmooth({"a": 1e-4, "b": 1e-2}, target="joint")
    assert strategy.param_groups(model)[0].get("lr") is None  # needs the base rate: set later
    ctx = _ctx(model, strategy)
    strategy.on_fit_start(ctx)  # joint rate: the trainer's base rate 1e-2
    assert _group_lrs(ctx) == pytest.approx({"a": 1e-3, "b": 1e-2, "shared": BASE}, rel=1e-12)
    fixed = MSLRSmooth({"a": 1e-4, "b": 1e-2}, target="joint", joint_lr=1e-4)
    assert fixed.initial_lrs(["a", "b"], None) == pytest.approx({"a": 1e-4, "b": 1e-3})


def test_smooth_neutral_settings_are_keep(toy: Any) -> None:
    equal = {"strong": 2e-2, "weak": 2e-2}
    assert smooth_lrs(equal, 0.7) == equal  # exactly, no exp(log(.)) noise
    _, m_keep = _fit(toy, "mslr-k", epochs=2, unimodal_lrs=equal)
    _, m_s = _fit(toy, "mslr-s", epochs=2, unimodal_lrs=equal, smoothing=0.7)
    assert same_weights(m_keep, m_s)
    apart = {"strong": 3e-3, "weak": 3e-2}
    _, m_keep2 = _fit(toy, "mslr-k", epochs=2, unimodal_lrs=apart)
    _, m_s0 = _fit(toy, "mslr-s", epochs=2, unimodal_lrs=apart, smoothing=0.0)
    assert same_weights(m_keep2, m_s0)


# -- Dynamic -------------------------------------------------------------------------------------
def _val(a: float, b: float) -> EvalResult:
    return EvalResult(0.5, {"a": a, "b": b}, 1.0)


#: the research note's rising curve (validation metric after epochs t = 0..7, then a plateau)
CURVE = [0.40, 0.50, 0.55, 0.60, 0.62, 0.65, 0.66, 0.66, 0.66, 0.66, 0.66, 0.66]


def _run_curve(strategy: MSLRDynamic, curve: list[float]) -> list[dict[str, Any]]:
    ctx = _ctx(_tiny_model(), strategy)
    strategy.on_fit_start(ctx)
    return [strategy.on_epoch_end(ctx, t + 1, _val(v, 0.5), None) for t, v in enumerate(curve)]


def test_dynamic_is_eq2_by_hand() -> None:
    """lr(t+1) = lr(0) * v_t / mean(v over the previous <= 5 epochs); lr(0) = 1e-3."""
    recs = _run_curve(MSLRDynamic({"a": 1e-3, "b": 1e-2}, signal="head"), CURVE)
    expected = [
        1.0,  # t = 0: no previous epoch
        0.50 / 0.40,
        0.55 / ((0.40 + 0.50) / 2),
        0.60 / ((0.40 + 0.50 + 0.55) / 3),
        0.62 / ((0.40 + 0.50 + 0.55 + 0.60) / 4),
        0.65 / ((0.40 + 0.50 + 0.55 + 0.60 + 0.62) / 5),
        0.66 / ((0.50 + 0.55 + 0.60 + 0.62 + 0.65) / 5),
        0.66 / ((0.55 + 0.60 + 0.62 + 0.65 + 0.66) / 5),
    ]
    got = [r["lrs"]["a"] for r in recs]
    assert got[:8] == pytest.approx([1e-3 * r for r in expected], rel=1e-12)
    assert got[:8] == pytest.approx(
        [1e-3, 1.25e-3, 1.2222e-3, 1.2414e-3, 1.2098e-3, 1.2172e-3, 1.1301e-3, 1.0714e-3],
        abs=1e-7,
    )
    assert got[11] == 1e-3  # the previous five are all 0.66: back to lr(0) exactly
    assert [r["lrs"]["b"] for r in recs] == [1e-2] * len(CURVE)  # flat signal: r = 1
    hold = _run_curve(MSLRDynamic({"a": 1e-3, "b": 1e-2}, signal="head", warmup="hold"), CURVE)
    assert [r["lrs"]["a"] for r in hold[:5]] == [1e-3] * 5  # until 5 previous epochs exist
    assert hold[5]["lrs"]["a"] == pytest.approx(got[5], rel=1e-12)


def test_compounding_rule_by_hand_never_returns() -> None:
    strategy = MSLRDynamic({"a": 1e-3, "b": 1e-2}, rule="compounding", signal="head")
    recs = _run_curve(strategy, CURVE)
    got = [r["lrs"]["a"] for r in recs]
    first = 0.62 / ((0.40 + 0.50 + 0.55 + 0.60 + 0.62) / 5)  # epoch 5: the window includes it
    second = 0.66 / ((0.65 + 0.66 + 0.66 + 0.66 + 0.66) / 5)  # epoch 10
    assert got[:4] == [1e-3] * 4
    assert got[4:9] == pytest.approx([1e-3 * first] * 5, rel=1e-12)
    assert got[9:] == pytest.approx([1e-3 * first * second] * 3, rel=1e-12)
    assert got[-1] > 1.16e-3  # 16 % above lr(0) on the plateau, for good


def test_dynamic_compounding_with_strength_and_zero_metric() -> None:
    model = _tiny_model()
    strategy = MSLRDynamic(  # starts from the base rate
        window=2, rule="compounding", update_every=1, strength=0.5, signal="head"
    )
    ctx = _ctx(model, strategy)
    strategy.on_fit_start(ctx)
    assert _group_lrs(ctx) == {"a": BASE, "b": BASE, "shared": BASE}
    strategy.on_epoch_end(ctx, 1, _val(0.5, 0.0), None)  # ratio 1 for a; b's metric is 0
    rec = strategy.on_epoch_end(ctx, 2, _val(0.7, 0.0), None)
    assert rec["lrs"]["a"] == pytest.approx(BASE * math.sqrt(0.7 / 0.6), rel=1e-12)
    assert rec["ratio"]["b"] is None and rec["lrs"]["b"] == BASE
    eq2 = MSLRDynamic(window=2, signal="head")
    ctx = _ctx(_tiny_model(), eq2)
    eq2.on_fit_start(ctx)
    eq2.on_epoch_end(ctx, 1, _val(0.5, 0.0), None)
    rec = eq2.on_epoch_end(ctx, 2, _val(0.7, 0.3), None)  # b: mean of previous is 0
    assert rec["ratio"]["b"] is None and rec["lrs"]["b"] == BASE


def test_dynamic_reads_the_fused_head_slice_on_validation() -> None:
    """The default signal is each modality's share of the fused head (the paper's f_N(n))."""
    model = _tiny_model()  # latents of size 3 per modality, 2 classes, concat
    with torch.no_grad():
        model.fused_head.weight.zero_()
        model.fused_head.weight[0, 0] = 1.0  # a's share: (z_a[0], 0); b's share: (0, 0)
        model.fused_head.weight[1, 3] = 1.0  # b's share: (0, z_b[0])
        model.fused_head.bias.zero_()
    strategy = MSLRDynamic({"a": 1e-3, "b": 1e-2})
    assert strategy.needs_latents
    ctx = _ctx(model, strategy)
    strategy.on_fit_start(ctx)
    latents = {
        "a": torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [1.0, 0, 0], [2.0, 0, 0]]),
        "b": torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [-1.0, 0, 0], [-1.0, 0, 0]]),
    }
    target = torch.tensor([0, 1, 0, 1])
    # a predicts class 0 where z_a > 0: (0, 1, 0, 0) -> 3/4 right; b predicts 1 where z_b > 0:
    # (1, 1, 0, 0) -> 2/4 right
    val = EvalResult(0.5, {"a": 0.0, "b": 0.0}, 1.0, latents=latents, target=target)
    rec = strategy.on_epoch_end(ctx, 1, val, None)
    assert rec["signal"] == {"a": 0.75, "b": 0.5}
    with pytest.raises(RuntimeError, match="latents"):
        strategy.on_epoch_end(ctx, 2, _val(0.5, 0.5), None)


def test_dynamic_strength_zero_is_keep_bit_for_bit(toy: Any) -> None:
    lrs = {"strong": 3e-3, "weak": 2e-2}
    _, m_keep = _fit(toy, "mslr-k", epochs=3, unimodal_lrs=lrs)
    res, m_d = _fit(toy, "mslr-d", epochs=3, unimodal_lrs=lrs, window=2, strength=0.0)
    assert any(r != 1.0 for row in res.history for r in row["strategy"]["ratio"].values())
    assert same_weights(m_keep, m_d)


def test_dynamic_changes_rates_and_resumes_exactly(tmp_path: Path, toy: Any) -> None:
    params = {"unimodal_lrs": {"strong": 3e-3, "weak": 2e-2}, "window": 2}
    full, m_full = _fit(toy, "mslr-d", epochs=4, out_dir=tmp_path / "full", **params)
    lrs = [r["lr_weak"] for r in full.history]
    assert len(set(lrs)) > 1  # the rates did move
    with interrupted_after(2):
        _fit(toy, "mslr-d", epochs=4, out_dir=tmp_path / "part", **params)
    resumed, m_res = _fit(toy, "mslr-d", epochs=4, out_dir=tmp_path / "part", resume=True, **params)
    assert strip_times(resumed.history) == strip_times(full.history)
    assert same_weights(m_full, m_res)


def test_dynamic_state_survives_weights_only_load() -> None:
    model = _tiny_model()
    strategy = MSLRDynamic({"a": 1e-3, "b": 1e-2}, window=2, signal="head")
    ctx = _ctx(model, strategy)
    strategy.on_fit_start(ctx)
    for e, (a, b) in enumerate([(0.3, 0.6), (0.6, 0.5)], 1):
        strategy.on_epoch_end(ctx, e, _val(a, b), None)
    buf = io.BytesIO()
    torch.save(strategy.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    # loaded before on_fit_start (the trainer's order), applied by on_fit_start: same rates
    other = MSLRDynamic({"a": 1e-3, "b": 1e-2}, window=2, signal="head")
    other.load_state_dict(state)
    assert other.state_dict() == state  # kept as loaded until applied
    ctx2 = _ctx(model, other)
    other.on_fit_start(ctx2)
    assert _group_lrs(ctx2) == _group_lrs(ctx) and other.history == strategy.history
    with pytest.raises(ValueError, match="unexpected state keys"):
        other.load_state_dict({**state, "bogus": 1})
