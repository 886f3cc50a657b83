"""How many runs a method needs in a comparison, keyed by method name.

A method enters ``miles compare`` (and the references of ``miles ablate``) with one run at its
default parameters, unless its entry here says otherwise:

- ``unimodal``: one run per modality (labelled by the modality), and *fusion-independent*: the
  fused head is never trained, so the run is made once and shown under every fusion;
- ``mslr-k``, ``mslr-s``, ``mslr-d``: one run started from each modality's best unimodal learning
  rate, which the comparison's unimodal LR sweep finds (:mod:`miles.studies.lr_sweep`), run only
  when such a method is planned;
- ``mla``, ``reconboost``, ``greedy``: *fusion-independent*: each installs its own fusion (a shared
  head with an uncertainty-weighted or boosted sum, the MMTM branches), so the run is made once
  and shown under every fusion.

The strategies themselves know nothing about comparisons. A new method that needs more than one
run, or extra inputs, registers its :class:`MethodPlan` with :func:`register_plan`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MethodPlan",
    "PlanContext",
    "comparison_runs",
    "method_plan",
    "register_plan",
]


@dataclass(frozen=True)
class PlanContext:
    """What a plan may use: the dataset's modalities and, on demand, the unimodal LR sweep."""

    modalities: tuple[str, ...]
    unimodal_lrs: Callable[[], dict[str, float]]


Variants = Callable[[PlanContext], list[tuple[str, dict[str, Any]]]]


def _single(ctx: PlanContext) -> list[tuple[str, dict[str, Any]]]:
    return [("", {})]


@dataclass(frozen=True)
class MethodPlan:
    """``variants(ctx)``: ``(label, strategy params)`` of each run; ``fusion_independent``: the
    result does not depend on the fusion (made once, shown under every fusion)."""

    variants: Variants = _single
    fusion_independent: bool = False


_PLANS: dict[str, MethodPlan] = {}


def register_plan(method: str, plan: MethodPlan) -> None:
    """Say how ``method`` enters a comparison (replaces an earlier entry of that name)."""
    if not isinstance(plan, MethodPlan):
        raise TypeError(f"plan must be a MethodPlan, got {type(plan).__name__}")
    _PLANS[method] = plan


def method_plan(method: str) -> MethodPlan:
    """The registered plan of ``method``; one default run for any method without an entry."""
    return _PLANS.get(method, MethodPlan())


def comparison_runs(method: str, ctx: PlanContext) -> list[tuple[str, dict[str, Any]]]:
    """``(label, strategy params)`` of every run ``method`` needs."""
    return method_plan(method).variants(ctx)


def _per_modality(ctx: PlanContext) -> list[tuple[str, dict[str, Any]]]:
    return [(m, {"modality": m}) for m in ctx.modalities]


def _from_unimodal_lrs(ctx: PlanContext) -> list[tuple[str, dict[str, Any]]]:
    return [("", {"unimodal_lrs": ctx.unimodal_lrs()})]


register_plan("unimodal", MethodPlan(_per_modality, fusion_independent=True))
for _own_fusion in ("mla", "reconboost", "greedy"):
    register_plan(_own_fusion, MethodPlan(fusion_independent=True))
for _mslr in ("mslr-k", "mslr-s", "mslr-d"):
    register_plan(_mslr, MethodPlan(_from_unimodal_lrs))
