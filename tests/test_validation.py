"""The shared argument validators: one table of accepted, wrong-type and wrong-value cases each."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from miles import validation as v

#: (validator, accepted input, what it returns)
ACCEPTED: list[tuple[Callable[[str, Any], Any], Any, Any]] = [
    (v.check_bool, True, True),
    (v.check_bool, False, False),
    (v.check_int, -3, -3),
    (v.check_int, np.int64(7), 7),
    (v.check_positive_int, 1, 1),
    (v.check_non_negative_int, 0, 0),
    (v.check_finite, -2, -2.0),
    (v.check_finite, np.float32(0.5), 0.5),
    (v.check_positive, 1e-8, 1e-8),
    (v.check_non_negative, 0, 0.0),
    (v.check_fraction, 0.0, 0.0),
    (v.check_fraction, 0.999, 0.999),
    (v.check_str, "audio", "audio"),
]

#: (validator, bad type, words the message must contain)
WRONG_TYPE: list[tuple[Callable[[str, Any], Any], Any, str]] = [
    (v.check_bool, 1, "must be a bool, got int: 1"),
    (v.check_bool, "yes", "must be a bool, got str: 'yes'"),
    (v.check_int, 1.0, "must be an int, got float: 1.0"),
    (v.check_int, True, "must be an int, got bool"),
    (v.check_positive_int, "3", "must be an int >= 1, got str: '3'"),
    (v.check_non_negative_int, None, "must be an int >= 0, got NoneType"),
    (v.check_finite, "1e-3", "must be a finite number, got str: '1e-3'"),
    (v.check_positive, False, "must be a finite number > 0, got bool"),
    (v.check_non_negative, [1], "must be a finite number >= 0, got list"),
    (v.check_fraction, None, "must be a finite number in [0, 1), got NoneType"),
    (v.check_str, 3, "must be a str, got int: 3"),
]

#: (validator, bad value, words the message must contain)
WRONG_VALUE: list[tuple[Callable[[str, Any], Any], Any, str]] = [
    (v.check_positive_int, 0, "must be an int >= 1, got 0"),
    (v.check_non_negative_int, -1, "must be an int >= 0, got -1"),
    (v.check_finite, math.nan, "must be a finite number, got nan"),
    (v.check_finite, math.inf, "must be a finite number, got inf"),
    (v.check_positive, 0.0, "must be a finite number > 0, got 0.0"),
    (v.check_positive, -math.inf, "must be a finite number > 0, got -inf"),
    (v.check_non_negative, -1e-9, "must be a finite number >= 0, got -1e-09"),
    (v.check_fraction, 1.0, "must be a finite number in [0, 1), got 1.0"),
    (v.check_fraction, -0.1, "in [0, 1), got -0.1"),
    (v.check_str, "", "must be a non-empty str, got ''"),
]


def _id(case: tuple[Any, ...]) -> str:
    return f"{case[0].__name__}-{case[1]!r}"


@pytest.mark.parametrize("case", ACCEPTED, ids=_id)
def test_accepted_values_come_back_in_their_canonical_type(case: tuple[Any, ...]) -> None:
    check, value, expected = case
    out = check("x", value)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize("case", WRONG_TYPE, ids=_id)
def test_a_wrong_type_is_a_type_error_naming_parameter_and_value(case: tuple[Any, ...]) -> None:
    check, value, words = case
    with pytest.raises(TypeError) as info:
        check("param", value)
    assert str(info.value).startswith("param ") and words in str(info.value)


@pytest.mark.parametrize("case", WRONG_VALUE, ids=_id)
def test_a_wrong_value_is_a_value_error_naming_parameter_and_value(case: tuple[Any, ...]) -> None:
    check, value, words = case
    with pytest.raises(ValueError) as info:
        check("param", value)
    assert str(info.value).startswith("param ") and words in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "good", "bad", "words"),
    [
        ({"minimum": 2, "maximum": 4}, 4, 5, "an int in [2, 4], got 5"),
        ({"maximum": 4}, -10, 5, "an int <= 4, got 5"),
    ],
)
def test_int_bounds(kwargs: dict[str, Any], good: int, bad: int, words: str) -> None:
    assert v.check_int("n", good, **kwargs) == good
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        v.check_int("n", bad, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "good", "bad", "words"),
    [
        ({"zero": False}, 0.5, 0.0, "in (0, 1), got 0.0"),
        ({"one": True}, 1.0, 1.5, "in [0, 1], got 1.5"),
    ],
)
def test_fraction_ends(kwargs: dict[str, Any], good: float, bad: float, words: str) -> None:
    assert v.check_fraction("f", good, **kwargs) == good
    with pytest.raises(ValueError) as info:
        v.check_fraction("f", bad, **kwargs)
    assert words in str(info.value)


def test_number_bounds_and_infinity() -> None:
    assert v.check_number("x", math.inf, low=0, finite=False) == math.inf
    with pytest.raises(ValueError, match="a number <= 2, got nan"):
        v.check_number("x", math.nan, high=2, finite=False)  # NaN never passes
    with pytest.raises(ValueError, match=r"a finite number < 2, got 2"):
        v.check_number("x", 2, high=2, high_open=True)


def test_choice() -> None:
    assert v.check_choice("mode", "b", ("a", "b")) == "b"
    with pytest.raises(ValueError, match=r"mode must be one of \['a', 'b'\], got 'c'"):
        v.check_choice("mode", "c", ("a", "b"))


def test_mapping_checks_keys_and_each_value_by_name() -> None:
    assert v.check_mapping("lrs", {"a": 1, "b": 0.5}, v.check_positive) == {"a": 1.0, "b": 0.5}
    assert v.check_mapping("lrs", {}, v.check_positive, allow_empty=True) == {}
    with pytest.raises(TypeError, match="lrs must be a mapping, got list"):
        v.check_mapping("lrs", [1], v.check_positive)
    with pytest.raises(ValueError, match=r"lrs must be a non-empty mapping, got \{\}"):
        v.check_mapping("lrs", {}, v.check_positive)
    with pytest.raises(TypeError, match="lrs keys must be str, got int: 1"):
        v.check_mapping("lrs", {1: 1.0}, v.check_positive)
    with pytest.raises(ValueError, match="lrs keys must be non-empty strings"):
        v.check_mapping("lrs", {"": 1.0}, v.check_positive)
    with pytest.raises(ValueError, match=r"lrs\['b'\] must be a finite number > 0, got 0"):
        v.check_mapping("lrs", {"a": 1.0, "b": 0}, v.check_positive)
