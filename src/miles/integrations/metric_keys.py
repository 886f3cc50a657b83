"""Where a framework callback finds MILES's inputs among the logged metrics (one rule for all)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from miles.scheduler import MILES, Decision

__all__ = ["ESTIMATORS", "MetricKeys"]

ESTIMATORS = ("heads", "ablation")


@dataclass(frozen=True)
class MetricKeys:
    """The names of the fused metric and of each modality's metric; ``{modality}`` is filled in.

    ``estimator="heads"`` reads ``head`` (the unimodal heads); ``"ablation"`` reads ``without``
    (the fused head with that modality ablated).
    """

    fused: str
    head: str
    without: str
    estimator: str = "heads"

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        for name in ("head", "without"):
            if "{modality}" not in getattr(self, name):
                raise ValueError(
                    f"{name}_key must contain '{{modality}}', got {getattr(self, name)!r}"
                )

    def step(self, scheduler: MILES, read: Callable[[str], Any]) -> Decision:
        """Read every metric with ``read(name)`` and take MILES's decision from them."""
        fused = read(self.fused)
        template = self.head if self.estimator == "heads" else self.without
        values = {m: read(template.format(modality=m)) for m in scheduler.modalities}
        if self.estimator == "heads":
            decision = scheduler.step(fused=fused, unimodal=values)
        else:
            decision = scheduler.step(fused=fused, without=values)
        assert decision is not None
        return decision
