"""Checks of the few fields a study varies, shared by the study configs and the command line.

Each returns the checked value (a list for list fields); a wrong type is a ``TypeError`` and a
wrong value a ``ValueError`` naming the value and what was expected. The fusion names come from
:func:`available_fusions`, the one place the studies and the CLI ask which fusions exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from miles.training.experiment import ExperimentConfig
from miles.validation import check_non_negative_int

__all__ = [
    "available_fusions",
    "check_base",
    "check_fusions",
    "check_methods",
    "check_seeds",
]


def available_fusions() -> list[str]:
    """The fusion names a study or a command may use (the fusion registry's)."""
    from miles.models.fusions import available_fusions as registered

    return registered()


def check_base(base: Any) -> ExperimentConfig:
    """The study's base experiment (what every run shares)."""
    if not isinstance(base, ExperimentConfig):
        raise TypeError(f"base must be an ExperimentConfig, got {type(base).__name__}")
    return base


def _names(kind: str, values: Any, known: Sequence[str]) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise TypeError(f"{kind} must be a list of names, got {values!r}")
    items = list(values)
    if not items:
        raise ValueError(f"{kind} must not be empty")
    unknown = [v for v in items if v not in known]
    if unknown:
        raise ValueError(f"unknown {kind} {unknown}; available: {list(known)}")
    if len(set(items)) != len(items):
        raise ValueError(f"{kind} has duplicates: {items}")
    return items


def check_fusions(fusions: Any) -> list[str]:
    """Distinct, known fusion names (at least one)."""
    return _names("fusions", fusions, available_fusions())


def check_methods(methods: Any) -> list[str]:
    """Distinct, registered strategy names (at least one)."""
    from miles.strategies import available_strategies

    return _names("methods", methods, available_strategies())


def check_seeds(seeds: Any) -> list[int]:
    """Distinct non-negative integer seeds (at least one)."""
    if isinstance(seeds, str) or not isinstance(seeds, Sequence):
        raise TypeError(f"seeds must be a list of integers, got {seeds!r}")
    items = [check_non_negative_int("seed", seed) for seed in seeds]
    if not items or len(set(items)) != len(items):
        raise ValueError(f"seeds must be distinct and non-empty, got {items}")
    return items
