"""Optimizer parameter groups tagged by modality, the contract between models and MILES.

MILES changes the learning rate of groups whose ``"modality"`` is a name and never touches groups
whose modality is ``None`` (fusion layer, fused head). Each group also gets a ``"name"`` so that
tools like Lightning's ``LearningRateMonitor`` plot one curve per modality.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from miles.models.fusion import JointFusionModel, check_disjoint_parameters

SHARED = "shared"


def _as_modules(value: nn.Module | Iterable[nn.Module]) -> list[nn.Module]:
    return [value] if isinstance(value, nn.Module) else list(value)


def _params(modules: list[nn.Module]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        for p in module.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def param_groups_by_modality(
    modalities: Mapping[str, nn.Module | Iterable[nn.Module]],
    shared: nn.Module | Iterable[nn.Module] | None = None,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Build ``[{"params", "modality", "name", ...}]`` from per-modality and shared modules.

    Works with any model, not only :class:`JointFusionModel`. ``group_options`` (e.g. ``lr``,
    ``weight_decay``) are copied into every group. Raises ``ValueError`` when a parameter is shared
    or tied across modalities (or between a modality and the shared part), or a modality has none.
    """
    if SHARED in modalities:
        raise ValueError(f"{SHARED!r} is reserved for the shared group; rename that modality")
    per_modality = {name: _params(_as_modules(mods)) for name, mods in modalities.items()}
    shared_params = _params(_as_modules(shared)) if shared is not None else []
    check_disjoint_parameters({**per_modality, SHARED: shared_params})
    groups: list[dict[str, Any]] = []
    for name, params in per_modality.items():
        if not params:
            raise ValueError(f"modality {name!r} has no parameters to schedule")
        groups.append({"params": params, "modality": name, "name": name, **group_options})
    if shared_params:
        groups.append({"params": shared_params, "modality": None, "name": SHARED, **group_options})
    return groups


def modality_param_groups(
    model: JointFusionModel, *, head_follows_encoder: bool = True, **group_options: Any
) -> list[dict[str, Any]]:
    """Groups for a :class:`JointFusionModel`: one per modality, one shared (the fusion module).

    ``head_follows_encoder=True`` (default) puts modality ``m``'s auxiliary head in ``m``'s group,
    so MILES slows the whole unimodal branch; ``False`` keeps heads at the base rate.
    """
    per_modality: dict[str, list[nn.Module]] = {}
    shared: list[nn.Module] = [model.fusion]
    for name in model.modalities:
        per_modality[name] = [model.encoders[name]]
        if head_follows_encoder:
            per_modality[name].append(model.heads[name])
        else:
            shared.append(model.heads[name])
    return param_groups_by_modality(per_modality, shared, **group_options)
