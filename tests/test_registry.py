"""The one registry implementation behind strategies, datasets, preparers and fusions."""

from __future__ import annotations

import pytest

from miles.registry import Registry


def test_register_get_and_list() -> None:
    things: Registry[int] = Registry("thing")
    assert things.register("b")(2) == 2  # the decorator returns its target unchanged
    things.register("a")(1)
    assert things.names() == ["a", "b"] and "a" in things and "c" not in things
    assert things.get("b") == 2


def test_errors_name_the_kind_and_what_exists() -> None:
    things: Registry[int] = Registry("thing")
    things.register("a")(1)
    with pytest.raises(ValueError, match=r"thing 'a' is already registered \(by 1\)"):
        things.register("a")(3)
    assert things.get("a") == 1  # the first registration stays
    with pytest.raises(ValueError, match=r"unknown thing 'z'; available: \['a'\]"):
        things.get("z")
    with pytest.raises(TypeError, match="thing must be a str"):
        things.get(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="thing name must be a non-empty str"):
        things.register("")
