"""Optimizer parameter groups tagged by modality, the contract between models and MILES.

MILES changes the learning rate of groups whose ``"modality"`` is a name and never touches groups
whose modality is ``None`` (fusion layer, fused head, anything shared). Each group also gets a
``"name"`` so that tools like Lightning's ``LearningRateMonitor`` and :meth:`miles.Decision.scalars`
show one curve per modality.

Three ways to build them, from the most generic:

* :func:`param_groups_by_prefix`: any model (a CLIP, an HF multi-tower model, your own), by
  parameter-name prefix.
* :func:`param_groups_by_modality`: from modules (or bare ``nn.Parameter``) per modality.
* :func:`modality_param_groups`: a :class:`~miles.models.fusion.JointFusionModel`.

A trainable parameter in no group would never be trained, so every builder that sees the model
refuses to leave one out and lists them. :func:`split_weight_decay` then splits every group into a
decayed and a non-decayed part (biases and normalization weights, the usual Hugging Face rule),
each keeping its modality.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from miles.models.fusion import JointFusionModel, check_disjoint_parameters

__all__ = [
    "SHARED",
    "default_no_decay",
    "modality_param_groups",
    "param_groups_by_modality",
    "param_groups_by_prefix",
    "split_weight_decay",
]

SHARED = "shared"

#: Parts of a group: modules, bare parameters, or iterables of either.
Part = nn.Module | nn.Parameter | Iterable[nn.Module | nn.Parameter]

#: ``no_decay(name, parameter, owning module) -> True`` to exclude a parameter from weight decay.
NoDecay = Callable[[str, nn.Parameter, nn.Module], bool]


def _params(part: Part, label: str) -> list[nn.Parameter]:
    """Unique parameters of modules and bare parameters, in order."""
    items: Iterable[Any] = [part] if isinstance(part, (nn.Module, nn.Parameter)) else part
    seen: dict[int, nn.Parameter] = {}
    for item in items:
        if isinstance(item, nn.Parameter):
            seen.setdefault(id(item), item)
        elif isinstance(item, nn.Module):
            for p in item.parameters():
                seen.setdefault(id(p), p)
        else:
            raise TypeError(
                f"{label} must hold nn.Module or nn.Parameter objects, got {type(item).__name__}"
            )
    return list(seen.values())


def _check_covered(model: nn.Module, groups: Sequence[Mapping[str, Any]]) -> None:
    """Refuse to leave a trainable parameter of ``model`` out of every group."""
    grouped = {id(p) for group in groups for p in group["params"]}
    left = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in grouped]
    if left:
        shown = left[:20] + ([f"... and {len(left) - 20} more"] if len(left) > 20 else [])
        raise ValueError(
            f"{len(left)} trainable parameter(s) of {type(model).__name__} are in no group and "
            f"would never be trained: {shown}. Give them to a modality or to the shared part "
            "(shared='' with param_groups_by_prefix takes every remaining parameter), or freeze "
            "them (requires_grad_(False)) if that is intended"
        )


def _group(
    params: list[nn.Parameter], modality: str | None, name: str, options: Any
) -> dict[str, Any]:
    return {"params": params, "modality": modality, "name": name, **options}


def param_groups_by_modality(
    modalities: Mapping[str, Part],
    shared: Part | None = None,
    *,
    model: nn.Module | None = None,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Build ``[{"params", "modality", "name", ...}]`` from per-modality and shared parts.

    Each part is a module, a bare ``nn.Parameter`` (e.g. CLIP's ``logit_scale``) or an iterable of
    either. Works with any model. With ``model``, every trainable parameter of it must be in a
    group (the error lists those left out). ``group_options`` (e.g. ``lr``, ``weight_decay``) are
    copied into every group. Raises ``ValueError`` when a parameter is shared or tied across
    modalities (or between a modality and the shared part), or a modality has none.
    """
    if SHARED in modalities:
        raise ValueError(f"{SHARED!r} is reserved for the shared group; rename that modality")
    per_modality = {name: _params(part, f"modality {name!r}") for name, part in modalities.items()}
    shared_params = _params(shared, "shared") if shared is not None else []
    check_disjoint_parameters({**per_modality, SHARED: shared_params})
    groups: list[dict[str, Any]] = []
    for name, params in per_modality.items():
        if not params:
            raise ValueError(f"modality {name!r} has no parameters to schedule")
        groups.append(_group(params, name, name, group_options))
    if shared_params:
        groups.append(_group(shared_params, None, SHARED, group_options))
    if model is not None:
        _check_covered(model, groups)
    return groups


def _prefix_list(value: str | Sequence[str], label: str) -> list[str]:
    if isinstance(value, str):
        items = [value]
    else:
        items = list(value) if isinstance(value, Sequence) else []
    if not items or not all(isinstance(p, str) for p in items):
        raise TypeError(f"{label} must be a name prefix or a non-empty list of them, got {value!r}")
    return items


def param_groups_by_prefix(
    model: nn.Module,
    prefixes: Mapping[str, str | Sequence[str]],
    shared: str | Sequence[str] | None = None,
    *,
    weight_decay: float | None = None,
    no_decay: NoDecay | None = None,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Groups of any model by parameter-name prefix, e.g. for a two-tower HF model::

        param_groups_by_prefix(
            clip, {"text": "text_model.", "image": "vision_model."}, shared=""
        )

    A parameter goes to the longest prefix it starts with (a modality's, or one of ``shared``);
    ``shared=""`` matches every name, so it takes whatever the modalities do not. Every trainable
    parameter must match: the error lists those that do not. With ``weight_decay``, each group is
    split by :func:`split_weight_decay`. ``group_options`` are copied into every group.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(prefixes, Mapping) or not prefixes:
        raise ValueError("prefixes must be a non-empty mapping {modality: prefix or prefixes}")
    if SHARED in prefixes:
        raise ValueError(f"{SHARED!r} is reserved for the shared group; rename that modality")
    owners: dict[str, str | None] = {}
    for owner, value, label in [
        *((m, v, f"prefixes[{m!r}]") for m, v in prefixes.items()),
        *([(None, shared, "shared")] if shared is not None else []),
    ]:
        for prefix in _prefix_list(value, label):
            if prefix in owners and owners[prefix] != owner:
                raise ValueError(
                    f"prefix {prefix!r} is given to both {owners[prefix]!r} and {owner!r}"
                )
            owners[prefix] = owner
    members: dict[str | None, list[nn.Parameter]] = {m: [] for m in prefixes}
    members[None] = []
    for name, param in model.named_parameters():
        matches = [prefix for prefix in owners if name.startswith(prefix)]
        if matches:
            members[owners[max(matches, key=len)]].append(param)
    for modality in prefixes:
        if not members[modality]:
            names = [n for n, _ in model.named_parameters()][:5]
            raise ValueError(
                f"modality {modality!r} matched no parameter with prefixes "
                f"{_prefix_list(prefixes[modality], 'prefixes')}; names look like {names}"
            )
    groups = [_group(members[m], m, m, group_options) for m in prefixes]
    if members[None]:
        groups.append(_group(members[None], None, SHARED, group_options))
    _check_covered(model, groups)
    if weight_decay is not None:
        groups = split_weight_decay(groups, model, weight_decay, no_decay=no_decay)
    return groups


def modality_param_groups(
    model: JointFusionModel,
    *,
    head_follows_encoder: bool = True,
    weight_decay: float | None = None,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Groups for a :class:`JointFusionModel`: one per modality, one shared (the rest).

    ``head_follows_encoder=True`` (default) puts modality ``m``'s auxiliary head in ``m``'s group,
    so MILES slows the whole unimodal branch; ``False`` keeps heads at the base rate. Everything
    else (the fusion module with its fused head) is shared. With ``weight_decay``, each group is
    split by :func:`split_weight_decay`.
    """
    per_modality: dict[str, list[nn.Module]] = {}
    for name in model.modalities:
        per_modality[name] = [model.encoders[name]]
        if head_follows_encoder:
            per_modality[name].append(model.heads[name])
    taken = {id(p) for modules in per_modality.values() for m in modules for p in m.parameters()}
    # The fusion module first, then the heads that stay shared, then anything else: the order of
    # earlier versions, so their optimizer checkpoints still load.
    first: list[nn.Module] = [model.fusion]
    if not head_follows_encoder:
        first += [model.heads[name] for name in model.modalities]
    rest: dict[int, nn.Parameter] = {}
    for p in [*(p for m in first for p in m.parameters()), *model.parameters()]:
        if id(p) not in taken:
            rest.setdefault(id(p), p)
    groups = param_groups_by_modality(
        per_modality, list(rest.values()) or None, model=model, **group_options
    )
    if weight_decay is not None:
        groups = split_weight_decay(groups, model, weight_decay)
    return groups


def default_no_decay(name: str, param: nn.Parameter, module: nn.Module) -> bool:
    """The usual Hugging Face rule: biases and normalization-layer weights get no weight decay."""
    del param
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
    is_norm = isinstance(module, norm_types) or "Norm" in type(module).__name__
    return name.rsplit(".", 1)[-1] == "bias" or is_norm


def split_weight_decay(
    groups: Sequence[Mapping[str, Any]],
    model: nn.Module,
    weight_decay: float,
    *,
    no_decay: NoDecay | None = None,
) -> list[dict[str, Any]]:
    """Split every group into ``weight_decay`` and ``0.0`` parts, each keeping its modality.

    ``no_decay(name, parameter, owning module)`` picks the parameters without decay
    (:func:`default_no_decay` if None). The decayed part keeps the group's name; the other is named
    ``"<name>/no_decay"``. Empty parts are dropped. Parameters must belong to ``model`` (for their
    names).
    """
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)):
        raise TypeError(f"weight_decay must be a number, got {weight_decay!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    rule = default_no_decay if no_decay is None else no_decay
    where: dict[int, tuple[str, nn.Module]] = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            where.setdefault(id(param), (full, module))
    out: list[dict[str, Any]] = []
    for group in groups:
        decay: list[nn.Parameter] = []
        plain: list[nn.Parameter] = []
        for param in group["params"]:
            if id(param) not in where:
                raise ValueError(
                    f"a parameter of shape {tuple(param.shape)} in group {group.get('name')!r} "
                    f"does not belong to the {type(model).__name__} given"
                )
            name, module = where[id(param)]
            (plain if rule(name, param, module) else decay).append(param)
        label = str(group.get("name", group.get("modality") or SHARED))
        options = {k: v for k, v in group.items() if k not in ("params", "name", "weight_decay")}
        if decay:
            out.append({**options, "params": decay, "name": label, "weight_decay": weight_decay})
        if plain:
            out.append(
                {**options, "params": plain, "name": f"{label}/no_decay", "weight_decay": 0.0}
            )
    return out
