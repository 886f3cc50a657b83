"""MILES on top of other torch schedules: what composes (exactly) and what is rejected."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.optim.lr_scheduler import (
    ChainedScheduler,
    ConstantLR,
    CosineAnnealingLR,
    CosineAnnealingWarmRestarts,
    CyclicLR,
    ExponentialLR,
    LambdaLR,
    LinearLR,
    LRScheduler,
    MultiplicativeLR,
    MultiStepLR,
    OneCycleLR,
    PolynomialLR,
    ReduceLROnPlateau,
    SequentialLR,
    StepLR,
)

from miles.scheduler import MILES, check_composable

MODALITIES = ("A", "B", None, "A", "B")
BASE_LRS = [0.1, 0.03, 0.05, 0.2, 0.007]


def make_optimizer() -> torch.optim.Optimizer:
    groups = [
        {"params": [torch.nn.Parameter(torch.zeros(2))], "modality": m, "lr": lr}
        for m, lr in zip(MODALITIES, BASE_LRS, strict=True)
    ]
    return torch.optim.SGD(groups, lr=0.1)


def lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in optimizer.param_groups]


Builder = Callable[[torch.optim.Optimizer], LRScheduler]

COMPOSABLE: dict[str, tuple[Builder, int]] = {
    "StepLR": (lambda o: StepLR(o, step_size=2, gamma=0.5), 12),
    "MultiStepLR": (lambda o: MultiStepLR(o, milestones=[2, 5, 7], gamma=0.3), 10),
    "ExponentialLR": (lambda o: ExponentialLR(o, gamma=0.9), 12),
    "LinearLR-warmup": (lambda o: LinearLR(o, start_factor=0.1, total_iters=5), 12),
    "ConstantLR": (lambda o: ConstantLR(o, factor=0.25, total_iters=3), 8),
    "MultiplicativeLR": (lambda o: MultiplicativeLR(o, lambda e: 0.95), 8),
    "PolynomialLR": (lambda o: PolynomialLR(o, total_iters=10, power=2.0), 9),
    "CosineAnnealingLR": (lambda o: CosineAnnealingLR(o, T_max=12), 12),
    "Chained-warmup-cosine": (
        lambda o: ChainedScheduler(
            [LinearLR(o, start_factor=0.2, total_iters=3), CosineAnnealingLR(o, T_max=10)]
        ),
        10,
    ),
}

# (fused, M_A, M_B) per epoch: slow A, slow A, slow B, balanced, slow B, all-negative, ...
METRICS = [
    (1.0, 0.9, 0.2),
    (1.0, 0.8, 0.3),
    (1.0, 0.2, 0.9),
    (1.0, 0.5, 0.5),
    (1.0, 0.1, 0.7),
    (0.5, 0.8, 0.9),
    (1.0, 0.9, 0.1),
    (1.0, 0.3, 0.95),
]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("reset_other", [False, True])
@pytest.mark.parametrize("name", list(COMPOSABLE))
def test_base_schedule_times_factor(name: str, reset_other: bool) -> None:
    build, epochs = COMPOSABLE[name]
    ref_opt = make_optimizer()
    ref = build(ref_opt)
    opt = make_optimizer()
    base = build(opt)
    sched = MILES(opt, tau=0.1, mu=0.3, reset_other=reset_other, base_schedulers=[base])
    assert lrs(opt) == lrs(ref_opt)
    slowed = set()
    for epoch in range(epochs):
        ref_opt.step()
        opt.step()
        ref.step()
        base.step()
        fused, m_a, m_b = METRICS[epoch % len(METRICS)]
        decision = sched.step(fused=fused, unimodal={"A": m_a, "B": m_b})
        assert decision is not None
        slowed.add(decision.slowed)
        factors = sched.factors
        for group, ref_lr, lr in zip(opt.param_groups, lrs(ref_opt), lrs(opt), strict=True):
            modality = group["modality"]
            want = ref_lr if modality is None else ref_lr * factors[modality]
            assert math.isclose(lr, want, rel_tol=1e-12, abs_tol=1e-300), (epoch, modality)
            if modality is None:
                assert lr == ref_lr
    assert slowed == {"A", "B", None}
    assert sched.get_last_lr() == lrs(opt)


def test_composition_holds_whichever_is_constructed_first() -> None:
    ref_opt = make_optimizer()
    ref = LinearLR(ref_opt, start_factor=0.25, total_iters=4)
    opt = make_optimizer()
    sched = MILES(opt, tau=0.1, mu=0.5)
    base = LinearLR(opt, start_factor=0.25, total_iters=4)
    for epoch, (fused, m_a, m_b) in enumerate(METRICS):
        ref_opt.step()
        opt.step()
        ref.step()
        base.step()
        if epoch == 0:  # an undeclared schedule: detected, warned about once, read as lr * r
            with pytest.warns(UserWarning, match="changed from 0.1 to .* not told about"):
                sched.step(fused=fused, unimodal={"A": m_a, "B": m_b})
        else:
            sched.step(fused=fused, unimodal={"A": m_a, "B": m_b})
        f = sched.factors
        want = [
            lr * (1.0 if m is None else f[m])
            for lr, m in zip(lrs(ref_opt), MODALITIES, strict=True)
        ]
        assert all(math.isclose(x, y, rel_tol=1e-12) for x, y in zip(lrs(opt), want, strict=True))


@pytest.mark.parametrize("name", list(COMPOSABLE))
def test_check_composable_accepts(name: str) -> None:
    check_composable(COMPOSABLE[name][0](make_optimizer()))


REJECTED: dict[str, tuple[Callable[[torch.optim.Optimizer], Any], str]] = {
    "LambdaLR": (lambda o: LambdaLR(o, lambda e: 0.9**e), "LambdaLR"),
    "OneCycleLR": (
        lambda o: OneCycleLR(o, max_lr=1.0, total_steps=10, cycle_momentum=False),
        "OneCycleLR",
    ),
    "CyclicLR": (
        lambda o: CyclicLR(o, base_lr=0.01, max_lr=0.1, cycle_momentum=False),
        "CyclicLR",
    ),
    "CosineAnnealingWarmRestarts": (
        lambda o: CosineAnnealingWarmRestarts(o, T_0=5),
        "CosineAnnealingWarmRestarts",
    ),
    "ReduceLROnPlateau": (lambda o: ReduceLROnPlateau(o), "ReduceLROnPlateau"),
    "CosineAnnealingLR-eta_min": (
        lambda o: CosineAnnealingLR(o, T_max=10, eta_min=1e-4),
        "eta_min",
    ),
    "SequentialLR": (
        lambda o: SequentialLR(
            o, [LinearLR(o, start_factor=0.5, total_iters=2), ExponentialLR(o, 0.9)], [2]
        ),
        "SequentialLR",
    ),
    "Chained-with-LambdaLR": (
        lambda o: ChainedScheduler([ExponentialLR(o, 0.9), LambdaLR(o, lambda e: 1.0)]),
        "LambdaLR",
    ),
    "StepLR-subclass": (
        lambda o: type("MyStepLR", (StepLR,), {})(o, step_size=2),
        "MyStepLR",
    ),
    "MILES": (lambda o: MILES(o), "MILES"),
    "not-a-scheduler": (lambda o: object(), "object"),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", list(REJECTED))
def test_check_composable_rejects(name: str) -> None:
    build, pattern = REJECTED[name]
    opt = make_optimizer()
    scheduler = build(opt)
    with pytest.raises(TypeError, match=pattern) as info:
        check_composable(scheduler)
    assert "compose" in str(info.value)
    if name not in ("ReduceLROnPlateau", "MILES", "not-a-scheduler"):
        assert "base=" in str(info.value)  # the way out
    with pytest.raises(TypeError, match=pattern):
        MILES(opt, base_schedulers=[scheduler])


def test_sequential_lr_really_erases_the_factor() -> None:
    """Why SequentialLR is rejected: at its milestone torch resets LRs from base_lrs."""
    opt = make_optimizer()
    seq = SequentialLR(
        opt, [ConstantLR(opt, factor=1.0, total_iters=1), ExponentialLR(opt, 0.9)], [2]
    )
    opt.param_groups[0]["lr"] *= 0.5  # what a MILES slow-down does
    for _ in range(2):
        opt.step()
        seq.step()
    assert lrs(opt)[0] == BASE_LRS[0]  # the 0.5 is gone


def test_base_scheduler_on_another_optimizer_is_rejected() -> None:
    other = ExponentialLR(make_optimizer(), gamma=0.9)
    with pytest.raises(ValueError, match="different optimizer"):
        MILES(make_optimizer(), base_schedulers=[other])


# ---------------------------------------------------------------- any schedule, through base=

STEPS_PER_EPOCH = 5
EPOCHS = 8
TOTAL = STEPS_PER_EPOCH * EPOCHS


def _hf_cosine(o: torch.optim.Optimizer) -> LRScheduler:
    transformers = pytest.importorskip("transformers")
    return transformers.get_cosine_schedule_with_warmup(o, 6, TOTAL)  # type: ignore[no-any-return]


PER_STEP: dict[str, Builder] = {
    "LambdaLR-warmup": lambda o: LambdaLR(o, lambda s: min(1.0, (s + 1) / 7)),
    "OneCycleLR": lambda o: OneCycleLR(o, max_lr=0.3, total_steps=TOTAL + 1, cycle_momentum=False),
    "SequentialLR-warmup-cosine": lambda o: SequentialLR(
        o,
        [LinearLR(o, start_factor=0.1, total_iters=6), CosineAnnealingLR(o, T_max=TOTAL - 6)],
        milestones=[6],
    ),
    "CosineAnnealingLR-eta_min": lambda o: CosineAnnealingLR(o, T_max=TOTAL, eta_min=0.004),
    "CosineAnnealingWarmRestarts": lambda o: CosineAnnealingWarmRestarts(o, T_0=7, eta_min=1e-3),
    "CyclicLR": lambda o: CyclicLR(o, base_lr=0.01, max_lr=0.2, step_size_up=4),
    "HF-cosine-warmup": _hf_cosine,
    "StepLR": lambda o: StepLR(o, step_size=3, gamma=0.7),
}


def assert_base_times_factor(sched: MILES, opt: torch.optim.Optimizer, ref: list[float]) -> None:
    """Every group trains at the lone schedule's LR times MILES's factor (shared: exactly)."""
    factors = sched.factors
    for group, ref_lr, lr in zip(opt.param_groups, ref, lrs(opt), strict=True):
        modality = group["modality"]
        if modality is None:
            assert lr == ref_lr
        else:
            assert math.isclose(lr, ref_lr * factors[modality], rel_tol=1e-12), (modality, lr)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's own SequentialLR/step-order notes
@pytest.mark.parametrize("name", list(PER_STEP))
def test_any_per_step_schedule_through_base(name: str) -> None:
    """Per-step schedules with decisions every epoch: base x factor at every single step."""
    ref_opt, opt = make_optimizer(), make_optimizer()
    ref = PER_STEP[name](ref_opt)
    sched = MILES(opt, tau=0.1, mu=0.3, base=PER_STEP[name](opt))
    assert_base_times_factor(sched, opt, lrs(ref_opt))
    reasons = []
    for epoch in range(EPOCHS):
        for _ in range(STEPS_PER_EPOCH):
            ref_opt.step()
            opt.step()
            ref.step()
            assert sched.step() is None  # one step of the base schedule
            assert_base_times_factor(sched, opt, lrs(ref_opt))
        fused, m_a, m_b = METRICS[epoch % len(METRICS)]
        decision = sched.step(fused=fused, unimodal={"A": m_a, "B": m_b})
        assert decision is not None
        reasons.append(decision.slowed)
        assert_base_times_factor(sched, opt, lrs(ref_opt))
        assert decision.lrs == lrs(opt) == sched.get_last_lr()
    assert sched.last_epoch == EPOCHS  # base steps do not count as epochs
    assert reasons[:3] == ["A", "A", "B"]  # a repeated slow-down, then a switch


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_per_epoch_base_schedule() -> None:
    """A per-epoch schedule through base=: one step() then one decision per epoch."""
    ref_opt, opt = make_optimizer(), make_optimizer()
    build = PER_STEP["SequentialLR-warmup-cosine"]
    ref = build(ref_opt)
    sched = MILES(opt, tau=0.1, mu=0.5, base=build(opt))
    for fused, m_a, m_b in METRICS * 2:
        ref_opt.step()
        opt.step()
        ref.step()
        sched.step()
        sched.step(fused=fused, unimodal={"A": m_a, "B": m_b})
        assert_base_times_factor(sched, opt, lrs(ref_opt))


class TimmStyle:
    """Writes absolute LRs from each group's initial LR on step_update(n), like timm's."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

    def step_update(self, num_updates: int) -> None:
        scale = 0.5 * (1 + math.cos(math.pi * num_updates / TOTAL))
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * scale


@pytest.mark.parametrize("how", ["unscaled", "reapply"])
def test_absolute_schedule_stepped_elsewhere(how: str) -> None:
    """A schedule MILES does not step: `with unscaled()` or reapply() right after it."""
    ref_opt, opt = make_optimizer(), make_optimizer()
    ref, timm = TimmStyle(ref_opt), TimmStyle(opt)
    sched = MILES(opt, tau=0.1, mu=0.3)
    n = 0
    for epoch in range(EPOCHS):
        for _ in range(STEPS_PER_EPOCH):
            n += 1
            ref.step_update(n)
            if how == "unscaled":
                with sched.unscaled():
                    timm.step_update(n)
            else:
                timm.step_update(n)
                sched.reapply()
                sched.reapply()  # idempotent: no change since, nothing compounds
            assert_base_times_factor(sched, opt, lrs(ref_opt))
        fused, m_a, m_b = METRICS[epoch % len(METRICS)]
        sched.step(fused=fused, unimodal={"A": m_a, "B": m_b})
        assert_base_times_factor(sched, opt, lrs(ref_opt))


def test_repeated_slow_down_is_reapplied_after_an_absolute_overwrite() -> None:
    """Slow A twice with LambdaLR writing in between: A stays at mu x schedule both times."""
    opt = make_optimizer()
    lam = LambdaLR(opt, lambda s: 0.8**s)
    sched = MILES(opt, tau=0.1, mu=0.5)
    slow_a = {"fused": 1.0, "unimodal": {"A": 0.9, "B": 0.2}}
    sched.step(**slow_a)
    for step in range(1, 4):
        opt.step()
        lam.step()
        sched.reapply()
        decision = sched.step(**slow_a)
        assert decision is not None and decision.slowed == "A"
        assert math.isclose(lrs(opt)[0], BASE_LRS[0] * 0.8**step * 0.5, rel_tol=1e-12)
        assert lrs(opt)[2] == BASE_LRS[2] * 0.8**step


def test_undeclared_absolute_overwrite_is_detected() -> None:
    """LambdaLR stepped behind MILES's back erases the factor: MILES warns (once)."""
    opt = make_optimizer()
    lam = LambdaLR(opt, lambda s: 0.9**s)
    sched = MILES(opt, tau=0.1, mu=0.5)
    sched.step(fused=1.0, unimodal={"A": 0.9, "B": 0.2})
    opt.step()
    lam.step()
    with pytest.warns(UserWarning, match=r"param group 0 \(modality 'A'\).*base=schedule"):
        sched.step(fused=1.0, unimodal={"A": 0.9, "B": 0.2})


def test_declared_multiplicative_schedule_does_not_warn() -> None:
    opt = make_optimizer()
    base = ExponentialLR(opt, gamma=0.9)
    sched = MILES(opt, tau=0.1, base_schedulers=[base])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fused, m_a, m_b in METRICS:
            opt.step()
            base.step()
            sched.step(fused=fused, unimodal={"A": m_a, "B": m_b})


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resume_with_a_base_schedule_is_exact() -> None:
    """State dict (with the base's) through torch.save(weights_only): the same LRs bit for bit."""
    build = PER_STEP["OneCycleLR"]

    def run(opt: torch.optim.Optimizer, sched: MILES, epochs: range) -> list[list[float]]:
        seen = []
        for epoch in epochs:
            for _ in range(STEPS_PER_EPOCH):
                opt.step()
                sched.step()
                seen.append(lrs(opt))
            fused, m_a, m_b = METRICS[epoch % len(METRICS)]
            sched.step(fused=fused, unimodal={"A": m_a, "B": m_b})
            seen.append(lrs(opt))
        return seen

    opt = make_optimizer()
    sched = MILES(opt, tau=0.1, mu=0.3, base=build(opt))
    straight = run(opt, sched, range(EPOCHS))

    opt1 = make_optimizer()
    sched1 = MILES(opt1, tau=0.1, mu=0.3, base=build(opt1))
    first = run(opt1, sched1, range(3))
    buffer = io.BytesIO()
    torch.save({"optimizer": opt1.state_dict(), "scheduler": sched1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    opt2 = make_optimizer()
    sched2 = MILES(opt2, base=build(opt2))
    opt2.load_state_dict(saved["optimizer"])
    sched2.load_state_dict(saved["scheduler"])
    assert first + run(opt2, sched2, range(3, EPOCHS)) == straight
    assert sched2.history == sched.history


def test_base_must_be_a_schedule_on_this_optimizer() -> None:
    with pytest.raises(TypeError, match="step"):
        MILES(make_optimizer(), base=object())
    with pytest.raises(ValueError, match="different optimizer"):
        MILES(make_optimizer(), base=ExponentialLR(make_optimizer(), 0.9))
    opt = make_optimizer()
    with pytest.raises(TypeError, match="another MILES"):
        MILES(opt, base=MILES(opt))
