"""The trainer's engine: precision, clipping, optimizers, the base schedule with MILES, divergence,
compile and channels-last wiring, metrics reuse."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from miles.batch import move_batch
from miles.data import collate_multimodal
from miles.models import JointFusionModel
from miles.strategies import EvalResult, JointAux, Strategy, StrategyContext, build_strategy
from miles.strategies.miles import MILESStrategy
from miles.training import Trainer, TrainerConfig
from miles.training.precision import Precision
from miles.training.run_folder import RunFolderError
from miles.training.schedules import ScheduleFactor, build_schedule
from tests.conftest import make_toy_splits
from tests.helpers import same_weights, strip_times


@pytest.fixture(scope="module")
def data() -> Any:
    return make_toy_splits(n=(120, 40, 40))


class _Interrupted(Exception):
    pass


def _stop_after(epoch: int) -> Any:
    """An on_epoch_end callback that interrupts the fit once ``epoch`` is saved."""

    def callback(row: dict[str, Any]) -> None:
        if row["epoch"] == epoch:
            raise _Interrupted

    return callback


def _fit(
    data: Any,
    strategy: str | Strategy = "joint+aux",
    *,
    epochs: int = 3,
    out_dir: Path | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    **settings: Any,
) -> tuple[Any, JointFusionModel, Trainer]:
    strat = build_strategy(strategy) if isinstance(strategy, str) else strategy
    torch.manual_seed(0)
    model = JointFusionModel(data.build_encoders(8), data.num_classes)
    cfg = TrainerConfig(
        **{"epochs": epochs, "lr": 1e-2, "batch_size": 32, "progress": False, **settings}
    )
    callback = None if stop_after is None else _stop_after(stop_after)
    trainer = Trainer(
        model, strat, cfg, out_dir=out_dir, collate_fn=collate_multimodal, on_epoch_end=callback
    )
    if stop_after is not None:
        with pytest.raises(_Interrupted):
            trainer.fit(data.train, data.val, data.test, resume=resume)
        return None, model, trainer
    return trainer.fit(data.train, data.val, data.test, resume=resume), model, trainer


# -- precision --------------------------------------------------------------------------------


class _GradProbe(JointAux):
    """Records the fused head's gradient as on_after_backward sees it, on the first step."""

    name = "grad-probe"

    def __init__(self) -> None:
        super().__init__()
        self.first_grad: torch.Tensor | None = None
        self.scale: float | None = None

    def on_after_backward(self, ctx: StrategyContext, output: Any, batch: Any) -> None:
        if self.first_grad is None:
            self.first_grad = ctx.model.fused_head.weight.grad.detach().clone()
            scaler = ctx.precision.scaler(ctx.optimizer)
            self.scale = None if scaler is None else scaler.get_scale()


def test_16_mixed_hooks_see_unscaled_gradients(data: Any) -> None:
    full, half = _GradProbe(), _GradProbe()
    _fit(data, full, epochs=1)
    _fit(data, half, epochs=1, precision="16-mixed")
    assert half.scale is not None and half.scale >= 2.0**10  # the loss really was scaled
    assert full.first_grad is not None and half.first_grad is not None
    # the same gradient up to float16 rounding, not `scale` times larger
    ratio = half.first_grad.norm() / full.first_grad.norm()
    assert 0.95 < float(ratio) < 1.05


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_trains_and_resumes_exactly(
    data: Any, tmp_path: Path, precision: str
) -> None:
    full, m_full, _ = _fit(data, "miles", epochs=3, precision=precision)
    plain, _, _ = _fit(data, "miles", epochs=3)
    assert all(math.isfinite(r["train_loss"]) for r in full.history)
    assert strip_times(full.history) != strip_times(plain.history)  # autocast really ran
    _fit(data, "miles", epochs=3, precision=precision, out_dir=tmp_path, stop_after=2)
    resumed, m_res, _ = _fit(
        data, "miles", epochs=3, precision=precision, out_dir=tmp_path, resume=True
    )
    assert strip_times(resumed.history) == strip_times(full.history)
    assert same_weights(m_full, m_res)
    if precision == "16-mixed":
        assert (
            "scaler" in torch.load(tmp_path / "last.pt", weights_only=True)["engine"]["precision"]
        )
        assert all(r["train_skipped_steps"] >= 0 for r in full.history)


def test_scaler_skips_a_step_with_infinite_gradients() -> None:
    weight = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    precision = Precision("16-mixed", "cpu")
    precision.backward((weight * 3e38).sum(), optimizer)  # x 65536 overflows float32
    scale = precision.scaler(optimizer).get_scale()  # type: ignore[union-attr]
    precision.step(optimizer)
    assert torch.equal(weight.detach(), torch.ones(3))  # skipped
    assert precision.skipped_steps == 1
    assert precision.scaler(optimizer).get_scale() == scale / 2  # type: ignore[union-attr]
    optimizer.zero_grad()
    precision.backward(weight.sum(), optimizer)
    assert torch.equal(weight.grad, torch.ones(3))  # unscaled right after backward
    precision.step(optimizer)
    assert torch.allclose(weight.detach(), torch.full((3,), 0.9))  # this one stepped
    assert precision.skipped_steps == 1


def test_a_second_scaled_backward_before_the_step_is_refused() -> None:
    weight = nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    precision = Precision("16-mixed", "cpu")
    precision.backward(weight.sum(), optimizer)
    with pytest.raises(RuntimeError, match="backward was called twice"):
        precision.backward(weight.sum(), optimizer)


def test_gradient_clipping_bounds_the_step() -> None:
    weight = nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    precision = Precision("32", "cpu", grad_clip_norm=0.5)
    precision.backward((weight * torch.tensor([3.0, 4.0, 0.0, 0.0])).sum(), optimizer)
    precision.step(optimizer)
    assert torch.allclose(weight.detach().norm(), torch.tensor(0.5))  # |grad| 5 clipped to 0.5


def test_clipping_changes_training_and_precision_is_validated(data: Any) -> None:
    plain, _, _ = _fit(data, epochs=1)
    clipped, _, _ = _fit(data, epochs=1, grad_clip_norm=1e-3)
    assert plain.history[0]["train_loss"] != clipped.history[0]["train_loss"]
    with pytest.raises(TypeError, match='precision: "32"'):
        TrainerConfig(precision=32)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precision"):
        TrainerConfig(precision="fp8")
    with pytest.raises(ValueError, match="grad_clip_norm"):
        TrainerConfig(grad_clip_norm=0.0)


def test_adamw_is_decoupled_weight_decay(data: Any) -> None:
    _, _, trainer = _fit(data, epochs=1, optimizer="adamw", weight_decay=0.1)
    groups = trainer.strategy.param_groups(trainer.model)
    optimizer = trainer._make_optimizer(groups)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["weight_decay"] == 0.1
    adam, _, _ = _fit(data, epochs=1, optimizer="adam", weight_decay=0.1)
    adamw, _, _ = _fit(data, epochs=1, optimizer="adamw", weight_decay=0.1)
    assert adam.history[0]["train_loss"] != adamw.history[0]["train_loss"]


# -- the base schedule ------------------------------------------------------------------------


class _LRRecorder(MILESStrategy):
    """MILES, recording every group's rate each batch trained at."""

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.rates: list[dict[str, float]] = []
        self.epoch_factors: list[dict[str, float]] = []

    def on_epoch_start(self, ctx: StrategyContext, epoch: int) -> None:
        assert self.scheduler is not None
        self.epoch_factors.append(self.scheduler.factors)

    def step_lr_schedule(self, ctx: StrategyContext) -> None:
        self.rates.append({g["name"]: float(g["lr"]) for g in ctx.optimizer.param_groups})
        super().step_lr_schedule(ctx)


@pytest.mark.parametrize(
    "settings",
    [
        {"schedule": "cosine", "warmup_epochs": 1, "min_lr_factor": 0.1},
        {"schedule": "step", "step_every": 1, "step_gamma": 0.5, "warmup_steps": 3},
        {"schedule": "constant", "warmup_steps": 5},
    ],
    ids=["cosine+warmup", "step+warmup", "warmup"],
)
def test_base_schedule_times_miles_factor_at_every_batch(data: Any, settings: Any) -> None:
    strategy = _LRRecorder(tau=0.0)
    result, _, _ = _fit(data, strategy, epochs=4, **settings)
    steps_per_epoch = math.ceil(len(data.train) / 32)
    warmup = settings.get("warmup_steps", 0) or settings.get("warmup_epochs", 0) * steps_per_epoch
    factor = ScheduleFactor(
        settings["schedule"],
        total_steps=4 * steps_per_epoch,
        steps_per_epoch=steps_per_epoch,
        warmup_steps=warmup,
        min_factor=settings.get("min_lr_factor", 0.0),
        step_every=settings.get("step_every", 30),
        gamma=settings.get("step_gamma", 0.1),
    )
    assert len(strategy.rates) == 4 * steps_per_epoch
    slowed_seen = False
    for step, rates in enumerate(strategy.rates):
        factors = strategy.epoch_factors[step // steps_per_epoch]
        slowed_seen |= any(f < 1 for f in factors.values())
        for name, lr in rates.items():
            expected = 1e-2 * factor(step) * factors.get(name, 1.0)
            assert lr == pytest.approx(expected, rel=1e-12), (step, name)
    assert slowed_seen  # MILES acted while the schedule ran
    assert any(r["strategy"]["decision"]["slowed"] for r in result.history)


def test_schedule_resumes_exactly_with_and_without_miles(data: Any, tmp_path: Path) -> None:
    settings = {"schedule": "cosine", "warmup_steps": 4}
    for name in ("miles", "joint+aux"):
        full, m_full, _ = _fit(data, name, epochs=4, **settings)
        _fit(data, name, epochs=4, out_dir=tmp_path / name, stop_after=2, **settings)
        resumed, m_res, _ = _fit(
            data, name, epochs=4, out_dir=tmp_path / name, resume=True, **settings
        )
        assert strip_times(resumed.history) == strip_times(full.history), name
        assert same_weights(m_full, m_res), name
    # the run folder refuses first (the schedule's own check is behind it, for --force)
    with pytest.raises(RunFolderError, match=r"trainer\.epochs"):
        _fit(data, "joint+aux", epochs=5, out_dir=tmp_path / "joint+aux", resume=True, **settings)
    with pytest.raises(RunFolderError, match=r"trainer\.schedule"):
        _fit(data, "joint+aux", epochs=4, out_dir=tmp_path / "joint+aux", resume=True)


def test_a_strategy_setting_its_own_rates_refuses_a_schedule(data: Any) -> None:
    """MSLR writes its rates into the groups every epoch: a schedule would erase them."""
    lrs = {"strong": 1e-2, "weak": 3e-2}
    with pytest.raises(RuntimeError, match="'mslr-k' sets learning rates itself"):
        _fit(data, build_strategy("mslr-k", unimodal_lrs=lrs), epochs=2, warmup_steps=8)
    keep, _, _ = _fit(data, build_strategy("mslr-k", unimodal_lrs=lrs), epochs=1)
    assert keep.history[0]["lr_weak"] == 3e-2


def test_constant_schedule_builds_nothing_and_settings_are_checked() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    assert build_schedule(optimizer, "constant", epochs=3, steps_per_epoch=2) is None
    with pytest.raises(ValueError, match="not both"):
        TrainerConfig(warmup_epochs=1, warmup_steps=2)
    with pytest.raises(ValueError, match="schedule"):
        TrainerConfig(schedule="linear")
    with pytest.raises(ValueError, match="min_lr_factor"):
        TrainerConfig(min_lr_factor=1.5)


# -- the loop ---------------------------------------------------------------------------------


def test_divergence_stops_the_run_by_the_end_of_the_epoch(data: Any) -> None:
    with pytest.raises(FloatingPointError, match=r"training loss became (nan|inf) in epoch 1"):
        _fit(data, "joint+aux", epochs=3, optimizer="sgd", lr=1e12)


class _FailsOnNaN(JointAux):
    """A hook that cannot cope with a diverged model (as a real method's might not)."""

    name = "fails-on-nan"

    def on_after_backward(self, ctx: StrategyContext, output: Any, batch: Any) -> None:
        if not torch.isfinite(output.fused).all():
            raise ValueError("cannot modulate NaN logits")


def test_an_error_after_divergence_is_reported_as_divergence(data: Any) -> None:
    with pytest.raises(
        FloatingPointError, match="training stopped being finite in epoch 1"
    ) as info:
        _fit(data, _FailsOnNaN(), epochs=2, optimizer="sgd", lr=1e12)
    assert isinstance(info.value.__cause__, ValueError)


def test_one_head_metrics_per_loader(data: Any) -> None:
    _, _, trainer = _fit(data, epochs=1)
    loader = trainer._loader(data.val, train=False)
    first = trainer.evaluate(loader)
    metrics = trainer._metrics[loader]
    second = trainer.evaluate(loader)
    assert trainer._metrics[loader] is metrics and first == second
    other = trainer._loader(data.test, train=False)
    trainer.evaluate(other)
    assert trainer._metrics[other] is not metrics


def test_compile_is_wired(data: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    compiled: list[nn.Module] = []

    class Compiled(nn.Module):  # stands in for torch.compile's OptimizedModule
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.inner = module
            self.calls = 0

        def forward(self, *args: Any) -> Any:
            self.calls += 1
            return self.inner(*args)

    def fake_compile(module: nn.Module, **_: Any) -> nn.Module:
        compiled.append(module)
        return Compiled(module)

    monkeypatch.setattr(torch, "compile", fake_compile)
    eager, m_eager, _ = _fit(data, epochs=1)
    result, model, trainer = _fit(data, epochs=1, compile=True)
    assert compiled == [model, model]  # the training and the evaluation module
    assert isinstance(trainer._eval_module, Compiled) and trainer._eval_module.calls > 0
    assert strip_times(result.history) == strip_times(eager.history)
    assert same_weights(m_eager, model)


def test_real_compile_traces_the_model(data: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile's graph capture on our model and loop (the "eager" backend: no C++ code
    generation, which takes minutes on a small CPU; skipped where dynamo does not run)."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module: real(module, backend="eager"))
    eager, _, _ = _fit(data, epochs=1)
    try:
        result, _, trainer = _fit(data, epochs=1, compile=True)
    except Exception as exc:  # e.g. a Python version dynamo does not support yet
        pytest.skip(f"torch.compile does not run here: {type(exc).__name__}: {exc}"[:300])
    assert type(trainer._eval_module).__name__ == "OptimizedModule"
    assert result.history[0]["train_loss"] == pytest.approx(eager.history[0]["train_loss"])


def test_channels_last_is_a_cpu_no_op(data: Any) -> None:
    _, _, trainer = _fit(data, epochs=1, channels_last=True)
    assert trainer._channels_last is False  # CUDA only
    image = torch.randn(2, 3, 4, 5)
    moved = move_batch(
        {"inputs": {"image": image}, "target": torch.zeros(2)},
        torch.device("cpu"),
        channels_last=True,
    )
    assert moved["inputs"]["image"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(moved["inputs"]["image"], image)


class _Counting(JointAux):
    """Counts optimizer steps through the context's primitives."""

    name = "counting"

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def training_step(self, ctx: StrategyContext, batch: Mapping[str, Any]) -> Any:
        self.steps += 1
        return super().training_step(ctx, batch)

    def on_epoch_end(
        self, ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None
    ) -> dict[str, Any]:
        return {"steps": self.steps}


def test_history_losses_match_a_python_float_sum(data: Any) -> None:
    """The losses summed on the device give exactly the per-batch ``float()`` sums."""
    strategy = _Counting()
    result, _, _ = _fit(data, strategy, epochs=1)
    torch.manual_seed(0)
    model = JointFusionModel(data.build_encoders(8), data.num_classes)
    again = Trainer(
        model,
        _Counting(),
        TrainerConfig(epochs=1, lr=1e-2, batch_size=32, progress=False),
        collate_fn=collate_multimodal,
    )
    run = again._setup(data.train, data.val)
    again.strategy.on_fit_start(run.ctx)
    total, count = 0.0, 0
    for raw in run.train_loader:
        step = again.strategy.training_step(run.ctx, again._move(raw))
        total += float(step.loss) * step.batch_size
        count += step.batch_size
    assert result.history[0]["train_loss"] == total / count
    assert result.history[0]["strategy"] == {"steps": math.ceil(len(data.train) / 32)}


class _CopyEachEpoch(JointAux):
    """Trains a copy of the model on the side at every epoch start (as G-Blend does)."""

    name = "copy-each-epoch"

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[JointFusionModel] = []

    def on_epoch_start(self, ctx: StrategyContext, epoch: int) -> None:
        from miles.training.copies import train_copy

        self.copies.append(
            train_copy(ctx, lambda losses, output, batch: losses["strong"], epochs=1, seed=epoch)
        )


def test_copies_trained_on_the_side_get_the_runs_precision(data: Any) -> None:
    """Under 16-mixed a copy's own optimizer steps on unscaled gradients (SGD would otherwise
    move 65536 times too far), and the run's scaler is left alone."""
    full, half = _CopyEachEpoch(), _CopyEachEpoch()
    _fit(data, full, epochs=2, optimizer="sgd")
    result, _, _ = _fit(data, half, epochs=2, optimizer="sgd", precision="16-mixed")
    assert all(math.isfinite(r["train_loss"]) for r in result.history)
    for a, b in zip(full.copies, half.copies, strict=True):
        for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            assert torch.allclose(p, q, rtol=0.05, atol=2e-3), name


def test_a_training_plan_refuses_a_base_schedule(data: Any) -> None:
    """Sample-level valuation re-samples the rows from epoch 2 on: longer epochs than the
    schedule was built for, so the run stops with the reason instead of ending at LR 0."""
    plain, _, _ = _fit(data, build_strategy("valuation-sample", warmup=1), epochs=3)
    assert len(plain.history) == 3  # the plan itself trains
    with pytest.raises(ValueError, match=r"re-sampled plan of rows.*schedule 'constant'"):
        _fit(data, build_strategy("valuation-sample", warmup=1), epochs=3, schedule="cosine")


def test_forced_resume_with_another_schedule_length_names_the_schedule(
    data: Any, tmp_path: Path
) -> None:
    """--force lets a resume change the settings, but a schedule depends on the run's length:
    the reason is the schedule, not a damaged last.pt."""
    settings = {"schedule": "cosine", "warmup_steps": 4}
    _fit(data, "joint+aux", epochs=2, out_dir=tmp_path, **settings)
    model = JointFusionModel(data.build_encoders(8), data.num_classes)
    cfg = TrainerConfig(epochs=4, lr=1e-2, batch_size=32, progress=False, **settings)
    trainer = Trainer(
        model, build_strategy("joint+aux"), cfg, out_dir=tmp_path, collate_fn=collate_multimodal
    )
    with pytest.raises(ValueError, match="same epochs and schedule settings") as exc:
        trainer.fit(data.train, data.val, data.test, resume=True, force=True)
    assert "damaged" not in str(exc.value)
