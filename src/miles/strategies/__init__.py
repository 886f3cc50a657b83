"""Balancing strategies, registered by name (``build_strategy("miles", tau=0.2)``).

Importing this package registers every built-in method: ``joint``, ``joint+aux``, ``unimodal``,
``mses``, ``mslr-k``, ``mslr-s``, ``mslr-d``, ``ogm``, ``ogm-ge``, ``gblend`` and ``miles``, and
the newer methods ``agm``, ``pmr``, ``mla``, ``mmpareto``, ``reconboost`` and ``greedy``.
:class:`Strategy` is the no-op hook base; :class:`Joint` and :class:`JointAux` are the reference
methods the others extend.
"""

from miles.strategies.agm import AGM
from miles.strategies.base import (
    EvalResult,
    StepOutput,
    Strategy,
    StrategyContext,
)
from miles.strategies.gblend import GBlend
from miles.strategies.greedy import Greedy
from miles.strategies.joint import Joint, JointAux
from miles.strategies.miles import MILESStrategy
from miles.strategies.mla import MLA
from miles.strategies.mmpareto import MMPareto
from miles.strategies.mses import MSES
from miles.strategies.mslr import MSLRDynamic, MSLRKeep, MSLRSmooth
from miles.strategies.ogm import OGM
from miles.strategies.ogm_ge import OGMGE
from miles.strategies.pmr import PMR
from miles.strategies.reconboost import ReconBoost
from miles.strategies.registry import available_strategies, build_strategy, register_strategy
from miles.strategies.unimodal import Unimodal

__all__ = [
    "AGM",
    "MLA",
    "MSES",
    "OGM",
    "OGMGE",
    "PMR",
    "EvalResult",
    "GBlend",
    "Greedy",
    "Joint",
    "JointAux",
    "MILESStrategy",
    "MMPareto",
    "MSLRDynamic",
    "MSLRKeep",
    "MSLRSmooth",
    "ReconBoost",
    "StepOutput",
    "Strategy",
    "StrategyContext",
    "Unimodal",
    "available_strategies",
    "build_strategy",
    "register_strategy",
]
