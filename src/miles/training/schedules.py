"""The trainer's base learning-rate schedule: warm-up, then constant, cosine or step decay.

The schedule is a ``torch.optim.lr_scheduler.LambdaLR`` stepped after every training batch, whose
factor (:class:`ScheduleFactor`) is a closed form of the step count: each param group trains at
``its base rate x factor(step)``. It writes absolute rates, so a method that also sets rates must
compose with it: MILES takes it as ``MILES(..., base=schedule)`` and steps it with its own factors
removed, so a group trains at ``schedule x MILES factor`` (see :mod:`miles.scheduler`).

* ``constant``: factor 1 after the warm-up.
* ``cosine``: after the warm-up, from 1 down to ``min_factor`` at the last step, half a cosine.
* ``step``: after the warm-up, multiplied by ``gamma`` every ``step_every`` epochs.
* warm-up: a linear ramp over the first ``warmup`` steps, ``(k + 1) / warmup`` at step ``k`` (the
  first batch trains at ``1 / warmup`` of the rate, the ``warmup``-th at the full rate).

With ``constant`` and no warm-up the trainer builds no schedule at all, so the rates are exactly
the optimizer's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from miles.validation import check_choice, check_fraction, check_non_negative_int

__all__ = ["SCHEDULES", "ScheduleFactor", "build_schedule"]


@dataclass
class ScheduleFactor:
    """``factor(step)`` of a warm-up + constant / cosine / step schedule (a picklable callable,
    so ``LambdaLR.state_dict`` saves its settings)."""

    kind: str
    total_steps: int
    steps_per_epoch: int
    warmup_steps: int = 0
    min_factor: float = 0.0
    step_every: int = 30
    gamma: float = 0.1

    def __post_init__(self) -> None:
        check_choice("schedule", self.kind, SCHEDULES)
        check_non_negative_int("warmup_steps", self.warmup_steps)
        check_fraction("min_factor", self.min_factor, one=True)

    def __call__(self, step: int) -> float:
        warm = (step + 1) / self.warmup_steps if step < self.warmup_steps else 1.0
        return warm * _DECAYS[self.kind](self, step)


def _constant(f: ScheduleFactor, step: int) -> float:
    return 1.0


def _cosine(f: ScheduleFactor, step: int) -> float:
    span = max(f.total_steps - f.warmup_steps - 1, 1)
    progress = min(max(step - f.warmup_steps, 0) / span, 1.0)
    return f.min_factor + (1 - f.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def _step(f: ScheduleFactor, step: int) -> float:
    epoch = step // max(f.steps_per_epoch, 1)
    return float(f.gamma ** (epoch // f.step_every))


#: the decay after the warm-up, per schedule
_DECAYS: dict[str, Callable[[ScheduleFactor, int], float]] = {
    "constant": _constant,
    "cosine": _cosine,
    "step": _step,
}
SCHEDULES = tuple(_DECAYS)


def build_schedule(
    optimizer: Optimizer,
    kind: str,
    *,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: int = 0,
    warmup_steps: int = 0,
    min_factor: float = 0.0,
    step_every: int = 30,
    gamma: float = 0.1,
) -> LambdaLR | None:
    """The base schedule over ``optimizer`` (``None`` for ``constant`` without warm-up).

    Warm-up is given in epochs or in steps (optimizer steps = training batches), not both.
    """
    check_choice("schedule", kind, SCHEDULES)
    if warmup_epochs and warmup_steps:
        raise ValueError(
            f"give warmup_epochs or warmup_steps, not both (got {warmup_epochs} and {warmup_steps})"
        )
    warmup = warmup_steps or warmup_epochs * steps_per_epoch
    if kind == "constant" and warmup == 0:
        return None
    factor = ScheduleFactor(
        kind,
        total_steps=epochs * steps_per_epoch,
        steps_per_epoch=steps_per_epoch,
        warmup_steps=warmup,
        min_factor=min_factor,
        step_every=step_every,
        gamma=gamma,
    )
    return LambdaLR(optimizer, factor)
