"""The trainer: determinism, exact resumption, best-epoch selection, files, strategy hooks."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from miles.data import collate_multimodal
from miles.models import JointFusionModel
from miles.strategies import EvalResult, JointAux, Strategy, StrategyContext, build_strategy
from miles.training import Trainer, TrainerConfig
from miles.training.experiment import ExperimentConfig, run_experiment
from tests.conftest import make_toy_splits
from tests.helpers import same_weights, strip_times


def _fit(
    data: Any,
    strategy: str | Strategy = "joint+aux",
    *,
    epochs: int = 3,
    seed: int = 0,
    out_dir: Path | None = None,
    resume: bool = False,
    fusion: str = "concat",
    stop_after: int | None = None,
    **params: Any,
) -> tuple[Any, JointFusionModel]:
    """Train; ``stop_after=k`` interrupts the fit after epoch ``k`` is saved (as Ctrl-C would)."""
    strat = build_strategy(strategy, **params) if isinstance(strategy, str) else strategy
    torch.manual_seed(seed)
    model = JointFusionModel(data.build_encoders(8), data.num_classes, fusion)
    cfg = TrainerConfig(epochs=epochs, lr=1e-2, batch_size=32, seed=seed, progress=False)

    def interrupt(row: dict[str, Any]) -> None:
        if row["epoch"] == stop_after:
            raise KeyboardInterrupt

    trainer = Trainer(
        model, strat, cfg, out_dir=out_dir, collate_fn=collate_multimodal, on_epoch_end=interrupt
    )
    if stop_after is not None:
        with pytest.raises(KeyboardInterrupt):
            trainer.fit(data.train, data.val, data.test, resume=resume)
        return None, model
    return trainer.fit(data.train, data.val, data.test, resume=resume), model


def test_same_seed_same_numbers(toy: Any) -> None:
    a, ma = _fit(toy, "miles", tau=0.05)
    b, mb = _fit(toy, "miles", tau=0.05)
    assert strip_times(a.history) == strip_times(b.history)
    assert same_weights(ma, mb)
    c, _ = _fit(toy, "miles", tau=0.05, seed=1)
    assert strip_times(c.history) != strip_times(a.history)


def test_mu_one_equals_joint_aux_bit_for_bit(toy: Any) -> None:
    aux, m_aux = _fit(toy, "joint+aux", epochs=4)
    mil, m_mil = _fit(toy, "miles", epochs=4, mu=1.0, tau=0.0)
    assert any(
        d["strategy"]["decision"]["slowed"] for d in mil.history
    )  # it did "act", with mu = 1
    assert same_weights(m_aux, m_mil)
    assert [r["val_fused"] for r in aux.history] == [r["val_fused"] for r in mil.history]


def test_miles_changes_training_when_it_acts(toy: Any) -> None:
    _, m_aux = _fit(toy, "joint+aux", epochs=4)
    mil, m_mil = _fit(toy, "miles", epochs=4, tau=0.0)
    slowed = [r["strategy"]["decision"]["slowed"] for r in mil.history]
    assert any(slowed)
    first = next(i for i, s in enumerate(slowed) if s)
    # the LR used in the next epoch is mu x base for the slowed modality, base for the shared part
    nxt = mil.history[first + 1]
    assert nxt[f"lr_{slowed[first]}"] == pytest.approx(0.5e-2)
    assert nxt["lr_shared"] == pytest.approx(1e-2)
    assert not same_weights(m_aux, m_mil)


def test_resume_gives_the_uninterrupted_run(tmp_path: Path, toy: Any) -> None:
    full, m_full = _fit(toy, "miles", epochs=4, tau=0.05, out_dir=tmp_path / "full")
    _fit(toy, "miles", epochs=4, tau=0.05, out_dir=tmp_path / "part", stop_after=2)
    resumed, m_res = _fit(toy, "miles", epochs=4, tau=0.05, out_dir=tmp_path / "part", resume=True)
    assert strip_times(resumed.history) == strip_times(full.history)
    assert resumed.test == full.test and resumed.best_epoch == full.best_epoch
    assert same_weights(m_full, m_res)


def test_best_epoch_and_files(tmp_path: Path, toy: Any) -> None:
    result, _ = _fit(toy, "miles", epochs=4, out_dir=tmp_path)
    vals = [r["val_fused"] for r in result.history]
    assert result.best_epoch == vals.index(max(vals)) + 1
    assert result.val["fused"] == max(vals)
    assert result.test is not None and result.test_last is not None
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["best_epoch"] == result.best_epoch
    assert len(json.loads((tmp_path / "history.json").read_text())) == 4
    with (tmp_path / "history.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and "strategy.decision.delta" in rows[0] and "lr_strong" in rows[0]
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 4


def test_test_score_uses_best_weights(toy: Any) -> None:
    result, model = _fit(toy, "joint+aux", epochs=4)
    trainer = Trainer(
        model,
        build_strategy("joint+aux"),
        TrainerConfig(progress=False),
        collate_fn=collate_multimodal,
    )
    again = trainer.evaluate(trainer._loader(toy.test, train=False))
    assert result.test == {"fused": again.fused, "unimodal": again.unimodal}


def test_fused_metric_zero_is_no_decision(toy: Any) -> None:
    torch.manual_seed(0)
    model = JointFusionModel(toy.build_encoders(8), toy.num_classes)
    strategy = build_strategy("miles")
    opt = torch.optim.Adam(strategy.param_groups(model), lr=1e-3)
    ctx = StrategyContext(
        model, opt, torch.device("cpu"), 3, False, "accuracy", evaluate=lambda _: None
    )  # type: ignore[arg-type,return-value]
    strategy.on_fit_start(ctx)
    record = strategy.on_epoch_end(ctx, 1, EvalResult(0.0, {"strong": 0.3, "weak": 0.1}, 1.0), None)
    assert record["decision"] is None and "no decision" in record["note"]
    assert [g["lr"] for g in opt.param_groups] == [1e-3] * 3


def test_three_modalities_train_with_miles() -> None:
    data = make_toy_splits(("a", "b", "c"), (0.2, 1.0, 2.0))
    result, _ = _fit(data, "miles", epochs=3, tau=0.0)
    decision = result.history[-1]["strategy"]["decision"]
    assert set(decision["u"]) == {"a", "b", "c"}
    assert decision["slowed"] in {"a", "b", "c"}


def test_ablation_estimator_runs_through_trainer(toy: Any) -> None:
    result, _ = _fit(toy, "miles", epochs=2, estimator="ablation")
    decision = result.history[-1]["strategy"]["decision"]
    assert decision["estimator"] == "ablation" and set(decision["metrics"]) == {"strong", "weak"}


def test_joint_heads_do_not_train_encoders(toy: Any) -> None:
    _, model = _fit(toy, "joint", epochs=1)
    assert model.detach_unimodal_heads
    _, model = _fit(toy, "joint+aux", epochs=1)
    assert not model.detach_unimodal_heads


class _Recorder(Strategy):
    """Exercises every hook: held-out slice, gradient access, freezing, early stop, state."""

    name = "recorder"
    holdout_fraction = 0.25

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.grad_seen = False
        self.holdout_sizes: list[int] = []

    def on_fit_start(self, ctx: StrategyContext) -> None:
        self.calls.append("fit_start")

    def on_epoch_start(self, ctx: StrategyContext, epoch: int) -> None:
        self.calls.append(f"start{epoch}")

    def on_after_backward(self, ctx: StrategyContext, output: Any, batch: Any) -> None:
        grad = ctx.model.fused_head.weight.grad
        self.grad_seen = self.grad_seen or (grad is not None and bool(grad.abs().sum() > 0))

    def on_epoch_end(
        self, ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None
    ) -> dict:
        assert holdout is not None
        self.holdout_sizes.append(len(ctx.holdout_loader.dataset))
        if epoch == 1:
            ctx.model.freeze("strong")
        self.calls.append(f"end{epoch}")
        return {"holdout_fused": holdout.fused}

    def should_stop(self) -> bool:
        return len(self.holdout_sizes) >= 2

    def on_fit_end(self, ctx: StrategyContext) -> None:
        self.calls.append("fit_end")

    def state_dict(self) -> dict:
        return {"calls": list(self.calls)}


def test_strategy_hooks() -> None:
    data = make_toy_splits(batchnorm=True)
    strategy = _Recorder()
    torch.manual_seed(0)
    model = JointFusionModel(data.build_encoders(8), data.num_classes)
    trainer = Trainer(
        model, strategy, TrainerConfig(epochs=5, progress=False), collate_fn=collate_multimodal
    )
    enc = model.encoders["strong"]
    bn_before: dict[str, torch.Tensor] = {}

    orig_end = strategy.on_epoch_end

    def end(ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None) -> dict:
        out = orig_end(ctx, epoch, val, holdout)
        if epoch == 1:
            bn_before.update({k: v.clone() for k, v in enc.state_dict().items()})
        return out

    strategy.on_epoch_end = end  # type: ignore[method-assign]
    result = trainer.fit(data.train, data.val)
    assert result.epochs_run == 2  # should_stop after the second epoch
    assert strategy.calls == ["fit_start", "start1", "end1", "start2", "end2", "fit_end"]
    assert strategy.grad_seen
    assert strategy.holdout_sizes == [60, 60]  # 25 % of 240 held out
    assert "holdout_fused" in result.history[0]["strategy"]
    # epoch 2 trained with "strong" frozen: weights and BatchNorm running stats unchanged
    after = enc.state_dict()
    assert all(torch.equal(bn_before[k], after[k]) for k in bn_before)


class _SeesRestored(JointAux):
    """Counts epochs in its state; records what on_fit_start finds."""

    name = "sees-restored"

    def __init__(self) -> None:
        super().__init__()
        self.epochs_seen = 0
        self.at_fit_start: dict[str, Any] = {}

    def on_fit_start(self, ctx: StrategyContext) -> None:
        adam_steps = [int(s["step"]) for s in ctx.optimizer.state.values() if "step" in s]
        self.at_fit_start = {"epochs_seen": self.epochs_seen, "adam_steps": set(adam_steps)}

    def on_epoch_end(
        self, ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None
    ) -> dict:
        self.epochs_seen += 1
        return {}

    def state_dict(self) -> dict:
        return {"epochs_seen": self.epochs_seen}

    def load_state_dict(self, state: Any) -> None:
        self.epochs_seen = int(state["epochs_seen"])


def test_on_fit_start_sees_the_restored_state(tmp_path: Path, toy: Any) -> None:
    """Resuming restores the strategy, model and optimizer before on_fit_start, so hooks build on
    them (e.g. a scheduler on the restored optimizer); the run matches an uninterrupted one."""
    first = _SeesRestored()
    _fit(toy, first, epochs=3, out_dir=tmp_path, stop_after=2)
    assert first.at_fit_start == {"epochs_seen": 0, "adam_steps": set()}
    steps_per_epoch = -(-len(toy.train) // 32)
    resumed = _SeesRestored()
    result, model = _fit(toy, resumed, epochs=3, out_dir=tmp_path, resume=True)
    assert resumed.at_fit_start == {"epochs_seen": 2, "adam_steps": {2 * steps_per_epoch}}
    assert resumed.epochs_seen == 3
    full, m_full = _fit(toy, _SeesRestored(), epochs=3)
    assert strip_times(result.history) == strip_times(full.history)
    assert same_weights(model, m_full)


def test_a_hook_under_its_old_name_is_refused() -> None:
    with pytest.raises(TypeError, match=r"after_backward\(\).*rename it on_after_backward"):

        class _Old(Strategy):
            def after_backward(self, ctx: Any, output: Any, batch: Any) -> None:
                pass


def test_the_base_strategy_is_the_plain_multimodal_objective() -> None:
    """No-op hooks: the fused loss alone, the fused metric, no stop, no state, model untouched."""
    base = Strategy()
    losses = {"fused": torch.tensor(1.5), "strong": torch.tensor(2.0)}
    assert base.loss(losses, None, {}) is losses["fused"]  # type: ignore[arg-type]
    assert base.selection_score(EvalResult(0.7, {"strong": 0.9}, 1.0)) == 0.7
    assert not base.should_stop() and base.state_dict() == {}
    torch.manual_seed(0)
    model = JointFusionModel(make_toy_splits().build_encoders(8), 4, detach_unimodal_heads=True)
    base.configure_model(model)
    assert model.detach_unimodal_heads  # left as built
    assert base.describe() == {"name": "strategy", "uses_aux_losses": False}
    with pytest.raises(ValueError, match="keeps no state"):
        base.load_state_dict({"x": 1})


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="epochs"):
        TrainerConfig(epochs=0)
    with pytest.raises(ValueError, match="lr"):
        TrainerConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="optimizer"):
        TrainerConfig(optimizer="lion")
    with pytest.raises(TypeError, match="lr must be a finite number > 0, got str: '1e-3'"):
        TrainerConfig(lr="1e-3")  # type: ignore[arg-type]  # YAML 1.1 reads 1e-3 as a string
    with pytest.raises(ValueError, match="momentum"):
        TrainerConfig(momentum=-0.9)
    with pytest.raises(TypeError, match="progress must be a bool"):
        TrainerConfig(progress="no")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown strategy"):
        build_strategy("nope")
    with pytest.raises(TypeError, match="bad parameters"):
        build_strategy("miles", alpha=1)
    with pytest.raises(ValueError, match="unknown config keys"):
        ExperimentConfig.from_dict({"dataset": "fsdd-mnist", "epochs": 3})
    with pytest.raises(ValueError, match="unknown trainer keys"):
        ExperimentConfig.from_dict({"trainer": {"epoch": 3}})


def test_sgd_and_run_experiment_on_fsdd(tmp_path: Path) -> None:
    cfg = ExperimentConfig.from_dict(
        {
            "dataset": "fsdd-mnist",
            "dataset_params": {"max_train": 100},
            "fusion": "sum",
            "latent_dim": 16,
            "strategy": "miles",
            "trainer": {"epochs": 1, "optimizer": "sgd", "lr": 0.05, "progress": False},
            "out_dir": str(tmp_path),
        }
    )
    result = run_experiment(cfg)
    assert result.extra["modalities"] == ["audio", "image"]
    assert (tmp_path / "config.json").is_file()
    assert 0.0 <= result.test["fused"] <= 1.0  # type: ignore[index]


def test_trainer_records_no_decision_when_fused_metric_is_zero(toy: Any) -> None:
    torch.manual_seed(0)
    model = JointFusionModel(toy.build_encoders(8), toy.num_classes)
    cfg = TrainerConfig(epochs=3, lr=1e-2, progress=False)
    trainer = Trainer(model, build_strategy("miles", tau=0.0), cfg, collate_fn=collate_multimodal)
    real = trainer.evaluate
    calls = {"n": 0}

    def first_val_is_zero(loader: Any, *, keep_latents: bool = False) -> EvalResult:
        res = real(loader, keep_latents=keep_latents)
        calls["n"] += 1
        if calls["n"] == 1:  # e.g. F1 = 0 after the first epoch
            res.fused = 0.0
        return res

    trainer.evaluate = first_val_is_zero  # type: ignore[method-assign]
    result = trainer.fit(toy.train, toy.val)
    first, second = result.history[0]["strategy"], result.history[1]["strategy"]
    assert first == {"decision": None, "note": "fused metric is 0: no decision"}
    assert second["decision"]["epoch"] == 2  # the scheduler's epoch count still advanced
    assert result.history[1]["lr_strong"] == result.history[0]["lr_strong"] == 1e-2


def test_fit_seeds_the_global_rng_for_dropout() -> None:
    data = make_toy_splits()

    def run() -> list[float]:
        torch.manual_seed(0)
        encoders = {
            m: torch.nn.Sequential(torch.nn.Dropout(0.5), enc)
            for m, enc in data.build_encoders(8).items()
        }
        for enc in encoders.values():
            enc.out_features = 8  # type: ignore[assignment]
        model = JointFusionModel(encoders, data.num_classes)
        trainer = Trainer(
            model,
            build_strategy("joint+aux"),
            TrainerConfig(epochs=2, progress=False),
            collate_fn=collate_multimodal,
        )
        torch.rand(17)  # whatever the caller did to the global RNG in between
        return [r["train_loss"] for r in trainer.fit(data.train, data.val).history]

    assert run() == run()


def test_aux_weights_scale_the_unimodal_losses(toy: Any) -> None:
    strategy = build_strategy("joint+aux", aux_weights={"weak": 0.25})
    losses = {"fused": torch.tensor(1.0), "strong": torch.tensor(2.0), "weak": torch.tensor(4.0)}
    assert float(strategy.loss(losses, None, {})) == 1.0 + 2.0 + 0.25 * 4.0  # type: ignore[arg-type]
    zero, _ = _fit(toy, "joint+aux", epochs=1, aux_weights=0.0)
    assert zero.strategy["aux_weights"] == 0.0
    with pytest.raises(ValueError, match="aux_weights must be a finite number >= 0, got -1"):
        build_strategy("miles", aux_weights=-1)
    with pytest.raises(ValueError, match=r"aux_weights\['weak'\] must be"):
        build_strategy("joint+aux", aux_weights={"weak": float("nan")})


def test_miles_strategy_validates_before_training() -> None:
    for bad in ({"mu": 0}, {"mu": 1.5}, {"tau": -0.1}, {"tau": float("nan")}):
        with pytest.raises(ValueError):
            build_strategy("miles", **bad)
    with pytest.raises(ValueError, match="ablation_fill"):
        build_strategy("miles", estimator="ablation", ablation_fill="noise")
    with pytest.raises(TypeError, match="reset_other"):
        build_strategy("miles", reset_other="yes")


def test_heads_can_stay_at_base_rate(toy: Any) -> None:
    result, _ = _fit(toy, "miles", epochs=3, tau=0.0, head_follows_encoder=False)
    assert any(r["strategy"]["decision"]["slowed"] for r in result.history)
    assert result.history[-1]["lr_shared"] == 1e-2  # the heads live in the shared group
    assert result.strategy["head_follows_encoder"] is False
