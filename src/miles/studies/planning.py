"""How many runs a method needs in a comparison, keyed by method name.

A method enters ``miles compare`` (and the references of ``miles ablate``) with one run at its
default parameters, unless its entry here says otherwise:

- ``unimodal``: one run per modality (labelled by the modality), and *fusion-independent*: the
  fused head is never trained, so the run is made once and shown under every fusion;
- ``mslr-k``, ``mslr-s``, ``mslr-d``: started from each modality's best unimodal learning rate,
  which the study's unimodal LR sweep finds (:mod:`miles.studies.lr_sweep`), run only when such a
  method is planned (the paper: "searching for a best unimodal learning rate for each modality
  before the multimodal training starts"). These *inputs* also reach every trial of
  ``miles sweep``, which then searches only the method's own hyper-parameters;
- ``ogm``, ``ogm-ge``: on a dataset the authors give an alpha for (CREMA-D 0.8, VGGSound 0.1),
  that alpha (:data:`miles.strategies.ogm.AUTHORS_ALPHA`);
- ``miles``: two runs, the literal Alg. 1 (``reset_other=False``, the default) and the reading
  in which only one modality is slowed at a time (``reset_other=True``, labelled
  ``reset_other``): the paper's text fits both;
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
    "method_inputs",
    "method_plan",
    "register_plan",
]


@dataclass(frozen=True)
class PlanContext:
    """What a plan may use: the dataset's modalities, on demand the unimodal LR sweep, and the
    dataset's registered name."""

    modalities: tuple[str, ...]
    unimodal_lrs: Callable[[], dict[str, float]]
    dataset: str = ""


Variants = Callable[[PlanContext], list[tuple[str, dict[str, Any]]]]
Inputs = Callable[[PlanContext], dict[str, Any]]


def _single(ctx: PlanContext) -> list[tuple[str, dict[str, Any]]]:
    return [("", {})]


def _no_inputs(ctx: PlanContext) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class MethodPlan:
    """``variants(ctx)``: ``(label, strategy params)`` of each run; ``fusion_independent``: the
    result does not depend on the fusion (made once, shown under every fusion); ``inputs(ctx)``:
    strategy params every run of the method takes from the study (a variant's own params win),
    in a comparison and in every trial of a sweep."""

    variants: Variants = _single
    fusion_independent: bool = False
    inputs: Inputs = _no_inputs


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
    """``(label, strategy params)`` of every run ``method`` needs (its inputs included)."""
    plan = method_plan(method)
    variants = plan.variants(ctx)
    inputs = plan.inputs(ctx) if variants else {}
    return [(label, {**inputs, **params}) for label, params in variants]


def method_inputs(method: str, ctx: PlanContext) -> dict[str, Any]:
    """The strategy params ``method`` takes from the study (e.g. MSLR's unimodal rates)."""
    return method_plan(method).inputs(ctx)


def _per_modality(ctx: PlanContext) -> list[tuple[str, dict[str, Any]]]:
    return [(m, {"modality": m}) for m in ctx.modalities]


def _unimodal_lrs(ctx: PlanContext) -> dict[str, Any]:
    return {"unimodal_lrs": ctx.unimodal_lrs()}


def _authors_alpha(ctx: PlanContext) -> dict[str, Any]:
    from miles.strategies.ogm import AUTHORS_ALPHA

    return {"alpha": AUTHORS_ALPHA[ctx.dataset]} if ctx.dataset in AUTHORS_ALPHA else {}


def _both_reset_other(ctx: PlanContext) -> list[tuple[str, dict[str, Any]]]:
    return [("", {}), ("reset_other", {"reset_other": True})]


register_plan("unimodal", MethodPlan(_per_modality, fusion_independent=True))
for _own_fusion in ("mla", "reconboost", "greedy"):
    register_plan(_own_fusion, MethodPlan(fusion_independent=True))
for _mslr in ("mslr-k", "mslr-s", "mslr-d"):
    register_plan(_mslr, MethodPlan(inputs=_unimodal_lrs))
for _ogm in ("ogm", "ogm-ge"):
    register_plan(_ogm, MethodPlan(inputs=_authors_alpha))
register_plan("miles", MethodPlan(_both_reset_other))
