"""Strategies registered by name: the trainer looks them up here, never through if-chains."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from miles.registry import Registry
from miles.strategies.base import Strategy

S = TypeVar("S", bound=type[Strategy])
_STRATEGIES: Registry[type[Strategy]] = Registry("strategy")


def register_strategy(name: str) -> Callable[[S], S]:
    """Class decorator: make a strategy buildable as ``build_strategy(name, **params)``."""
    return _STRATEGIES.register(name)


def build_strategy(name: str, **params: Any) -> Strategy:
    """Instantiate a registered strategy; unknown names list what exists."""
    factory = strategy_class(name)
    try:
        return factory(**params)
    except TypeError as exc:
        raise TypeError(f"bad parameters for strategy {name!r}: {exc}") from exc


def strategy_class(name: str) -> type[Strategy]:
    """The registered class, for class-level facts (``uses_aux_losses``, ``name``)."""
    return _STRATEGIES.get(name)


def available_strategies() -> list[str]:
    return _STRATEGIES.names()
