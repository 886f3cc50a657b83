"""Per-method optimizer settings in a study: ``ogm=authors,ogm-ge=sgd:weight_decay=1e-4``.

A comparison trains every method with the same budget, the MILES paper's protocol (Adam for all).
Some methods were published with another optimizer, and their mechanism depends on it: OGM's
authors use SGD with momentum (:data:`miles.strategies.ogm.AUTHORS_OPTIMIZER`). A study can give
such a method its own optimizer settings, per method, written as ``METHOD=SPEC``:

- ``authors``: the settings the strategy declares (``Strategy.authors_optimizer``);
- ``sgd`` or ``adam``: that optimizer with the study's momentum and weight decay;
- either, followed by ``:KEY=VALUE`` overrides of ``lr``, ``momentum`` or ``weight_decay``, e.g.
  ``sgd:momentum=0.9:weight_decay=1e-4``.

The resolved settings (a mapping of ``TrainerConfig`` fields per method) are what the study's
config records, so the settings check of a run folder sees them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from miles.studies.checks import number_pairs

__all__ = [
    "AUTHORS",
    "OVERRIDABLE",
    "check_method_optimizers",
    "describe_method_optimizers",
    "parse_method_optimizers",
    "resolve_method_optimizer",
]

AUTHORS = "authors"
#: the trainer settings a per-method entry may set besides the optimizer kind
OVERRIDABLE = ("lr", "momentum", "weight_decay")


def _check_settings(method: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    from miles.training.trainer import OPTIMIZERS

    if not isinstance(settings, Mapping):
        raise TypeError(f"optimizer settings of {method!r} must be a mapping, got {settings!r}")
    unknown = sorted(set(settings) - {"optimizer", *OVERRIDABLE})
    if unknown:
        raise ValueError(
            f"optimizer settings of {method!r} have unknown keys {unknown}; expected "
            f"'optimizer' and some of {list(OVERRIDABLE)}"
        )
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if key == "optimizer":
            if value not in OPTIMIZERS:
                raise ValueError(f"{method}: optimizer must be one of {OPTIMIZERS}, got {value!r}")
            out[key] = value
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value < 0 or (key == "lr" and value == 0):
            raise ValueError(
                f"{method}: {key} must be a finite number >= 0 (lr > 0), got {value!r}"
            )
        out[key] = float(value)
    return out


def resolve_method_optimizer(method: str, spec: str | Mapping[str, Any]) -> dict[str, Any]:
    """One method's settings from ``spec`` (a text as in the module docstring, or a mapping of
    ``TrainerConfig`` fields), checked."""
    from miles.strategies.registry import strategy_class

    if not isinstance(spec, str):
        return _check_settings(method, spec)
    kind, *overrides = [part.strip() for part in spec.split(":")]
    if kind == AUTHORS:
        declared = strategy_class(method).authors_optimizer
        if declared is None:
            raise ValueError(
                f"{method!r} declares no authors' optimizer; give one (e.g. {method}=sgd)"
            )
        settings: dict[str, Any] = dict(declared)
    else:
        strategy_class(method)  # an unknown method fails here, naming the known ones
        settings = {"optimizer": kind}
    settings.update(number_pairs(overrides, f"{method}: ':'"))
    return _check_settings(method, settings)


def parse_method_optimizers(text: str) -> dict[str, dict[str, Any]]:
    """``"ogm=authors,ogm-ge=sgd"`` -> ``{method: settings}`` (each resolved and checked)."""
    out: dict[str, dict[str, Any]] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        method, sep, spec = item.partition("=")
        if not sep or not method.strip() or not spec.strip():
            raise ValueError(f"expected METHOD=OPTIMIZER, got {item!r}")
        if method.strip() in out:
            raise ValueError(f"method {method.strip()!r} is given twice")
        out[method.strip()] = resolve_method_optimizer(method.strip(), spec.strip())
    return out


def check_method_optimizers(
    value: Any, allowed: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """A study's ``method_optimizers``: ``{method: spec or settings}`` -> resolved settings;
    ``allowed``: the study's methods (an entry for another method is an error, not ignored)."""
    if isinstance(value, str):
        value = parse_method_optimizers(value)
    if not isinstance(value, Mapping):
        raise TypeError(f"method_optimizers must be a mapping, got {type(value).__name__}")
    if allowed is not None:
        extra = sorted(set(map(str, value)) - set(allowed))
        if extra:
            raise ValueError(
                f"method_optimizers names {extra}, which this study does not train "
                f"(its methods: {allowed})"
            )
    return {str(m): resolve_method_optimizer(str(m), spec) for m, spec in value.items()}


def describe_method_optimizers(settings: Mapping[str, Mapping[str, Any]]) -> str:
    """``ogm: sgd, momentum 0.9, weight decay 0.0001`` per method, for a study's meta line."""
    parts = []
    for method, values in settings.items():
        text = ", ".join(
            f"{k.replace('_', ' ')} {v:g}" if k != "optimizer" else str(v)
            for k, v in values.items()
        )
        parts.append(f"{method}: {text}")
    return "; ".join(parts)
