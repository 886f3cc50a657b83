"""The training loop, its engine (precision, loaders, schedules, distributed) and its files.

The submodules load on first use, so the step primitives of :mod:`miles.strategies.base` can
import :mod:`miles.training.precision` without pulling in the trainer (which imports them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from miles._lazy import lazy_attributes

_LAZY = {
    "RunResult": "miles.results",
    "Trainer": "miles.training.trainer",
    "TrainerConfig": "miles.training.trainer",
}

if TYPE_CHECKING:
    from miles.results import RunResult
    from miles.training.trainer import Trainer, TrainerConfig

__getattr__ = lazy_attributes(__name__, _LAZY)

__all__ = ["RunResult", "Trainer", "TrainerConfig"]
