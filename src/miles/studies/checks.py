"""Checks of the few fields a study varies, shared by the study configs and the command line.

Each returns the checked value (a list for list fields); a wrong type is a ``TypeError`` and a
wrong value a ``ValueError`` naming the value and what was expected. The fusion names come from
:func:`available_fusions`, the one place the studies and the CLI ask which fusions exist.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from miles.training.experiment import ExperimentConfig
from miles.validation import check_non_negative_int

__all__ = [
    "available_fusions",
    "check_base",
    "check_fusions",
    "check_methods",
    "check_seeds",
    "number_pairs",
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


def number_pairs(items: Iterable[str], what: str) -> dict[str, float]:
    """``["tau=0.2", "mu=0.5"]`` -> ``{"tau": 0.2, "mu": 0.5}``; ``what`` names the option in
    errors (an item without ``=``: "expects KEY=VALUE"; a value that is no number: "not a
    number"). Empty items are skipped."""
    pairs: dict[str, float] = {}
    for item in (t.strip() for t in items):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{what} expects KEY=VALUE pairs, got {item!r}")
        try:
            pairs[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"{what} {key.strip()}: not a number: {value!r}") from None
    return pairs
