"""Tests of the functional API: metric validation, utilization rates, imbalance and the rule."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from miles.utilization import as_metric, conditional_utilization, decide, imbalance


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0.0),
        (1, 1.0),
        (0.75, 0.75),
        (75.1, 75.1),
        (np.float64(0.5), 0.5),
        (np.float32(0.25), 0.25),
        (np.int64(3), 3.0),
        (np.array(0.5), 0.5),
        (torch.tensor(0.5), 0.5),
        (torch.tensor(0.25, dtype=torch.float64), 0.25),
        (torch.tensor(2), 2.0),
        (torch.tensor(0.5, requires_grad=True), 0.5),
    ],
)
def test_as_metric_accepts_real_scalars(value: Any, expected: float) -> None:
    result = as_metric(value, "acc")
    assert type(result) is float
    assert result == expected


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        np.bool_(True),
        torch.tensor(True),
        "0.5",
        None,
        [0.5],
        torch.tensor([0.5]),
        torch.tensor([[0.5]]),
        np.array([0.5]),
        torch.tensor(0.5 + 0.5j),
        complex(0.5, 0),
        object(),
    ],
)
def test_as_metric_rejects_non_real_with_type_error(value: Any) -> None:
    with pytest.raises(TypeError, match="my_metric"):
        as_metric(value, "my_metric")


@pytest.mark.parametrize(
    ("value", "word"),
    [
        (math.nan, "NaN"),
        (np.float64("nan"), "NaN"),
        (torch.tensor(float("nan")), "NaN"),
        (math.inf, "infinite"),
        (-math.inf, "infinite"),
        (torch.tensor(float("inf")), "infinite"),
        (-0.1, ">= 0"),
        (-1, ">= 0"),
        (np.float32(-0.5), ">= 0"),
        (torch.tensor(-0.5), ">= 0"),
    ],
)
def test_as_metric_rejects_bad_values_with_value_error(value: Any, word: str) -> None:
    with pytest.raises(ValueError, match="my_metric") as info:
        as_metric(value, "my_metric")
    assert word in str(info.value)


def test_as_metric_message_names_the_value() -> None:
    with pytest.raises(ValueError, match=r"-0\.125"):
        as_metric(-0.125, "fused")
    with pytest.raises(TypeError, match="'oops'"):
        as_metric("oops", "fused")


def test_conditional_utilization_two_heads_is_the_paper_formula() -> None:
    u = conditional_utilization(0.8, {"audio": 0.7, "image": 0.3})
    assert u == {"audio": (0.8 - 0.3) / 0.8, "image": (0.8 - 0.7) / 0.8}
    assert list(u) == ["audio", "image"]


def test_conditional_utilization_three_heads_uses_best_other_head() -> None:
    u = conditional_utilization(1.0, {"a": 0.75, "b": 0.5, "c": 0.25})
    # u_a = 1 - max(b, c) = 0.5; u_b = 1 - max(a, c) = 0.25; u_c = 1 - max(a, b) = 0.25
    assert u == {"a": 0.5, "b": 0.25, "c": 0.25}


def test_conditional_utilization_ablation() -> None:
    u = conditional_utilization(0.8, without={"a": 0.4, "b": 0.7, "c": 0.8})
    assert u == pytest.approx({"a": 0.5, "b": 0.125, "c": 0.0}, rel=1e-12, abs=1e-15)


def test_conditional_utilization_keeps_order_and_accepts_mixed_types() -> None:
    u = conditional_utilization(
        torch.tensor(1.0), {"z": np.float64(0.5), "a": 1, "m": torch.tensor(0.25)}
    )
    assert list(u) == ["z", "a", "m"]
    assert u == {"z": 0.0, "a": 0.5, "m": 0.0}


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"fused": 0.8}, ValueError, "exactly one"),
        (
            {"fused": 0.8, "unimodal": {"a": 0.1, "b": 0.2}, "without": {"a": 0.1, "b": 0.2}},
            ValueError,
            "exactly one",
        ),
        ({"fused": 0.0, "unimodal": {"a": 0.1, "b": 0.2}}, ValueError, "fused metric is 0"),
        ({"fused": 0, "without": {"a": 0.1, "b": 0.2}}, ValueError, "fused metric is 0"),
        ({"fused": 0.8, "unimodal": {"a": 0.1}}, ValueError, "at least two"),
        ({"fused": 0.8, "without": {}}, ValueError, "at least two"),
        ({"fused": 0.8, "unimodal": [0.1, 0.2]}, TypeError, "mapping"),
        ({"fused": 0.8, "unimodal": {1: 0.1, "b": 0.2}}, TypeError, "str"),
        ({"fused": math.nan, "unimodal": {"a": 0.1, "b": 0.2}}, ValueError, "fused"),
        ({"fused": 0.8, "unimodal": {"a": -0.1, "b": 0.2}}, ValueError, "'a'"),
        ({"fused": 0.8, "without": {"a": 0.1, "b": math.inf}}, ValueError, "'b'"),
        ({"fused": 0.8, "without": {"a": True, "b": 0.2}}, TypeError, "'a'"),
        ({"fused": None, "without": {"a": 0.1, "b": 0.2}}, TypeError, "fused"),
    ],
)
def test_conditional_utilization_rejects(
    kwargs: dict[str, Any], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        conditional_utilization(**kwargs)


def test_imbalance() -> None:
    assert imbalance({"a": 0.5, "b": -0.25}) == 0.75
    assert imbalance({"a": 0.5, "b": 0.25, "c": 0.0}) == 0.5
    # Eq. 5 can exceed 1 when the fused metric is small (the paper claims [0, 1]).
    assert imbalance(conditional_utilization(0.1, {"a": 0.5, "b": 0.0})) > 1
    with pytest.raises(ValueError, match="at least two"):
        imbalance({"a": 0.5})


@pytest.mark.parametrize(
    ("u", "tau", "expected"),
    [
        ({"a": 0.375, "b": 0.5}, 0.2, (None, "balanced")),
        ({"a": 0.25, "b": 0.5}, 0.25, (None, "balanced")),  # delta == tau is balanced
        ({"a": -1.0, "b": -0.5}, 0.2, (None, "all-negative")),
        ({"a": -0.1, "b": -0.2}, 0.2, (None, "balanced")),  # both rules hold: balanced first
        ({"a": 0.5, "b": -0.25}, 0.2, ("a", "slowed")),
        ({"a": -0.25, "b": 0.5}, 0.2, ("b", "slowed")),
        ({"a": 0.0, "b": -0.5}, 0.2, ("a", "slowed")),
        ({"a": 0.0, "b": 0.5}, 0.2, ("b", "slowed")),
        ({"a": 0.0, "b": 0.0}, 0.0, (None, "balanced")),
        ({"a": 0.5, "b": 0.5, "c": 0.0}, 0.2, ("a", "slowed")),  # tie -> first
        ({"b": 0.5, "a": 0.5, "c": 0.0}, 0.2, ("b", "slowed")),
        ({"a": 0.0, "b": 0.5, "c": 0.5}, 0.2, ("b", "slowed")),
    ],
)
def test_decide(u: dict[str, float], tau: float, expected: tuple[str | None, str]) -> None:
    assert decide(u, tau) == expected


@pytest.mark.parametrize(
    ("tau", "error"),
    [(-0.1, ValueError), (math.nan, ValueError), (True, TypeError), ("0.2", TypeError)],
)
def test_decide_rejects_bad_tau(tau: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="tau"):
        decide({"a": 0.5, "b": 0.0}, tau)


def test_utilization_module_imports_torch_only() -> None:
    import miles.utilization as mod

    source = Path(mod.__file__).read_text(encoding="utf-8")
    assert "import numpy" not in source
    assert "torchmetrics" not in source


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_decide_and_imbalance_reject_non_finite_rates(bad: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        decide({"a": bad, "b": 0.5}, 0.2)
    with pytest.raises(ValueError, match="finite"):
        imbalance({"a": 0.1, "b": bad})


def test_decide_rejects_non_numeric_rates() -> None:
    with pytest.raises(TypeError, match="real number"):
        decide({"a": "0.3", "b": 0.5}, 0.2)  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="real number"):
        imbalance({"a": True, "b": 0.5})
