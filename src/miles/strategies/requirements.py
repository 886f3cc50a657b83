"""Small checks and settings several balancing methods share: their modulation window and what
they require of the task and the model (single-label targets, a number of modalities, the fusion
they installed).

Kept in one place so every method words its errors, and decides whether an epoch is modulated,
the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from miles.models.fusion import JointFusionModel
from miles.models.fusions import Fusion
from miles.validation import check_positive_int


@dataclass(frozen=True)
class ModulationWindow:
    """Epochs ``starts <= epoch <= ends`` (1-based, inclusive) in which a method acts.

    The authors' loops count epochs from 0 and test ``starts <= epoch <= ends``; their window
    ``[s, e]`` is ours ``[s + 1, e + 1]``.
    """

    starts: int
    ends: int

    def __post_init__(self) -> None:
        check_positive_int("modulation_starts", self.starts)
        check_positive_int("modulation_ends", self.ends)
        if self.ends < self.starts:
            raise ValueError(
                f"modulation_ends ({self.ends}) must be >= modulation_starts ({self.starts})"
            )

    def __contains__(self, epoch: Any) -> bool:
        return bool(self.starts <= epoch <= self.ends)

    def describe(self) -> dict[str, int]:
        return {"modulation_starts": self.starts, "modulation_ends": self.ends}


def batch_dependent(what: str) -> str:
    """The ``Strategy.single_process`` reason of a method whose gradient ``what`` (modulation,
    combination) is computed from the batch: under DDP each process has its own."""
    return (
        f"its gradient {what} is computed from each process's own batch, so the processes would "
        "train different models"
    )


def require_single_label(method: str, multilabel: bool) -> None:
    """Methods built on the softmax of one true class refuse multilabel tasks up front."""
    if multilabel:
        raise ValueError(
            f"{method} does not support multilabel tasks: it reads the softmax probability of the "
            "true class, which single-label classification alone defines"
        )


def require_modalities(
    method: str, model: JointFusionModel, *, minimum: int = 2, exactly: int | None = None
) -> None:
    """At least ``minimum`` modalities (or ``exactly`` that many), or a clear error."""
    count = len(model.modalities)
    if exactly is not None and count != exactly:
        raise ValueError(
            f"{method} is defined for exactly {exactly} modalities, got {list(model.modalities)}"
        )
    if count < minimum:
        raise ValueError(
            f"{method} needs at least {minimum} modalities, got {list(model.modalities)}"
        )


F = TypeVar("F", bound=Fusion)


def installed_fusion(method: str, model: JointFusionModel, kind: type[F]) -> F:
    """The model's fusion, which ``method`` installed in ``configure_model``, or a clear error."""
    if not isinstance(model.fusion, kind):
        raise RuntimeError(
            f"{method}: the model has no {kind.name or kind.__name__!r} fusion (was "
            "configure_model called?)"
        )
    return model.fusion
