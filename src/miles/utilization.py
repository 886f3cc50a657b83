"""Conditional utilization rates and the MILES decision rule, as plain functions.

This module is the functional core of MILES (Guerra-Manzanares & Shamout, arXiv 2510.17394):
:class:`miles.scheduler.MILES` calls these functions, and they can be used on their own (e.g. to
log utilization without changing any learning rate). It depends on torch only; numpy scalars are
accepted by duck typing, never imported.

Conditional utilization of modality ``m`` (Eq. 4, generalized to N modalities)::

    u_m = (M(fused) - M(without m)) / M(fused)

``M(without m)`` has two estimators:

* ``unimodal`` ("heads"): the best metric among the *other* modalities' unimodal heads. A model
  deprived of ``m`` can at least do as well as its best remaining single modality, so the max is
  the natural (optimistic) stand-in for "fused without m". With two modalities this is exactly the
  paper's ``u_A = (M_AB - M_B) / M_AB``.
* ``without`` ("ablation"): the metric of the fused head with ``m``'s contribution removed
  (computed elsewhere), used as is.

Which way is better, and on what scale (``mode`` and ``scale``, on every function here and on
:class:`miles.scheduler.MILES`):

* ``mode="max"`` (default): higher is better (accuracy, F1, AUC). ``u`` is computed on the metrics
  as given. ``scale`` is their full scale: ``1`` (default: fractions) or ``100`` (percentages),
  and every metric must lie in ``[0, scale]``. ``u`` does not depend on the unit, but it is only
  meaningful when every metric is in the *same* unit, so a value above ``scale`` is refused: that
  catches a fused accuracy in percent next to heads in fractions (or a loss passed as a score).
  ``scale=math.inf`` accepts any non-negative score.
* ``mode="min"``: lower is better (a validation loss). ``u`` is computed on the score
  ``s = 1 / loss``, so with heads ``u_m = 1 - L(fused) / L(without m)``: the share of the loss of
  the model without ``m`` that adding ``m`` removes. The "best other head" is then the one with
  the lowest loss. Losses are unbounded by default (``scale=None``); a loss of 0 is refused.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

from miles.validation import check_choice, check_number, check_str

__all__ = [
    "MODES",
    "REASONS",
    "as_metric",
    "conditional_utilization",
    "decide",
    "imbalance",
]

#: The possible reasons of a decision, see :func:`decide`.
REASONS: tuple[str, str, str] = ("balanced", "all-negative", "slowed")

#: ``"max"``: higher is better (accuracy, F1); ``"min"``: lower is better (a loss).
MODES: tuple[str, str] = ("max", "min")


def _is_bool_like(value: Any) -> bool:
    """True for Python bools, numpy bools and bool tensors: a bool is never a metric."""
    if isinstance(value, bool):
        return True
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return False
    if isinstance(dtype, torch.dtype):
        return dtype == torch.bool
    return getattr(dtype, "kind", None) == "b"


def as_metric(value: Any, name: str) -> float:
    """Validate one metric value and return it as a Python float.

    Accepts int, float, numpy scalars (anything ``numbers.Real`` or 0-d with ``.item()``) and 0-d
    torch tensors, because metrics come from many libraries. Rejects bools (a flag passed by mistake
    would otherwise read as 0 or 1), strings, None and non-scalar tensors with ``TypeError``, and
    NaN, inf and negative values with ``ValueError``: a scheduler must never act on a broken metric.
    """
    if _is_bool_like(value):
        raise TypeError(f"metric {name!r} must be a real number, got a bool: {value!r}")
    result: float
    if isinstance(value, torch.Tensor):
        if value.ndim != 0:
            raise TypeError(
                f"metric {name!r} must be a 0-d tensor, got shape {tuple(value.shape)}: {value!r}"
            )
        if value.is_complex():
            raise TypeError(f"metric {name!r} must be real, got a complex tensor: {value!r}")
        result = float(value.item())
    elif isinstance(value, numbers.Real):
        result = float(value)
    elif (
        not isinstance(value, (str, bytes))
        and callable(getattr(value, "item", None))
        and getattr(value, "ndim", None) == 0
    ):
        item = value.item()
        if isinstance(item, bool) or not isinstance(item, numbers.Real):
            raise TypeError(
                f"metric {name!r} must be a real number, got {type(value).__name__}: {value!r}"
            )
        result = float(item)
    else:
        raise TypeError(
            f"metric {name!r} must be a real number (int, float, numpy scalar or 0-d tensor), "
            f"got {type(value).__name__}: {value!r}"
        )
    if math.isnan(result):
        raise ValueError(f"metric {name!r} is NaN: {value!r}")
    if math.isinf(result):
        raise ValueError(f"metric {name!r} is infinite: {value!r}")
    if result < 0:
        raise ValueError(f"metric {name!r} must be >= 0, got {value!r}")
    return result


def _as_metric_mapping(values: Any, kind: str) -> dict[str, float]:
    """Validate a ``{modality: metric}`` mapping, keeping its order."""
    if not isinstance(values, Mapping):
        raise TypeError(
            f"{kind} must be a mapping {{modality: metric}}, got {type(values).__name__}"
        )
    out: dict[str, float] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise TypeError(f"{kind} keys must be modality names (str), got {key!r}")
        out[key] = as_metric(value, f"{kind}[{key!r}]")
    if len(out) < 2:
        raise ValueError(f"{kind} needs at least two modalities, got {list(out)}")
    return out


def check_mode(mode: Any) -> str:
    """Validate ``mode``: ``"max"`` (higher is better) or ``"min"`` (lower is better, a loss)."""
    return check_choice("mode", check_str("mode", mode), MODES)


def check_scale(scale: Any, mode: str = "max") -> float:
    """Resolve ``scale``, the largest value a metric may take (``math.inf``: no bound).

    ``None`` means the default of the mode: ``1`` for scores (``"max"``: fractions), no bound for
    losses (``"min"``). Otherwise a real number > 0 (``100`` for percentages, ``math.inf``).
    """
    if scale is None:
        return 1.0 if check_mode(mode) == "max" else math.inf
    return check_number("scale", scale, low=0, low_open=True, finite=False)


def _check_in_scale(values: Mapping[str, float], scale: float, mode: str) -> None:
    """Refuse a metric above the declared scale, with the likely cause in the message.

    ``values`` are keyed by the name to show, e.g. ``"'fused'"`` or ``"unimodal['audio']"``.
    """
    for name, value in values.items():
        if value <= scale:
            continue
        hint = (
            "if every metric is a percentage, pass scale=100; if this is a loss (lower is "
            "better), pass mode='min'; if some metrics are percentages and others fractions, "
            "convert them to one unit first: u is only meaningful when they share one"
            if mode == "max"
            else "every loss must be in [0, scale]"
        )
        raise ValueError(f"metric {name} = {value!r} exceeds scale={scale!r}: {hint}")


def _scores(values: Mapping[str, float], mode: str) -> dict[str, float]:
    """The higher-is-better scores u is computed on: the metrics, or ``1 / loss`` for "min"."""
    if mode == "max":
        return dict(values)
    for name, value in values.items():
        if value == 0 or not math.isfinite(1.0 / value):
            raise ValueError(
                f"loss {name!r} is {value!r}: with mode='min', u is computed on 1 / loss, which "
                "is undefined at 0 (or overflows this close to it)"
            )
    return {name: 1.0 / value for name, value in values.items()}


def conditional_utilization(
    fused: Any,
    unimodal: Mapping[str, Any] | None = None,
    *,
    without: Mapping[str, Any] | None = None,
    mode: str = "max",
    scale: float | None = None,
) -> dict[str, float]:
    """Return ``{modality: u_m}`` with ``u_m = (M(fused) - M(without m)) / M(fused)``.

    Give exactly one estimator of ``M(without m)``: ``unimodal`` (the unimodal heads' metrics; the
    best *other* head stands in for "fused without m") or ``without`` (the fused head's metric with
    ``m`` ablated). The result keeps the order of the given mapping. ``mode`` and ``scale`` say
    which way is better and the metrics' unit (see the module docstring): with ``mode="min"`` the
    rate is computed on ``1 / loss``. ``M(fused)`` must be > 0: the rate is a ratio to it, and a
    fused metric so close to 0 that ``u`` overflows is refused with a clear error.
    """
    if (unimodal is None) == (without is None):
        raise ValueError(
            "give exactly one of unimodal= (unimodal head metrics) or without= (ablated fused "
            "metrics)"
        )
    mode = check_mode(mode)
    bound = check_scale(scale, mode)
    fused_value = as_metric(fused, "fused")
    kind, given = ("unimodal", unimodal) if unimodal is not None else ("without", without)
    values = _as_metric_mapping(given, kind)
    named = {f"{kind}[{name!r}]": value for name, value in values.items()}
    _check_in_scale({"'fused'": fused_value, **named}, bound, mode)
    if mode == "max" and fused_value == 0:
        raise ValueError("fused metric is 0: utilization undefined")
    fused_score = _scores({"fused": fused_value}, mode)["fused"]
    scores = _scores(values, mode)
    if kind == "unimodal":
        without_m = {
            name: max(value for other, value in scores.items() if other != name) for name in scores
        }
    else:
        without_m = scores
    u = {name: (fused_score - value) / fused_score for name, value in without_m.items()}
    rates = list(u.values())
    if not all(math.isfinite(r) for r in rates) or not math.isfinite(max(rates) - min(rates)):
        raise ValueError(
            f"fused metric {fused_value!r} is too close to 0: u = (M(fused) - M(without m)) / "
            f"M(fused) overflows ({kind}: {values}). A fused metric this small means the model "
            "predicts almost nothing yet; skip this epoch's decision (MILES.skip())"
        )
    return u


def imbalance(u: Mapping[str, float]) -> float:
    """Return ``max(u) - min(u)``: the paper's ``|u_A - u_B|`` (Eq. 5) for any N >= 2."""
    values = list(_checked_rates(u).values())
    return max(values) - min(values)


def _checked_rates(u: Mapping[str, Any]) -> dict[str, float]:
    """Utilization rates must be finite reals (they can be negative), at least two of them."""
    if not isinstance(u, Mapping):
        raise TypeError(f"u must be a mapping {{modality: rate}}, got {type(u).__name__}")
    if len(u) < 2:
        raise ValueError(f"need at least two modalities, got {list(u)}")
    rates: dict[str, float] = {}
    for name, value in u.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"u[{name!r}] must be a real number, got {type(value).__name__}")
        if not math.isfinite(float(value)):
            raise ValueError(f"u[{name!r}] must be finite, got {value!r}")
        rates[name] = float(value)
    return rates


def _check_tau(tau: Any) -> float:
    """Validate the imbalance threshold: a real number >= 0 (``inf``: never act; NaN rejected)."""
    return check_number("tau", tau, low=0, finite=False)


def decide(u: Mapping[str, float], tau: float) -> tuple[str | None, str]:
    """Apply Algorithm 1's rule to utilization rates ``u``; return ``(slowed, reason)``.

    * ``imbalance(u) <= tau`` -> ``(None, "balanced")``: the modalities are used evenly enough;
    * every ``u_m < 0`` -> ``(None, "all-negative")``: every single head beats the fused one
      (typical of early epochs), so no modality can be blamed yet;
    * otherwise -> ``(m, "slowed")`` for the modality with the largest ``u_m``, the one the fused
      prediction leans on most. Ties go to the first modality in the order of ``u``.

    With two modalities this is exactly the paper's four branches (see the tests for the proof by
    comparison).
    """
    threshold = _check_tau(tau)
    u = _checked_rates(u)
    delta = imbalance(u)
    if delta <= threshold:
        return None, "balanced"
    if all(value < 0 for value in u.values()):
        return None, "all-negative"
    slowed = None
    best = -math.inf
    for name, value in u.items():
        if value > best:
            slowed, best = name, value
    return slowed, "slowed"
