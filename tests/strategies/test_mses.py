"""MSES: per-modality early stopping freezes exactly the converged encoder, at the right epoch,
restores its best weights bit for bit, and the fused head trains on until it converges too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import miles.strategies.mses  # noqa: F401  (registers "mses")
from miles.data import collate_multimodal
from miles.models import JointFusionModel
from miles.models.losses import head_losses
from miles.strategies import EvalResult, StrategyContext, build_strategy
from miles.strategies.base import Strategy
from miles.strategies.mses import MSES
from miles.training import Trainer, TrainerConfig
from tests.conftest import make_toy_splits
from tests.helpers import interrupted_after


@pytest.fixture
def bn_toy() -> Any:
    return make_toy_splits(batchnorm=True)


def _model(data: Any, seed: int = 0) -> JointFusionModel:
    torch.manual_seed(seed)
    return JointFusionModel(data.build_encoders(8), data.num_classes)


def _fit(
    data: Any,
    strategy: Strategy,
    epochs: int,
    *,
    out_dir: Path | None = None,
    resume: bool = False,
) -> tuple[Any, JointFusionModel]:
    model = _model(data)
    cfg = TrainerConfig(epochs=epochs, lr=1e-2, batch_size=32, seed=0, progress=False)
    trainer = Trainer(model, strategy, cfg, out_dir=out_dir, collate_fn=collate_multimodal)
    return trainer.fit(data.train, data.val, data.test, resume=resume), model


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Every tensor equal; non-tensors (the model's extra state: frozen modalities) too."""
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def _no_times(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in history]


def _no_eval(loader: Any) -> EvalResult:
    raise AssertionError("MSES must not run its own evaluations")


def _ctx(model: JointFusionModel, strategy: Strategy) -> StrategyContext:
    strategy.configure_model(model)
    opt = torch.optim.Adam(strategy.param_groups(model), lr=1e-2)
    ctx = StrategyContext(model, opt, torch.device("cpu"), 10, False, "accuracy", _no_eval)
    strategy.on_fit_start(ctx)
    return ctx


def _val(strong: float, weak: float) -> EvalResult:
    return EvalResult(0.5, {"strong": strong, "weak": weak}, 1.0)


def test_hand_made_sequences_freeze_the_converged_encoder(bn_toy: Any) -> None:
    model = _model(bn_toy)
    strategy = MSES(patience=2, min_delta=0.01, restore_best=False)
    ctx = _ctx(model, strategy)
    # strong: best 0.60 at epoch 2; 0.605 (+0.005 <= min_delta) and 0.55 do not improve it
    # weak keeps improving by more than min_delta, then stalls from epoch 5 (best 0.40 at 4)
    strong = [0.50, 0.60, 0.605, 0.55, 0.9, 0.9]
    weak = [0.20, 0.30, 0.35, 0.40, 0.40, float("nan")]
    records = []
    for epoch, (s, w) in enumerate(zip(strong, weak, strict=True), start=1):
        strategy.on_epoch_start(ctx, epoch)
        records.append(strategy.on_epoch_end(ctx, epoch, _val(s, w), None))
        if epoch < 6:
            assert not strategy.should_stop()
    assert [r["newly_frozen"] for r in records] == [[], [], [], ["strong"], [], ["weak"]]
    assert [r["frozen"] for r in records][3:] == [["strong"], ["strong"], ["strong", "weak"]]
    assert [r["wait"] for r in records][:4] == [
        {"strong": 0, "weak": 0},
        {"strong": 0, "weak": 0},
        {"strong": 1, "weak": 0},
        {"strong": 2, "weak": 0},
    ]
    # once frozen, strong is no longer tracked: its 0.9 at epoch 5 changes nothing
    assert records[4]["wait"] == {"strong": 2, "weak": 1}
    assert records[5]["best_epoch"] == {"strong": 2, "weak": 4}  # NaN is no improvement
    assert strategy.frozen_at == {"strong": 4, "weak": 6}
    assert model.frozen_modalities == {"strong", "weak"}
    # every encoder frozen: the fused head trains on until it too has gone 2 epochs without
    # improving, counted from epoch 7 (the first with both encoders frozen)
    assert not strategy.should_stop()
    fused = [0.70, 0.72, 0.725, 0.71]  # best 0.72 at epoch 8; +0.005 <= min_delta at 9
    for epoch, value in enumerate(fused, start=7):
        strategy.on_epoch_start(ctx, epoch)
        record = strategy.on_epoch_end(
            ctx, epoch, EvalResult(value, {"strong": 0, "weak": 0}, 1), None
        )
        assert record["fused_wait"] == {7: 0, 8: 0, 9: 1, 10: 2}[epoch]
        assert strategy.should_stop() is (epoch == 10)


def test_frozen_encoder_keeps_weights_and_batchnorm_stats(bn_toy: Any) -> None:
    model = _model(bn_toy)
    strategy = MSES(patience=1, restore_best=True)
    ctx = _ctx(model, strategy)
    strategy.on_epoch_end(ctx, 1, _val(0.6, 0.3), None)
    record = strategy.on_epoch_end(ctx, 2, _val(0.6, 0.4), None)  # strong: no improvement
    assert record["newly_frozen"] == ["strong"] and model.frozen_modalities == {"strong"}
    assert any(isinstance(x, torch.nn.BatchNorm1d) for x in model.encoders["strong"].modules())
    strategy.on_epoch_start(ctx, 3)  # restore_best: strong is reloaded from epoch 1 (no change)
    before = {m: _state(model.encoders[m]) for m in ("strong", "weak")}
    head_before = _state(model.heads["strong"])
    model.train()
    batch = collate_multimodal([bn_toy.train[i] for i in range(32)])
    for _ in range(3):
        out = model(batch["inputs"])
        loss = strategy.loss(head_losses(out, batch["target"]), out, batch)
        ctx.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ctx.optimizer.step()
    assert _equal(before["strong"], model.encoders["strong"].state_dict())
    assert _equal(head_before, model.heads["strong"].state_dict())
    weak_after = model.encoders["weak"].state_dict()
    for key in ("0.running_mean", "0.num_batches_tracked", "0.weight"):
        assert not torch.equal(before["weak"][key], weak_after[key]), key


def test_stops_when_every_part_converged(bn_toy: Any) -> None:
    # min_delta 1.0: no accuracy can improve after epoch 1, so both freeze at the end of epoch 2,
    # are restored at the start of 3; the fused head: best at 3, no improvement at 4: stop
    result, model = _fit(bn_toy, MSES(patience=1, min_delta=1.0), 6)
    assert result.epochs_run == 4
    assert result.history[1]["strategy"]["newly_frozen"] == ["strong", "weak"]
    assert result.history[2]["strategy"]["restored"] == ["strong", "weak"]
    assert [r["strategy"].get("fused_wait") for r in result.history] == [None, None, 0, 1]
    assert model.frozen_modalities == {"strong", "weak"}


class _Spy(MSES):
    """Records every branch's weights and buffers at the end of every epoch."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.states: dict[int, dict[str, dict[str, torch.Tensor]]] = {}

    def on_epoch_end(
        self, ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None
    ) -> dict[str, Any]:
        self.states[epoch] = {
            f"{part}.{m}": _state(getattr(ctx.model, part)[m])
            for part in ("encoders", "heads")
            for m in ctx.model.modalities
        }
        return super().on_epoch_end(ctx, epoch, val, holdout)


def test_restores_the_best_weights_and_batchnorm_buffers_bit_for_bit(
    tmp_path: Path, bn_toy: Any
) -> None:
    """Best at epoch 1 (min_delta 1.0), frozen after epoch 3 (patience 2), reloaded at the start
    of 4: the branches end exactly as they were after epoch 1, BatchNorm statistics included."""
    spy = _Spy(patience=2, min_delta=1.0, stop_when_converged=False)
    _fit(bn_toy, spy, 5, out_dir=tmp_path)
    last = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    for name, best in spy.states[1].items():
        assert any(k.endswith("running_var") for k in best) or name.startswith("heads.")
        final = {k: last[f"{name}.{k}"] for k in best}
        assert _equal(final, best), name
        assert _equal(spy.states[4][name], best), name  # validated with them from epoch 4 on
        assert not _equal(spy.states[3][name], best), name  # they had moved on before the reload


@pytest.mark.parametrize("restore_best", [True, False])
def test_restore_best_reloads_the_best_epoch_weights(
    tmp_path: Path, bn_toy: Any, restore_best: bool
) -> None:
    """Both encoders converge (best at epoch 1, frozen after epoch 2); training goes on for the
    fused head. With restore_best their branches end as joint+aux after 1 epoch, else 2."""
    strategy = MSES(patience=1, min_delta=1.0, restore_best=restore_best, stop_when_converged=False)
    mses, _ = _fit(bn_toy, strategy, 4, out_dir=tmp_path / "mses")
    ref_epochs = 1 if restore_best else 2
    _fit(bn_toy, build_strategy("joint+aux"), ref_epochs, out_dir=tmp_path / "ref")
    # the last weights (fit() leaves the best-epoch weights in the model)
    last = torch.load(tmp_path / "mses" / "last.pt", weights_only=True)["model"]
    ref = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)["model"]
    assert mses.epochs_run == 4
    branch = [k for k in ref if k.startswith(("encoders.", "heads."))]
    assert len(branch) > 8 and any(k.endswith("running_mean") for k in branch)
    assert all(torch.equal(last[k], ref[k]) for k in branch)
    assert not torch.equal(last["fusion.head.weight"], ref["fusion.head.weight"])  # kept training
    expected = ["strong", "weak"] if restore_best else []
    assert mses.history[2]["strategy"]["restored"] == expected
    if restore_best:  # validation after the reload shows the best epoch's unimodal heads
        for m in ("strong", "weak"):
            assert mses.history[2][f"val_{m}"] == mses.history[0][f"val_{m}"]


@pytest.mark.parametrize("cut", [3, 5])
def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path, bn_toy: Any, cut: int) -> None:
    """Freezing after epoch 3, the reload at the start of 4, the fused head's wait from 5: cut
    between the freeze and the reload, and while the fused head's wait runs."""

    def strategy() -> MSES:
        return MSES(patience=2, min_delta=1.0)  # frozen after 3, reloaded at 4, stops after 6

    full, m_full = _fit(bn_toy, strategy(), 8, out_dir=tmp_path / "full")
    assert full.epochs_run == 6
    with interrupted_after(cut):
        _fit(bn_toy, strategy(), 8, out_dir=tmp_path / "part")
    res, m_res = _fit(bn_toy, strategy(), 8, out_dir=tmp_path / "part", resume=True)
    assert full.history[2]["strategy"]["newly_frozen"] == ["strong", "weak"]
    assert _no_times(res.history) == _no_times(full.history)
    assert res.test == full.test and res.best_epoch == full.best_epoch
    assert _equal(m_full.state_dict(), m_res.state_dict())
    assert m_res.frozen_modalities == {"strong", "weak"}


def test_state_dict_round_trip_and_validation(bn_toy: Any) -> None:
    model = _model(bn_toy)
    strategy = MSES(patience=1, restore_best=True)
    ctx = _ctx(model, strategy)
    strategy.on_epoch_end(ctx, 1, _val(0.6, 0.3), None)
    strategy.on_epoch_end(ctx, 2, _val(0.5, 0.4), None)
    state = strategy.state_dict()
    assert state["pending_restore"] == ["strong"] and state["frozen_at"] == {"strong": 2}
    other = MSES(patience=1, restore_best=True)
    other.load_state_dict(state)
    assert other.state_dict().keys() == state.keys()
    assert other.frozen_at == {"strong": 2} and other.best == {"strong": 0.6, "weak": 0.4}
    with pytest.raises(ValueError, match="MSES state"):
        other.load_state_dict({"best": {}})
    with pytest.raises(ValueError, match="no unimodal metric"):
        strategy.on_epoch_end(ctx, 3, EvalResult(0.5, {"strong": 0.1}, 1.0), None)


def test_constructor_validation() -> None:
    for bad, error in ((0, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="patience"):
            MSES(patience=bad)  # type: ignore[arg-type]
    for bad_delta, error in ((-0.1, ValueError), (float("nan"), ValueError), ("0", TypeError)):
        with pytest.raises(error, match="min_delta"):
            MSES(min_delta=bad_delta)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="restore_best"):
        MSES(restore_best=1)  # type: ignore[arg-type]
    info = build_strategy("mses").describe()
    assert info == {
        "name": "mses",
        "uses_aux_losses": True,
        "patience": 5,
        "min_delta": 0.0,
        "restore_best": True,
        "stop_when_converged": True,
    }
