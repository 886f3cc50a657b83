"""One set of argument validators, so every class checks its inputs the same way.

Convention: a value of the wrong *type* raises ``TypeError``, a value of the right type outside what
is allowed raises ``ValueError``. Every message names the parameter, shows the bad value and says
what was expected (``"patience must be an int >= 1, got 0"``). Each validator returns the value in
its canonical type (``float`` for numbers, ``int`` for NumPy integers), so callers store what they
return. ``bool`` is never accepted as a number: ``True`` is almost always a mistaken argument.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

__all__ = [
    "check_bool",
    "check_choice",
    "check_finite",
    "check_fraction",
    "check_int",
    "check_mapping",
    "check_non_negative",
    "check_non_negative_int",
    "check_number",
    "check_positive",
    "check_positive_int",
    "check_str",
]

T = TypeVar("T")


def _type_error(name: str, expected: str, value: Any) -> TypeError:
    return TypeError(f"{name} must be {expected}, got {type(value).__name__}: {value!r}")


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool`` (``0``/``1``/``"yes"`` are refused: flags must be explicit)."""
    if not isinstance(value, bool):
        raise _type_error(name, "a bool", value)
    return value


def check_int(
    name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """An integer (Python or NumPy, never ``bool``) in ``[minimum, maximum]``."""
    bounds = _bounds(minimum, maximum)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _type_error(name, f"an int{bounds}", value)
    number = int(value)
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise ValueError(f"{name} must be an int{bounds}, got {value!r}")
    return number


def _bounds(
    low: float | None, high: float | None, low_open: bool = False, high_open: bool = False
) -> str:
    """`` in [low, high)``, `` >= low``, `` < high``... or nothing, for error messages."""
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


def check_positive_int(name: str, value: Any) -> int:
    """An int ``>= 1`` (counts: epochs, batch sizes, patience)."""
    return check_int(name, value, minimum=1)


def check_non_negative_int(name: str, value: Any) -> int:
    """An int ``>= 0`` (seeds, offsets)."""
    return check_int(name, value, minimum=0)


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
) -> float:
    """A real number (not ``bool``, not NaN) within the given bounds, as ``float``.

    ``low``/``high`` bound the value, inclusive unless ``low_open``/``high_open``;
    ``finite=False`` admits ``+-inf`` (when the bounds do). NaN is always refused: it compares
    false with every bound.
    """
    kind = "a finite number" if finite else "a number"
    expected = kind + _bounds(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _type_error(name, expected, value)
    number = float(value)
    if (
        math.isnan(number)
        or (finite and math.isinf(number))
        or (low is not None and (number <= low if low_open else number < low))
        or (high is not None and (number >= high if high_open else number > high))
    ):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return number


def check_finite(name: str, value: Any) -> float:
    """Any finite real number."""
    return check_number(name, value)


def check_positive(name: str, value: Any) -> float:
    """A finite number ``> 0`` (learning rates, epsilons)."""
    return check_number(name, value, low=0, low_open=True)


def check_non_negative(name: str, value: Any) -> float:
    """A finite number ``>= 0`` (thresholds, weights, strengths)."""
    return check_number(name, value, low=0)


def check_fraction(name: str, value: Any, *, zero: bool = True, one: bool = False) -> float:
    """A share of a whole, in ``[0, 1)`` by default; ``zero``/``one``: are 0 and 1 allowed."""
    return check_number(name, value, low=0, high=1, low_open=not zero, high_open=not one)


def check_choice(name: str, value: Any, choices: Collection[T]) -> T:
    """``value`` if it is one of ``choices`` (a closed set of names: a wrong one is a bad value)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_str(name: str, value: Any, *, allow_empty: bool = False) -> str:
    """A string, non-empty unless ``allow_empty``."""
    if not isinstance(value, str):
        raise _type_error(name, "a str", value)
    if not value and not allow_empty:
        raise ValueError(f"{name} must be a non-empty str, got {value!r}")
    return value


def check_mapping(
    name: str,
    value: Any,
    check_value: Callable[[str, Any], T],
    *,
    allow_empty: bool = False,
) -> dict[str, T]:
    """``{non-empty str: checked value}``; each value is checked as ``name[key]``.

    ``check_value(label, v)`` is one of the validators above (or any function with that shape), so
    ``check_mapping("unimodal_lrs", lrs, check_positive)`` reports ``unimodal_lrs['audio']``.
    """
    if not isinstance(value, Mapping):
        raise _type_error(name, "a mapping", value)
    if not value and not allow_empty:
        raise ValueError(f"{name} must be a non-empty mapping, got {value!r}")
    out: dict[str, T] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise _type_error(f"{name} keys", "str", key)
        if not key:
            raise ValueError(f"{name} keys must be non-empty strings, got {key!r}")
        out[key] = check_value(f"{name}[{key!r}]", item)
    return out
