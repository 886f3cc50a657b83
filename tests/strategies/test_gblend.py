"""G-Blend: the weight formula by hand, per-head copies on a fixed tiny model by hand, the paper's
schedule, no absorbing zero weight, offline and trajectory modes, neutrality and resumption."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

import miles.strategies.gblend as gb
from miles.data import DatasetSplits, MultimodalDataset, collate_multimodal
from miles.models import JointFusionModel
from miles.models.encoders import MLPEncoder
from miles.models.losses import head_losses
from miles.strategies import EvalResult, Strategy, StrategyContext, build_strategy
from miles.strategies.gblend import GBlend, estimate_with_copies, gblend_weights, ogr_terms
from miles.strategies.joint import JointAux
from miles.training import Trainer, TrainerConfig
from tests.conftest import make_toy_splits
from tests.helpers import interrupted_after, same_weights

HEADS = ("fused", "strong", "weak")


@pytest.fixture
def small() -> DatasetSplits:
    return make_toy_splits(n=(120, 40, 40))


def _fit(
    data: Any,
    strategy: Strategy,
    *,
    epochs: int = 4,
    seed: int = 0,
    out_dir: Path | None = None,
    resume: bool = False,
    multilabel: bool = False,
    metric: str = "accuracy",
) -> tuple[Any, JointFusionModel]:
    torch.manual_seed(seed)
    model = JointFusionModel(data.build_encoders(8), data.num_classes)
    cfg = TrainerConfig(epochs=epochs, lr=1e-2, batch_size=32, seed=seed, progress=False)
    trainer = Trainer(
        model,
        strategy,
        cfg,
        out_dir=out_dir,
        collate_fn=collate_multimodal,
        multilabel=multilabel,
        metric=metric,
    )
    return trainer.fit(data.train, data.val, resume=resume), model


def _records(result: Any) -> list[dict[str, Any]]:
    return [row["strategy"] for row in result.history]


# -- the weight formula ----------------------------------------------------------------------------
def test_weights_hand_computed() -> None:
    train_prev = {"fused": 1.0, "a": 1.2, "b": 1.5}
    hold_prev = {"fused": 1.1, "a": 1.3, "b": 1.6}
    train_now = {"fused": 0.5, "a": 0.8, "b": 1.3}
    hold_now = {"fused": 0.9, "a": 1.0, "b": 1.5}
    # fused: G = 0.2, O 0.1 -> 0.4, dO = 0.3: 0.2 / 0.09 = 20/9
    # a:     G = 0.3, O 0.1 -> 0.2, dO = 0.1: 0.3 / 0.01 = 30 = 270/9
    # b:     G = 0.1, O 0.1 -> 0.2, dO = 0.1: 0.1 / 0.01 = 10 = 90/9     (Z = 380/9)
    w = gblend_weights(train_prev, train_now, hold_prev, hold_now)
    assert w == pytest.approx({"fused": 1 / 19, "a": 27 / 38, "b": 9 / 38}, rel=1e-9)
    w3 = gblend_weights(train_prev, train_now, hold_prev, hold_now, total=3.0)
    assert w3 == pytest.approx({"fused": 3 / 19, "a": 81 / 38, "b": 27 / 38}, rel=1e-9)
    terms = ogr_terms(train_prev, train_now, hold_prev, hold_now)
    assert terms["G"] == pytest.approx({"fused": 0.2, "a": 0.3, "b": 0.1})
    assert terms["dO"] == pytest.approx({"fused": 0.3, "a": 0.1, "b": 0.1})


def test_negative_generalisation_clamp_signed_abs() -> None:
    """The research note's example: heads a, v, av; then a's held-out loss rises 1.30 -> 1.35."""
    train_prev = {"a": 1.20, "v": 1.50, "av": 1.10}
    train_now = {"a": 0.80, "v": 1.20, "av": 0.60}
    hold_prev = {"a": 1.30, "v": 1.55, "av": 1.20}
    hold_now = {"a": 1.10, "v": 1.30, "av": 1.00}
    # raw = G / dO^2: a 0.2 / 0.04 = 5, v 0.25 / 0.0025 = 100, av 0.2 / 0.09 = 2.2222
    w = gblend_weights(train_prev, train_now, hold_prev, hold_now)
    z = 5 + 100 + 0.2 / 0.09
    assert w == pytest.approx({"a": 5 / z, "v": 100 / z, "av": 0.2 / 0.09 / z}, rel=1e-9)
    assert w == pytest.approx({"a": 0.04663, "v": 0.93264, "av": 0.02073}, abs=1e-5)
    worse = {**hold_now, "a": 1.35}  # G = -0.05, dO = 0.55 - 0.10 = 0.45: raw -0.24691
    raw_a = -0.05 / 0.45**2
    for negative, a_value in (("clamp", 0.0), ("signed", raw_a), ("abs", -raw_a)):
        got = gblend_weights(train_prev, train_now, hold_prev, worse, negative=negative)
        z = a_value + 100 + 0.2 / 0.09
        expected = {"a": a_value / z, "v": 100 / z, "av": 0.2 / 0.09 / z}
        assert got == pytest.approx(expected, rel=1e-9), negative
    signed = gblend_weights(train_prev, train_now, hold_prev, worse, negative="signed")
    assert signed == pytest.approx({"a": -0.00242, "v": 0.98063, "av": 0.02179}, abs=1e-5)
    with pytest.raises(ValueError, match="negative"):
        gblend_weights(train_prev, train_now, hold_prev, worse, negative="relu")


def test_guards_no_gain_and_no_overfitting() -> None:
    same = {"fused": 1.0, "a": 1.0}
    w = gblend_weights(same, {"fused": 0.5, "a": 0.5}, same, {"fused": 0.8, "a": 1.1})
    assert w == {"fused": 1.0, "a": 0.0}
    # nobody improved: uniform (signed too: the ratios sum below 0)
    for negative in ("clamp", "signed"):
        w = gblend_weights(same, same, same, {"fused": 1.2, "a": 1.1}, total=2.0, negative=negative)
        assert w == {"fused": 1.0, "a": 1.0}
    w = gblend_weights(same, {"fused": 0.5, "a": 0.9}, same, {"fused": 0.9, "a": 0.9}, eps=1e-6)
    assert w["a"] == pytest.approx(0.1 / 1e-6 / (0.1 / 1e-6 + 0.1 / 0.16))
    with pytest.raises(ValueError, match="heads"):
        gblend_weights(same, {"fused": 1.0}, same, same)
    with pytest.raises(ValueError, match="finite"):
        gblend_weights(same, same, same, {"fused": float("nan"), "a": 1.0})
    with pytest.raises(ValueError, match="eps"):
        gblend_weights(same, same, same, same, eps=0.0)


def test_uniform_floor() -> None:
    same = {"fused": 1.0, "a": 1.0, "b": 1.0}
    train_now = {"fused": 0.5, "a": 0.6, "b": 0.8}
    hold_now = {"fused": 1.1, "a": 0.8, "b": 0.9}  # a: 0.2/0.04 = 5; b: 0.1/0.01 = 10
    assert gblend_weights(same, train_now, same, hold_now) == pytest.approx(
        {"fused": 0.0, "a": 1 / 3, "b": 2 / 3}, rel=1e-9
    )
    w = gblend_weights(same, train_now, same, hold_now, uniform_floor=0.3)
    assert w == pytest.approx({"fused": 0.1, "a": 0.1 + 0.7 / 3, "b": 0.1 + 1.4 / 3}, rel=1e-9)
    w = gblend_weights(same, train_now, same, hold_now, uniform_floor=1.0)
    assert w == pytest.approx(dict.fromkeys(same, 1 / 3), rel=1e-9)


# -- Alg. 1 on a fixed tiny model, by hand --------------------------------------------------------
class _Scalar(nn.Module):
    """The latent is the 1-d input itself."""

    out_features = 1

    def forward(self, x: Tensor) -> Tensor:
        return x


def _scalar_split(rows: list[tuple[float, float, int]]) -> MultimodalDataset:
    xa = torch.tensor([[r[0]] for r in rows])
    xb = torch.tensor([[r[1]] for r in rows])
    return MultimodalDataset({"a": xa, "b": xb}, torch.tensor([r[2] for r in rows]))


def _loader(rows: list[tuple[float, float, int]]) -> DataLoader:
    return DataLoader(_scalar_split(rows), batch_size=len(rows), collate_fn=collate_multimodal)


def _tiny_ctx() -> StrategyContext:
    model = JointFusionModel({"a": _Scalar(), "b": _Scalar()}, 2, "concat")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return StrategyContext(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=2.0),
        device=torch.device("cpu"),
        epochs=1,
        multilabel=False,
        metric="accuracy",
        evaluate=lambda loader: EvalResult(0.0, {}, 0.0),
        train_loader=_loader([(1.0, 2.0, 0), (-1.0, 0.0, 1)]),  # T, one full batch
        train_probe_loader=_loader([(1.0, 2.0, 0), (-1.0, 0.0, 1)]),  # T' = T
        holdout_loader=_loader([(0.5, 1.0, 0), (1.0, -1.0, 1)]),  # V
        make_optimizer=lambda groups: torch.optim.SGD(groups, lr=2.0),
    )


def test_copies_by_hand_on_a_fixed_tiny_model() -> None:
    """Every head starts at 0 (logits 0: loss ln 2 everywhere, O_N = 0). One SGD step (lr 2, full
    batch, p = (1/2, 1/2)) of head i's loss alone: the head's weight grad is mean (p - y) z, the
    bias grad 0 (balanced classes), the encoder grad 0 (the head is 0). So each copy's head
    becomes logits (s, -s) with s = x_a (head a), x_b (head b), x_a + x_b (fused). A sample's loss
    is log(1 + e^{-2s}) for class 0 and log(1 + e^{2s}) for class 1."""
    ctx = _tiny_ctx()
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    losses = estimate_with_copies(ctx, epochs=1, seed=0)
    assert all(torch.equal(before[k], v) for k, v in ctx.model.state_dict().items())

    def ce0(s: float) -> float:
        return math.log1p(math.exp(-2 * s))

    def ce1(s: float) -> float:
        return math.log1p(math.exp(2 * s))

    ln2 = math.log(2)
    # T' = (x_a, x_b, y): (1, 2, 0), (-1, 0, 1);  V: (0.5, 1, 0), (1, -1, 1)
    expected = {
        "train_prev": dict.fromkeys(("fused", "a", "b"), ln2),
        "holdout_prev": dict.fromkeys(("fused", "a", "b"), ln2),
        "train_now": {
            "fused": (ce0(3.0) + ce1(-1.0)) / 2,
            "a": (ce0(1.0) + ce1(-1.0)) / 2,
            "b": (ce0(2.0) + ce1(0.0)) / 2,
        },
        "holdout_now": {
            "fused": (ce0(1.5) + ce1(0.0)) / 2,
            "a": (ce0(0.5) + ce1(1.0)) / 2,
            "b": (ce0(1.0) + ce1(-1.0)) / 2,
        },
    }
    for key, values in expected.items():
        assert losses[key] == pytest.approx(values, rel=1e-6), key
    # G = ln 2 - L^V: a -0.52695 (a over-fits V), b 0.56622, fused 0.32228;
    # dO = L^V - L^T: a 1.09317, b -0.22872, fused 0.30617; clamp: a -> 0
    w = gblend_weights(**losses)
    assert w == pytest.approx({"fused": 0.24107, "a": 0.0, "b": 0.75893}, abs=1e-5)


# -- the schedule ----------------------------------------------------------------------------------
def test_schedule_of_the_paper() -> None:
    online = GBlend()
    lengths = {n: online.estimate_length(n, 40) for n in range(41)}
    assert {n: k for n, k in lengths.items() if k} == {
        0: 10,
        10: 5,
        15: 5,
        20: 5,
        25: 5,
        30: 5,
        35: 5,
        40: 5,
    }
    offline = GBlend(mode="offline")
    assert offline.estimate_length(0, 30) == 30 and offline.estimate_length(5, 30) is None
    assert GBlend(mode="offline", offline_epochs=7).estimate_length(0, 30) == 7
    assert GBlend(mode="trajectory").estimate_length(0, 30) is None


def test_online_estimates_from_copies_at_the_scheduled_epochs(small: DatasetSplits) -> None:
    res, _ = _fit(small, GBlend(warmup_epochs=2, super_epoch=1), epochs=4)
    recs = _records(res)
    assert [r["estimated"] for r in recs] == [True, False, True, True]
    assert [recs[i]["estimate"]["checkpoint"] for i in (0, 2, 3)] == [0, 2, 3]
    assert [recs[i]["estimate"]["copy_epochs"] for i in (0, 2, 3)] == [2, 1, 1]
    for i in (0, 2, 3):
        est = recs[i]["estimate"]
        losses = {k: est[k] for k in ("train_prev", "train_now", "holdout_prev", "holdout_now")}
        assert est["weights"] == gblend_weights(**losses)
        assert recs[i]["weights"] == est["weights"]  # used for the epoch it was made for
        assert sum(est["weights"].values()) == pytest.approx(1.0)
    assert recs[1]["weights"] == recs[0]["weights"]  # fixed through the super-epoch


def test_no_absorbing_zero_weight_over_30_epochs(
    small: DatasetSplits, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The weak head is forced to weight 0 at the first estimate; every later estimate re-tests it
    with its own copy, so its weight comes back (the trajectory estimator could not: a head that
    no longer trains has no generalisation to measure)."""
    real = gb.gblend_weights
    calls = []

    def first_drops_weak(*args: Any, **kwargs: Any) -> dict[str, float]:
        w = real(*args, **kwargs)
        calls.append(w)
        if len(calls) == 1:
            w = {"fused": w["fused"] + w["weak"], "strong": w["strong"], "weak": 0.0}
        return w

    monkeypatch.setattr(gb, "gblend_weights", first_drops_weak)
    res, _ = _fit(small, GBlend(), epochs=30)
    estimates = [r["estimate"] for r in _records(res) if r["estimated"]]
    assert [e["checkpoint"] for e in estimates] == [0, 10, 15, 20, 25]
    assert estimates[0]["weights"]["weak"] == 0.0
    assert all(r["weights"]["weak"] == 0.0 for r in _records(res)[:10])  # the first super-epoch
    assert estimates[1]["weights"]["weak"] > 0  # back at the very next estimate
    # no zero is absorbing: every head at 0 at some estimate is above 0 at a later one (a copy can
    # still over-fit V in its window, G < 0, and give 0 again: that is the formula, not a trap)
    for head in HEADS:
        weights = [e["weights"][head] for e in estimates]
        for k, w in enumerate(weights[:-1]):
            assert w > 0 or any(later > 0 for later in weights[k + 1 :]), (head, weights)


def test_offline_estimates_once_with_copies_trained_for_the_run(small: DatasetSplits) -> None:
    res, _ = _fit(small, GBlend(mode="offline"), epochs=3)
    recs = _records(res)
    assert [r["estimated"] for r in recs] == [True, False, False]
    assert recs[0]["estimate"]["copy_epochs"] == 3
    assert recs[0]["weights"] == recs[1]["weights"] == recs[2]["weights"]


def test_trajectory_mode_reads_the_run_itself(small: DatasetSplits) -> None:
    res, _ = _fit(small, GBlend(mode="trajectory", warmup_epochs=2, super_epoch=1), epochs=4)
    recs = _records(res)
    uniform = dict.fromkeys(HEADS, 1 / 3)
    assert [r["estimated"] for r in recs] == [False, True, True, True]
    assert recs[0]["weights"] == recs[1]["weights"] == uniform
    assert recs[1]["estimate"]["checkpoint"] == 0 and recs[1]["estimate"]["applies_from"] == 3
    assert recs[2]["weights"] == recs[1]["estimate"]["weights"]  # from the next epoch
    assert recs[2]["estimate"]["train_prev"] == recs[1]["estimate"]["train_now"]
    assert recs[2]["estimate"]["holdout_prev"] == recs[1]["estimate"]["holdout_now"]


def test_uniform_weights_equal_joint_aux_bit_for_bit_even_with_copies(
    small: DatasetSplits,
) -> None:
    """``uniform_floor=1`` and weights summing to H: every estimate still trains its copies, and
    the run is joint+aux exactly (the copies do not touch it)."""
    ref = JointAux()
    ref.holdout_fraction = 0.08  # the same split as G-Blend's
    aux, m_aux = _fit(small, ref, epochs=4)
    blend = GBlend(uniform_floor=1.0, normalize="sum-to-heads", warmup_epochs=2, super_epoch=1)
    got, m_got = _fit(small, blend, epochs=4)
    assert [r["estimated"] for r in _records(got)] == [True, False, True, True]
    assert all(r["weights"] == dict.fromkeys(HEADS, 1.0) for r in _records(got))
    assert same_weights(m_aux, m_got)
    assert [r["val_fused"] for r in aux.history] == [r["val_fused"] for r in got.history]


def test_resume_mid_super_epoch_reproduces_the_run(small: DatasetSplits, tmp_path: Path) -> None:
    make = lambda: GBlend(warmup_epochs=2, super_epoch=2)  # noqa: E731
    full, m_full = _fit(small, make(), epochs=5)
    with interrupted_after(3):
        _fit(small, make(), epochs=5, out_dir=tmp_path)
    resumed, m_res = _fit(small, make(), epochs=5, out_dir=tmp_path, resume=True)
    assert same_weights(m_full, m_res)
    assert _records(full) == _records(resumed)


def test_state_dict_round_trips_through_weights_only_load() -> None:
    s = GBlend(mode="trajectory")
    s.weights = {"fused": 0.2, "a": 0.8}
    s._ref_epoch, s._ref_train, s._ref_holdout = 4, {"fused": 1.0, "a": 2.0}, {"fused": 1.5}
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    t = GBlend(mode="trajectory")
    t.load_state_dict(torch.load(buf, weights_only=True))
    assert t.state_dict() == s.state_dict()
    with pytest.raises(ValueError, match="keys"):
        t.load_state_dict({"weights": {}})


def test_constructor_validation_and_describe() -> None:
    for bad, error in (
        ({"mode": "fast"}, ValueError),
        ({"warmup_epochs": 0}, ValueError),
        ({"super_epoch": 0}, ValueError),
        ({"super_epoch": 2.0}, TypeError),
        ({"offline_epochs": 0}, ValueError),
        ({"holdout_fraction": 0.0}, ValueError),
        ({"normalize": "softmax"}, ValueError),
        ({"negative": "relu"}, ValueError),
        ({"eps": -1.0}, ValueError),
        ({"uniform_floor": 1.1}, ValueError),
    ):
        with pytest.raises(error, match=next(iter(bad))):
            GBlend(**bad)  # type: ignore[arg-type]
    s = build_strategy("gblend", super_epoch=3)
    assert isinstance(s, GBlend) and s.holdout_fraction == 0.08
    assert s.describe() == {
        "name": "gblend",
        "mode": "online",
        "warmup_epochs": 10,
        "super_epoch": 3,
        "holdout_fraction": 0.08,
        "normalize": "sum-to-one",
        "negative": "clamp",
        "eps": 1e-8,
        "uniform_floor": 0.0,
        "uses_aux_losses": True,
    }
    assert GBlend(mode="offline").describe()["offline_epochs"] is None


def test_loss_is_the_weighted_sum() -> None:
    torch.manual_seed(0)
    model = JointFusionModel({m: MLPEncoder(3, 4, hidden=()) for m in ("a", "b")}, 2)
    s = GBlend()
    s.weights = {"fused": 0.5, "a": 0.2, "b": 0.3}
    batch = {
        "inputs": {"a": torch.randn(5, 3), "b": torch.randn(5, 3)},
        "target": torch.arange(5) % 2,
    }
    out = model(batch["inputs"])
    losses = head_losses(out, batch["target"])
    expected = 0.5 * losses["fused"] + 0.2 * losses["a"] + 0.3 * losses["b"]
    assert torch.equal(s.loss(losses, out, batch), expected)


def test_three_modalities_multilabel() -> None:
    data = make_toy_splits(("a", "b", "c"), (0.3, 1.0, 2.0), n=(80, 20, 20), num_classes=3)

    def multilabel(ds: Any) -> MultimodalDataset:
        y = torch.stack([ds[i]["target"] for i in range(len(ds))])
        inputs = {m: torch.stack([ds[i]["inputs"][m] for i in range(len(ds))]) for m in "abc"}
        return MultimodalDataset(inputs, torch.nn.functional.one_hot(y, 3).float())

    ml = DatasetSplits(
        train=multilabel(data.train),
        val=multilabel(data.val),
        test=multilabel(data.test),
        modalities=data.modalities,
        num_classes=3,
        multilabel=True,
        metric="f1_micro",
        info={"name": "toy-ml"},
        build_encoders=data.build_encoders,
    )
    res, _ = _fit(
        ml, GBlend(warmup_epochs=1, super_epoch=1), epochs=2, multilabel=True, metric="f1_micro"
    )
    last = _records(res)[-1]["estimate"]["weights"]
    assert set(last) == {"fused", "a", "b", "c"}
    assert sum(last.values()) == pytest.approx(1.0)


def test_setup_errors(small: DatasetSplits) -> None:
    s = GBlend()
    s.holdout_fraction = 0.0
    with pytest.raises(ValueError, match="held-out"):
        _fit(small, s, epochs=1)

    class Detached(GBlend):
        def configure_model(self, model: JointFusionModel) -> None:
            model.detach_unimodal_heads = True

    with pytest.raises(ValueError, match="detach_unimodal_heads"):
        _fit(small, Detached(), epochs=1)
