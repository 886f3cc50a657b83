"""G-Blend: the weight formula by hand, the loss blend, the schedule, neutrality and resumption."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

import miles.strategies.gblend as gb
from miles.data import DatasetSplits, MultimodalDataset, collate_multimodal
from miles.models import JointFusionModel
from miles.models.encoders import MLPEncoder
from miles.models.fusion import FusionOutput
from miles.models.losses import head_losses
from miles.strategies import EvalResult, Strategy, StrategyContext, build_strategy
from miles.strategies.gblend import GBlend, gblend_weights
from miles.strategies.joint import JointAux
from miles.training import Trainer, TrainerConfig
from tests.conftest import make_toy_splits

HEADS = ("fused", "strong", "weak")


@pytest.fixture
def small() -> DatasetSplits:
    """Half the usual toy task: these tests run several fits each."""
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


def _same_weights(a: JointFusionModel, b: JointFusionModel) -> bool:
    pa, pb = a.state_dict(), b.state_dict()
    return pa.keys() == pb.keys() and all(
        torch.equal(pa[k], pb[k]) for k in pa if isinstance(pa[k], torch.Tensor)
    )


def _records(result: Any) -> list[dict[str, Any]]:
    return [row["strategy"] for row in result.history]


# -- the weight formula ----------------------------------------------------------------------------
def test_weights_hand_computed() -> None:
    train_prev = {"fused": 1.0, "a": 1.2, "b": 1.5}
    hold_prev = {"fused": 1.1, "a": 1.3, "b": 1.6}
    train_now = {"fused": 0.5, "a": 0.8, "b": 1.3}
    hold_now = {"fused": 0.9, "a": 1.0, "b": 1.5}
    # fused: dG = 0.2, O 0.1 -> 0.4, dO = 0.3: 0.2 / 0.09 = 20/9
    # a:     dG = 0.3, O 0.1 -> 0.2, dO = 0.1: 0.3 / 0.01 = 30 = 270/9
    # b:     dG = 0.1, O 0.1 -> 0.2, dO = 0.1: 0.1 / 0.01 = 10 = 90/9     (Z = 380/9)
    w = gblend_weights(train_prev, train_now, hold_prev, hold_now)
    assert w == pytest.approx({"fused": 1 / 19, "a": 27 / 38, "b": 9 / 38}, rel=1e-9)
    assert sum(w.values()) == pytest.approx(1.0)
    w3 = gblend_weights(train_prev, train_now, hold_prev, hold_now, total=3.0)
    assert w3 == pytest.approx({"fused": 3 / 19, "a": 81 / 38, "b": 27 / 38}, rel=1e-9)


def test_equal_ogr_gives_uniform_weights() -> None:
    # same dG = 0.2 and |dO| = 0.1 for every head (one with overfitting shrinking: sign is squared)
    train_prev = {"fused": 1.0, "a": 2.0, "b": 0.5}
    hold_prev = {"fused": 1.0, "a": 2.0, "b": 0.7}
    train_now = {"fused": 0.7, "a": 1.7, "b": 0.4}
    hold_now = {"fused": 0.8, "a": 1.8, "b": 0.5}
    w = gblend_weights(train_prev, train_now, hold_prev, hold_now)
    assert w == pytest.approx(dict.fromkeys(w, 1 / 3), rel=1e-9)
    w = gblend_weights(train_prev, train_now, hold_prev, hold_now, total=3.0)
    assert w == pytest.approx(dict.fromkeys(w, 1.0), rel=1e-9)


def test_guards_no_gain_and_no_overfitting() -> None:
    same = {"fused": 1.0, "a": 1.0}
    # a's held-out loss got worse: weight 0, everything on the fused head
    w = gblend_weights(same, {"fused": 0.5, "a": 0.5}, same, {"fused": 0.8, "a": 1.1})
    assert w == {"fused": 1.0, "a": 0.0}
    # nobody improved: uniform
    w = gblend_weights(same, same, same, {"fused": 1.2, "a": 1.1}, total=2.0)
    assert w == {"fused": 1.0, "a": 1.0}
    # dO = 0 exactly for "a": eps floor, a takes (almost) everything
    w = gblend_weights(same, {"fused": 0.5, "a": 0.9}, same, {"fused": 0.9, "a": 0.9}, eps=1e-6)
    assert w["a"] == pytest.approx(0.1 / 1e-6 / (0.1 / 1e-6 + 0.1 / 0.16))
    with pytest.raises(ValueError, match="heads"):
        gblend_weights(same, {"fused": 1.0}, same, same)
    with pytest.raises(ValueError, match="finite"):
        gblend_weights(same, same, same, {"fused": float("nan"), "a": 1.0})
    with pytest.raises(ValueError, match="eps"):
        gblend_weights(same, same, same, same, eps=0.0)


def test_uniform_floor_keeps_every_head_training() -> None:
    same = {"fused": 1.0, "a": 1.0, "b": 1.0}
    train_now = {"fused": 0.5, "a": 0.6, "b": 0.8}
    # fused got worse on held-out: the paper's weight is 0
    # a: dG = 0.2, O 0 -> 0.2: 0.2 / 0.04 = 5;  b: dG = 0.1, O 0 -> 0.1: 0.1 / 0.01 = 10
    hold_now = {"fused": 1.1, "a": 0.8, "b": 0.9}
    w = gblend_weights(same, train_now, same, hold_now)
    assert w == pytest.approx({"fused": 0.0, "a": 1 / 3, "b": 2 / 3}, rel=1e-9)
    # floor 0.3 of the uniform share (1/3): w = 0.3 * 1/3 + 0.7 * w_paper
    w = gblend_weights(same, train_now, same, hold_now, uniform_floor=0.3)
    assert w == pytest.approx({"fused": 0.1, "a": 0.1 + 0.7 / 3, "b": 0.1 + 1.4 / 3}, rel=1e-9)
    assert sum(w.values()) == pytest.approx(1.0)
    # with sum-to-heads the floor scales with the uniform weight (1): fused gets 0.3
    w = gblend_weights(same, train_now, same, hold_now, total=3.0, uniform_floor=0.3)
    assert w == pytest.approx({"fused": 0.3, "a": 0.3 + 0.7, "b": 0.3 + 1.4}, rel=1e-9)
    # floor 1: uniform whatever the losses
    w = gblend_weights(same, train_now, same, hold_now, uniform_floor=1.0)
    assert w == pytest.approx(dict.fromkeys(same, 1 / 3), rel=1e-9)
    with pytest.raises(ValueError, match="uniform_floor"):
        gblend_weights(same, train_now, same, hold_now, uniform_floor=1.5)


def test_uniform_floor_end_to_end(small: DatasetSplits) -> None:
    res, _ = _fit(small, GBlend(super_epoch=1, uniform_floor=0.5), epochs=3)
    for r in _records(res):
        paper = gblend_weights(r["train_prev"], r["train_now"], r["holdout_prev"], r["holdout_now"])
        assert r["next_weights"] == {h: 0.5 / 3 + 0.5 * paper[h] for h in HEADS}
        assert min(r["next_weights"].values()) >= 0.5 / 3 - 1e-12


def test_constructor_validation_and_describe() -> None:
    for bad, error in (
        ({"super_epoch": 0}, ValueError),
        ({"super_epoch": 2.0}, TypeError),
        ({"holdout_fraction": 0.0}, ValueError),
        ({"holdout_fraction": 1.0}, ValueError),
        ({"normalize": "softmax"}, ValueError),
        ({"eps": -1.0}, ValueError),
        ({"uniform_floor": -0.1}, ValueError),
        ({"uniform_floor": 1.1}, ValueError),
        ({"uniform_floor": float("nan")}, ValueError),
    ):
        with pytest.raises(error, match=next(iter(bad))):
            GBlend(**bad)  # type: ignore[arg-type]
    s = build_strategy("gblend", super_epoch=3)
    assert isinstance(s, GBlend) and s.holdout_fraction == 0.1
    assert s.describe() == {
        "name": "gblend",
        "super_epoch": 3,
        "holdout_fraction": 0.1,
        "normalize": "sum-to-one",
        "eps": 1e-8,
        "uniform_floor": 0.0,
        "uses_aux_losses": True,
    }


# -- the blended loss on a tiny model --------------------------------------------------------------
def test_loss_is_the_weighted_sum_and_scales_gradients() -> None:
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
    total = s.loss(losses, out, batch)
    expected = 0.5 * losses["fused"] + 0.2 * losses["a"] + 0.3 * losses["b"]
    assert torch.equal(total, expected)
    total.backward()
    grad_fused_head = model.fused_head.weight.grad.clone()  # type: ignore[union-attr]
    grad_head_a = model.heads["a"].weight.grad.clone()  # type: ignore[union-attr]
    model.zero_grad()
    head_losses(model(batch["inputs"]), batch["target"])["fused"].backward()
    assert torch.allclose(grad_fused_head, 0.5 * model.fused_head.weight.grad)  # type: ignore[operator]
    model.zero_grad()
    head_losses(model(batch["inputs"]), batch["target"])["a"].backward()
    assert torch.allclose(grad_head_a, 0.2 * model.heads["a"].weight.grad)  # type: ignore[operator]


# -- end to end ------------------------------------------------------------------------------------
def test_neutral_uniform_weights_equal_joint_aux_bit_for_bit(
    small: DatasetSplits, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = JointAux()
    ref.holdout_fraction = 0.1  # same train/held-out split as G-Blend
    aux, m_aux = _fit(small, ref, epochs=4)
    # (1) no estimate within the run: uniform weights = 1 per head
    never, m_never = _fit(small, GBlend(super_epoch=10, normalize="sum-to-heads"), epochs=4)
    assert _same_weights(m_aux, m_never)
    assert all(r["weights"] == dict.fromkeys(HEADS, 1.0) for r in _records(never))
    # the paper's sum-to-one scale (1/3 each) is not joint+aux, even with Adam: the test can tell
    _, m_one = _fit(small, GBlend(super_epoch=10), epochs=4)
    assert not _same_weights(m_aux, m_one)
    # (2) estimates every 2 epochs (held-out passes and all) that come out uniform
    monkeypatch.setattr(gb, "gblend_weights", lambda *a, **k: dict.fromkeys(HEADS, 1.0))
    est, m_est = _fit(small, GBlend(super_epoch=2, normalize="sum-to-heads"), epochs=4)
    assert [r["estimated"] for r in _records(est)] == [False, True, False, True]
    assert _same_weights(m_aux, m_est)
    assert [r["val_fused"] for r in aux.history] == [r["val_fused"] for r in est.history]


class _Spy(GBlend):
    """Records what the trainer hands over and clean eval passes of its own (RNG forked, so the
    run is unchanged), to check the losses G-Blend uses."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.sizes: list[int] = []
        self.trained: list[int] = []
        self.clean_train: list[dict[str, float]] = []  # checkpoint 0, then every epoch end
        self.clean_holdout: list[dict[str, float]] = []
        self.trainer_holdout: list[dict[str, float]] = []

    def _measure(self, ctx: StrategyContext) -> None:
        with torch.random.fork_rng(devices=[]):
            for loader, out in (
                (ctx.train_probe_loader, self.clean_train),
                (ctx.holdout_loader, self.clean_holdout),
            ):
                r = ctx.evaluate(loader)
                out.append({"fused": r.loss, **r.unimodal_loss})

    def on_fit_start(self, ctx: StrategyContext) -> None:
        super().on_fit_start(ctx)
        self.sizes.append(len(ctx.holdout_loader.dataset))  # type: ignore[union-attr]
        self.sizes.append(len(ctx.train_probe_loader.dataset))  # type: ignore[union-attr]
        self._measure(ctx)  # the untrained model

    def on_epoch_start(self, ctx: StrategyContext, epoch: int) -> None:
        super().on_epoch_start(ctx, epoch)
        self.trained.append(0)

    def loss(
        self, losses: Mapping[str, torch.Tensor], output: FusionOutput, batch: Mapping[str, Any]
    ) -> torch.Tensor:
        self.trained[-1] += batch["target"].shape[0]
        return super().loss(losses, output, batch)

    def on_epoch_end(
        self, ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None
    ) -> dict[str, Any]:
        assert holdout is not None
        self.trainer_holdout.append({"fused": holdout.loss, **holdout.unimodal_loss})
        self._measure(ctx)
        return super().on_epoch_end(ctx, epoch, val, holdout)


def test_weights_recomputed_every_k_epochs_from_clean_passes(small: DatasetSplits) -> None:
    spy = _Spy(super_epoch=2)
    res, _ = _fit(small, spy, epochs=5)
    recs = _records(res)
    assert [r["estimated"] for r in recs] == [False, True, False, True, False]
    uniform = dict.fromkeys(HEADS, 1 / 3)
    assert recs[0]["weights"] == recs[1]["weights"] == uniform  # first super-epoch
    for i in (1, 3):
        r = recs[i]
        assert r["from_epoch"] == i - 1
        assert r["next_weights"] == gblend_weights(
            r["train_prev"], r["train_now"], r["holdout_prev"], r["holdout_now"]
        )
        assert sum(r["next_weights"].values()) == pytest.approx(1.0)
        if i + 2 < len(recs):  # used, unchanged, for the whole next super-epoch
            assert recs[i + 1]["weights"] == recs[i + 2]["weights"] == r["next_weights"]
        # both losses are clean eval-mode passes at the checkpoint (clean_*[0] is checkpoint 0,
        # clean_*[e] the end of epoch e): train on the probe slice, held-out = the trainer's pass
        assert r["train_now"] == spy.clean_train[i + 1]
        assert r["holdout_now"] == spy.clean_holdout[i + 1] == spy.trainer_holdout[i]
        assert r["train_prev"] == spy.clean_train[i - 1]
        assert r["holdout_prev"] == spy.clean_holdout[i - 1]
    # checkpoint 0 is measured, not assumed (O_0 = L_holdout - L_train on different data)
    assert recs[1]["train_prev"] != recs[1]["holdout_prev"]
    assert recs[3]["train_prev"] == recs[1]["train_now"]
    assert recs[3]["holdout_prev"] == recs[1]["holdout_now"]
    assert recs[2]["weights"] != uniform  # it did act
    # the spy's extra passes (RNG forked) and G-Blend's own did not change the run
    plain, _ = _fit(small, GBlend(super_epoch=2), epochs=5)
    assert _records(plain) == recs


def test_holdout_is_a_fraction_of_train_never_trained_on(small: DatasetSplits) -> None:
    spy = _Spy(super_epoch=1, holdout_fraction=0.25)
    _fit(small, spy, epochs=2)
    assert spy.sizes == [30, 30]  # 25% of the 120 training samples, and a probe as large ...
    assert spy.trained == [90, 90]  # ... and the held-out 30 are never trained on


def test_reused_instance_starts_fresh(small: DatasetSplits) -> None:
    s = GBlend(super_epoch=1)
    first, m_first = _fit(small, s, epochs=2)
    assert s.weights != dict.fromkeys(HEADS, 1 / 3)  # it learnt something
    again, m_again = _fit(small, s, epochs=2)
    assert _records(first) == _records(again)
    assert _same_weights(m_first, m_again)


def test_resume_reproduces_the_uninterrupted_run(small: DatasetSplits, tmp_path: Path) -> None:
    full, m_full = _fit(small, GBlend(super_epoch=2), epochs=4)
    _fit(small, GBlend(super_epoch=2), epochs=3, out_dir=tmp_path)  # stops mid super-epoch
    resumed, m_res = _fit(small, GBlend(super_epoch=2), epochs=4, out_dir=tmp_path, resume=True)
    assert _same_weights(m_full, m_res)
    assert _records(full) == _records(resumed)


def test_state_dict_round_trips_through_weights_only_load() -> None:
    s = GBlend()
    s.weights = {"fused": 0.2, "a": 0.8}
    s._ref_epoch, s._ref_train, s._ref_holdout = 4, {"fused": 1.0, "a": 2.0}, {"fused": 1.5}
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    t = GBlend()
    t.load_state_dict(torch.load(buf, weights_only=True))
    assert t.state_dict() == s.state_dict()
    with pytest.raises(ValueError, match="keys"):
        t.load_state_dict({"weights": {}})


def test_three_modalities_multilabel() -> None:
    data = make_toy_splits(("a", "b", "c"), (0.3, 1.0, 2.0), n=(80, 20, 20), num_classes=3)

    def multilabel(ds: Any) -> MultimodalDataset:
        y = (
            ds.targets
            if hasattr(ds, "targets")
            else torch.stack([ds[i]["target"] for i in range(len(ds))])
        )
        onehot = torch.nn.functional.one_hot(y, 3).float()
        inputs = {m: torch.stack([ds[i]["inputs"][m] for i in range(len(ds))]) for m in "abc"}
        return MultimodalDataset(inputs, onehot)

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
    res, _ = _fit(ml, GBlend(super_epoch=1), epochs=2, multilabel=True, metric="f1_micro")
    last = _records(res)[-1]
    assert set(last["next_weights"]) == {"fused", "a", "b", "c"}
    assert sum(last["next_weights"].values()) == pytest.approx(1.0)


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
