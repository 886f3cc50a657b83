"""What ``miles sweep`` searches for each method: a table keyed by method name.

Every method searches the base learning rate; the rest of its space is its own hyper-parameters.
No strategy knows about tuning: a new method gets a search space by an entry in
:data:`SEARCH_SPACES`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

__all__ = [
    "LR",
    "NOT_SWEEPABLE",
    "SEARCH_SPACES",
    "UNIMODAL_LRS",
    "Param",
    "run_settings",
    "search_space",
    "suggest",
]


@dataclass(frozen=True)
class Param:
    """One searched hyper-parameter: its range and where its value goes.

    ``per_modality`` parameters are sampled once per modality (Optuna names ``name.<modality>``)
    and passed to the strategy as a ``{modality: value}`` mapping; ``trainer`` parameters go to
    :class:`~miles.training.trainer.TrainerConfig` instead of the strategy.
    """

    name: str
    low: float
    high: float
    log: bool = False
    integer: bool = False
    per_modality: bool = False
    trainer: bool = False

    def describe(self) -> str:
        kind = "int" if self.integer else ("log-uniform" if self.log else "uniform")
        low, high = (int(self.low), int(self.high)) if self.integer else (self.low, self.high)
        where = " (one per modality)" if self.per_modality else ""
        return f"`{self.name}`{where}: {kind} [{low:g}, {high:g}]"


LR = Param("lr", 1e-4, 1e-2, log=True, trainer=True)
#: MSLR's per-encoder rates: the paper's own search over them replaces our unimodal LR sweep here
UNIMODAL_LRS = Param("unimodal_lrs", 1e-4, 1e-2, log=True, per_modality=True)

#: the search space of every sweepable method (the base learning rate first, for all)
SEARCH_SPACES: dict[str, tuple[Param, ...]] = {
    "joint": (LR,),
    "joint+aux": (LR,),
    "miles": (LR, Param("tau", 0.0, 0.5), Param("mu", 0.01, 1.0, log=True)),
    "ogm": (LR, Param("alpha", 0.05, 1.0, log=True)),
    "ogm-ge": (LR, Param("alpha", 0.05, 1.0, log=True)),
    "gblend": (LR, Param("super_epoch", 2, 10, integer=True)),
    "mses": (LR, Param("patience", 2, 10, integer=True)),
    "mslr-k": (LR, UNIMODAL_LRS),
    "mslr-s": (LR, UNIMODAL_LRS, Param("smoothing", 0.0, 1.0)),
    "mslr-d": (LR, UNIMODAL_LRS, Param("window", 2, 10, integer=True)),
    # newer methods (issue 13): the ranges span the values their authors and BalanceBenchmark use
    "agm": (LR, Param("alpha", 0.1, 5.0, log=True)),
    "pmr": (LR, Param("alpha", 0.1, 3.0, log=True), Param("momentum", 0.0, 0.9)),
    "mla": (LR,),
    "mmpareto": (LR, Param("gamma", 1.0, 2.0)),
    "reconboost": (
        LR,
        Param("weight1", 1.0, 10.0),
        Param("boost_epochs", 1, 4, integer=True),
        Param("rectify_epochs", 1, 4, integer=True),
    ),
    "greedy": (LR, Param("epsilon", 1e-3, 0.1, log=True), Param("window", 1, 10, integer=True)),
}
#: methods that exist but cannot be swept, and why
NOT_SWEEPABLE = {
    "unimodal": "it is a reference with one run per modality, not a fusion method to tune; "
    "sweep 'joint+aux' or train the unimodal references with `miles compare`",
}


def search_space(method: str) -> tuple[Param, ...]:
    """The searched parameters of ``method``; a clear error for methods that cannot be swept."""
    if method in NOT_SWEEPABLE:
        raise ValueError(f"method {method!r} cannot be swept: {NOT_SWEEPABLE[method]}")
    try:
        return SEARCH_SPACES[method]
    except KeyError:
        raise ValueError(
            f"no search space for method {method!r}; sweepable: {sorted(SEARCH_SPACES)} "
            "(add an entry to miles.studies.search_space.SEARCH_SPACES for a new method)"
        ) from None


def _names(param: Param, modalities: Sequence[str]) -> list[str]:
    return [f"{param.name}.{m}" for m in modalities] if param.per_modality else [param.name]


def suggest(trial: optuna.Trial, method: str, modalities: Sequence[str]) -> dict[str, Any]:
    """Sample ``method``'s parameters in ``trial``: the flat Optuna parameters, in table order."""
    params: dict[str, Any] = {}
    for param in search_space(method):
        for name in _names(param, modalities):
            if param.integer:
                params[name] = trial.suggest_int(name, int(param.low), int(param.high))
            else:
                params[name] = trial.suggest_float(name, param.low, param.high, log=param.log)
    return params


def run_settings(
    method: str, params: Mapping[str, Any], modalities: Sequence[str]
) -> tuple[float, dict[str, Any]]:
    """Flat trial parameters -> (base learning rate, strategy parameters) for one run."""
    lr: float | None = None
    strategy_params: dict[str, Any] = {}
    for param in search_space(method):
        if param.per_modality:
            strategy_params[param.name] = {m: params[f"{param.name}.{m}"] for m in modalities}
        elif param.trainer:
            lr = float(params[param.name])
        else:
            strategy_params[param.name] = params[param.name]
    if lr is None:  # pragma: no cover - every table entry starts with LR
        raise ValueError(f"search space of {method!r} has no learning rate")
    return lr, strategy_params
