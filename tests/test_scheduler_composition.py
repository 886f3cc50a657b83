"""MILES on top of other torch schedules: what composes (exactly) and what is rejected."""

from __future__ import annotations

import math
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
    for fused, m_a, m_b in METRICS:
        ref_opt.step()
        opt.step()
        ref.step()
        base.step()
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
