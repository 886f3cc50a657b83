"""Balancing strategies, registered by name (``build_strategy("miles", tau=0.2)``)."""

from miles.strategies.base import EvalResult, Strategy, StrategyContext
from miles.strategies.joint import Joint, JointAux
from miles.strategies.miles import MILESStrategy
from miles.strategies.registry import available_strategies, build_strategy, register_strategy

__all__ = [
    "EvalResult",
    "Joint",
    "JointAux",
    "MILESStrategy",
    "Strategy",
    "StrategyContext",
    "available_strategies",
    "build_strategy",
    "register_strategy",
]
