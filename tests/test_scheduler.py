"""Tests of the MILES scheduler: Algorithm 1 branches with exact LRs, validation, state, N = 3."""

from __future__ import annotations

import io
import itertools
import math
import random
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch

from miles.scheduler import MILES, Decision

BASE = 0.1
MU = 0.5


def make_optimizer(
    modalities: Sequence[str | None] = ("A", "B", None, "A"),
    lrs: Sequence[float] | None = None,
) -> torch.optim.Optimizer:
    """One group per entry; None means a shared group (no "modality" key for the first one)."""
    groups: list[dict[str, Any]] = []
    for index, modality in enumerate(modalities):
        group: dict[str, Any] = {"params": [torch.nn.Parameter(torch.zeros(2))]}
        if modality is not None or index % 2:
            group["modality"] = modality
        if lrs is not None:
            group["lr"] = lrs[index]
        groups.append(group)
    return torch.optim.SGD(groups, lr=BASE)


def lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in optimizer.param_groups]


def expected(fa: float, fb: float) -> list[float]:
    """Exact LRs of the default groups [A, B, shared, A] for factors (fa, fb)."""
    return [BASE * fa, BASE * fb, BASE, BASE * fa]


# Metrics with fused = 1/4 so u_A = 1 - 4 M_B and u_B = 1 - 4 M_A: every value is in [0, 1] (the
# default scale) and, scaled by a power of two, rounds exactly as with fused = 1.
def heads(u_a: float, u_b: float) -> dict[str, Any]:
    return {"fused": 0.25, "unimodal": {"A": 0.25 * (1.0 - u_b), "B": 0.25 * (1.0 - u_a)}}


CASES = {
    "balanced": (heads(0.375, 0.5), None, "balanced"),
    "both-negative": (heads(-0.5, -1.0), None, "all-negative"),
    "A>0>B": (heads(0.5, -0.25), "A", "slowed"),
    "B>0>A": (heads(-0.25, 0.5), "B", "slowed"),
    "both-positive-A": (heads(0.75, 0.25), "A", "slowed"),
    "both-positive-B": (heads(0.25, 0.75), "B", "slowed"),
    "uA=0<uB": (heads(0.0, 0.5), "B", "slowed"),
    "uA=0>uB": (heads(0.0, -0.5), "A", "slowed"),
    "uB=0<uA": (heads(0.5, 0.0), "A", "slowed"),
    "uB=0>uA": (heads(-0.5, 0.0), "B", "slowed"),
    "both-zero": (heads(0.0, 0.0), None, "balanced"),
    "tie-positive": (heads(0.5, 0.5), None, "balanced"),
    "tie-negative": (heads(-0.5, -0.5), None, "balanced"),
    "delta-just-below-tau": (heads(0.25, 0.05), None, "balanced"),
}


@pytest.mark.parametrize("reset_other", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_each_branch_from_fresh_state(case: str, reset_other: bool) -> None:
    metrics, slowed, reason = CASES[case]
    opt = make_optimizer()
    sched = MILES(opt, tau=0.2, mu=MU, reset_other=reset_other)
    decision = sched.step(**metrics)
    assert decision is not None
    assert (decision.slowed, decision.reason) == (slowed, reason)
    fa = MU if slowed == "A" else 1.0
    fb = MU if slowed == "B" else 1.0
    assert lrs(opt) == expected(fa, fb)
    assert decision.lrs == expected(fa, fb)
    assert sched.get_last_lr() == expected(fa, fb)
    assert sched.factors == {"A": fa, "B": fb}
    assert decision.epoch == 1 == sched.last_epoch


def test_delta_equal_to_tau_is_balanced_exactly() -> None:
    opt = make_optimizer()
    sched = MILES(opt, tau=0.25, mu=MU)
    decision = sched.step(fused=1.0, unimodal={"A": 0.5, "B": 0.75})  # u = 0.25, 0.5
    assert decision is not None and decision.delta == 0.25
    assert decision.reason == "balanced"
    assert lrs(opt) == expected(1.0, 1.0)


@pytest.mark.parametrize("reset_other", [False, True])
@pytest.mark.parametrize(
    "case", ["balanced", "both-negative", "both-zero", "tie-positive", "tie-negative"]
)
def test_reset_branches_undo_a_previous_slow_down(case: str, reset_other: bool) -> None:
    opt = make_optimizer()
    sched = MILES(opt, mu=MU, reset_other=reset_other)
    sched.step(**CASES["A>0>B"][0])
    assert lrs(opt) == expected(MU, 1.0)
    sched.step(**CASES[case][0])
    assert lrs(opt) == expected(1.0, 1.0)
    assert sched.factors == {"A": 1.0, "B": 1.0}


def test_sequence_literal_mode_keeps_earlier_slow_down() -> None:
    opt = make_optimizer()
    sched = MILES(opt, tau=0.2, mu=MU, reset_other=False)
    steps = [
        ("A>0>B", expected(MU, 1.0)),
        ("both-positive-A", expected(MU, 1.0)),  # A again: not compounded
        ("B>0>A", expected(MU, MU)),  # literal: A stays at mu
        ("both-positive-B", expected(MU, MU)),
        ("uB=0<uA", expected(MU, MU)),
        ("balanced", expected(1.0, 1.0)),  # balanced resets all
        ("uA=0<uB", expected(1.0, MU)),
        ("both-negative", expected(1.0, 1.0)),
    ]
    for epoch, (case, want) in enumerate(steps, start=1):
        decision = sched.step(**CASES[case][0])
        assert decision is not None and decision.epoch == epoch
        assert lrs(opt) == want, case
    assert [d.slowed for d in sched.history] == ["A", "A", "B", "B", "A", None, "B", None]


def test_sequence_reset_mode_puts_the_other_back() -> None:
    opt = make_optimizer()
    sched = MILES(opt, tau=0.2, mu=MU, reset_other=True)
    steps = [
        ("A>0>B", expected(MU, 1.0)),
        ("B>0>A", expected(1.0, MU)),  # A back to base
        ("both-positive-A", expected(MU, 1.0)),
        ("both-positive-A", expected(MU, 1.0)),
        ("balanced", expected(1.0, 1.0)),
        ("uB=0>uA", expected(1.0, MU)),
    ]
    for case, want in steps:
        sched.step(**CASES[case][0])
        assert lrs(opt) == want, case
    assert sched.reset_other is True


def paper_algorithm_1(
    u_a: float, u_b: float, tau: float, mu: float, fa: float, fb: float, reset_other: bool
) -> tuple[float, float]:
    """The literal four branches of Algorithm 1, as an independent oracle (factors of alpha)."""
    if abs(u_a - u_b) <= tau or (u_a < 0 and u_b < 0):
        return 1.0, 1.0
    if u_a > 0 and u_b < 0:
        return mu, (1.0 if reset_other else fb)
    if u_a < 0 and u_b > 0:
        return (1.0 if reset_other else fa), mu
    if u_a < u_b:
        return (1.0 if reset_other else fa), mu
    return mu, (1.0 if reset_other else fb)


@pytest.mark.parametrize("reset_other", [False, True])
@pytest.mark.parametrize("tau", [0.0, 0.1, 0.25])
def test_two_modalities_equal_the_literal_algorithm_1(reset_other: bool, tau: float) -> None:
    grid = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]
    inputs = [(f, a, b) for f in grid[1:] for a in grid for b in grid]
    rng = random.Random(1234)
    inputs += [
        (rng.uniform(0.01, 1.0), rng.uniform(0.0, 1.0), rng.uniform(0.0, 1.0)) for _ in range(1000)
    ]
    rng.shuffle(inputs)  # random transitions between states, so persistence is exercised
    opt = make_optimizer()
    sched = MILES(opt, tau=tau, mu=0.3, reset_other=reset_other, scale=1.25)  # grid's full scale
    fa, fb = 1.0, 1.0
    for fused, m_a, m_b in inputs:
        u_a = (fused - m_b) / fused
        u_b = (fused - m_a) / fused
        fa, fb = paper_algorithm_1(u_a, u_b, tau, 0.3, fa, fb, reset_other)
        decision = sched.step(fused=fused, unimodal={"A": m_a, "B": m_b})
        assert decision is not None
        assert decision.u == {"A": u_a, "B": u_b}
        assert sched.factors == {"A": fa, "B": fb}, (fused, m_a, m_b)
        got = lrs(opt)
        want = expected(fa, fb)
        assert got[2] == BASE
        assert got == want  # exact: resets restore the base LR bit for bit, even with mu = 0.3


@pytest.mark.parametrize("reset_other", [False, True])
def test_mu_one_leaves_lrs_bit_for_bit(reset_other: bool) -> None:
    base = [0.1, 0.03, 0.007, 0.3]
    opt = make_optimizer(("A", "B", None, "A"), lrs=base)
    sched = MILES(opt, tau=0.0, mu=1.0, reset_other=reset_other)
    rng = random.Random(7)
    for _ in range(200):
        if rng.random() < 0.1:
            sched.skip()
        else:
            sched.step(fused=rng.uniform(0.01, 1), unimodal={"A": rng.random(), "B": rng.random()})
        assert lrs(opt) == base
        assert sched.get_last_lr() == base
    assert any(d.reason == "slowed" for d in sched.history)


# ---------------------------------------------------------------- construction and validation


def test_get_last_lr_after_construction() -> None:
    opt = make_optimizer(("A", "B", None, "A"), lrs=[0.1, 0.2, 0.3, 0.4])
    sched = MILES(opt)
    assert sched.get_last_lr() == [0.1, 0.2, 0.3, 0.4]
    assert sched.last_epoch == 0
    assert sched.modalities == ("A", "B")
    assert sched.factors == {"A": 1.0, "B": 1.0}
    assert sched.history == [] and sched.last_decision is None
    assert (sched.tau, sched.mu, sched.reset_other) == (0.2, 0.5, False)


def test_step_without_arguments_only_advances_and_warns_once() -> None:
    opt = make_optimizer()
    sched = MILES(opt)
    sched.step(**CASES["A>0>B"][0])
    with pytest.warns(UserWarning, match="without metrics") as caught:
        assert sched.step() is None
    message = str(caught[0].message)
    assert "miles.integrations.lightning.MILESCallback" in message
    assert "miles.integrations.hf.MILESCallback" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched.step()  # once per scheduler
        sched.skip()  # skip() never warns
    assert sched.last_epoch == 4
    assert sched.factors == {"A": MU, "B": 1.0}
    assert len(sched.history) == 1
    assert lrs(opt) == expected(MU, 1.0) == sched.get_last_lr()


def test_construction_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = MILES(make_optimizer())
    assert sched.last_epoch == 0


def test_skip_advances_without_deciding() -> None:
    opt = make_optimizer()
    sched = MILES(opt)
    sched.step(**CASES["A>0>B"][0])
    assert sched.skip() is None
    assert sched.last_epoch == 2
    assert sched.factors == {"A": MU, "B": 1.0}
    assert len(sched.history) == 1
    assert lrs(opt) == expected(MU, 1.0) == sched.get_last_lr()


def test_modalities_in_param_group_order() -> None:
    opt = make_optimizer(("image", None, "audio", "image", "text"))
    assert MILES(opt).modalities == ("image", "audio", "text")


def test_properties_are_copies() -> None:
    sched = MILES(make_optimizer())
    sched.step(**CASES["A>0>B"][0])
    sched.factors["A"] = 123.0
    sched.history.clear()
    assert sched.factors["A"] == MU
    assert len(sched.history) == 1
    assert sched.last_decision is sched.history[0]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"mu": 0.0}, ValueError),
        ({"mu": -0.5}, ValueError),
        ({"mu": 1.5}, ValueError),
        ({"mu": math.nan}, ValueError),
        ({"mu": True}, TypeError),
        ({"mu": "0.5"}, TypeError),
        ({"tau": -0.1}, ValueError),
        ({"tau": math.nan}, ValueError),
        ({"tau": False}, TypeError),
        ({"tau": None}, TypeError),
        ({"reset_other": 1}, TypeError),
    ],
)
def test_bad_hyperparameters(kwargs: dict[str, Any], error: type[Exception]) -> None:
    name = next(iter(kwargs))
    with pytest.raises(error, match=name):
        MILES(make_optimizer(), **kwargs)


def test_mu_and_tau_edges_accepted() -> None:
    sched = MILES(make_optimizer(), tau=0, mu=1)
    assert (sched.tau, sched.mu) == (0.0, 1.0)
    assert MILES(make_optimizer(), tau=np.float64(0.3), mu=np.float32(0.5)).mu == 0.5


@pytest.mark.parametrize(
    "modalities", [("A", None, "A"), (None, None), ("A",), ("A", "A"), (None,)]
)
def test_fewer_than_two_modalities(modalities: tuple[str | None, ...]) -> None:
    with pytest.raises(ValueError, match="two distinct modalities"):
        MILES(make_optimizer(modalities))


def test_non_str_modality() -> None:
    groups: list[dict[str, Any]] = [
        {"params": [torch.nn.Parameter(torch.zeros(1))], "modality": "A"},
        {"params": [torch.nn.Parameter(torch.zeros(1))], "modality": "B"},
        {"params": [torch.nn.Parameter(torch.zeros(1))], "modality": 3},
    ]
    opt = torch.optim.SGD(groups, lr=0.1)
    with pytest.raises(TypeError, match="modality"):
        MILES(opt)


def test_non_optimizer() -> None:
    with pytest.raises(TypeError, match="Optimizer"):
        MILES([{"params": [], "modality": "A"}])  # type: ignore[arg-type]


def snapshot(sched: MILES) -> tuple[Any, ...]:
    return (
        lrs(sched.optimizer),
        sched.get_last_lr(),
        sched.last_epoch,
        sched._step_count,
        len(sched.history),
        sched.factors,
    )


GOOD = {"A": 0.5, "B": 0.25}
BAD_VALUES: list[tuple[Any, type[Exception], str]] = [
    (math.nan, ValueError, "NaN"),
    (math.inf, ValueError, "infinite"),
    (-0.25, ValueError, ">= 0"),
    ("0.5", TypeError, "'0.5'"),
    (True, TypeError, "bool"),
    (None, TypeError, "None"),
    (torch.tensor([0.5, 0.5]), TypeError, "0-d"),
]


def bad_step_calls() -> list[tuple[str, dict[str, Any], type[Exception], str]]:
    calls: list[tuple[str, dict[str, Any], type[Exception], str]] = []
    for value, error, word in BAD_VALUES:
        if value is not None:  # fused=None with metrics is checked below
            calls.append((f"fused={value!r}", {"fused": value, "unimodal": GOOD}, error, word))
        calls.append(
            (f"unimodal={value!r}", {"fused": 0.8, "unimodal": {"A": 0.5, "B": value}}, error, word)
        )
        calls.append(
            (f"without={value!r}", {"fused": 0.8, "without": {"A": value, "B": 0.5}}, error, word)
        )
    calls += [
        ("fused None", {"unimodal": GOOD}, TypeError, "fused"),
        ("fused zero", {"fused": 0.0, "unimodal": GOOD}, ValueError, "fused metric is 0"),
        ("fused zero ablation", {"fused": 0, "without": GOOD}, ValueError, "fused metric is 0"),
        ("unknown", {"fused": 0.8, "unimodal": {**GOOD, "C": 0.1}}, ValueError, "unknown.*'C'"),
        ("missing", {"fused": 0.8, "unimodal": {"A": 0.5}}, ValueError, "missing.*'B'"),
        ("missing ablation", {"fused": 0.8, "without": {"B": 0.5}}, ValueError, "missing.*'A'"),
        ("both", {"fused": 0.8, "unimodal": GOOD, "without": GOOD}, ValueError, "not both"),
        ("neither", {"fused": 0.8}, ValueError, "unimodal= or without="),
        ("not a mapping", {"fused": 0.8, "unimodal": [0.5, 0.25]}, TypeError, "mapping"),
    ]
    return calls


@pytest.mark.parametrize("reset_other", [False, True])
@pytest.mark.parametrize(
    ("label", "kwargs", "error", "pattern"), bad_step_calls(), ids=lambda x: str(x)[:40]
)
def test_bad_step_raises_and_changes_nothing(
    label: str,
    kwargs: dict[str, Any],
    error: type[Exception],
    pattern: str,
    reset_other: bool,
) -> None:
    sched = MILES(make_optimizer(), mu=MU, reset_other=reset_other)
    sched.step(**CASES["A>0>B"][0])
    before = snapshot(sched)
    with pytest.raises(error, match=pattern):
        sched.step(**kwargs)
    assert snapshot(sched) == before, label
    # and a good step still works afterwards
    decision = sched.step(**CASES["B>0>A"][0])
    assert decision is not None and decision.epoch == 2


@pytest.mark.parametrize(
    "value",
    [
        1,
        0.5,
        np.float64(0.5),
        np.float32(0.5),
        np.int64(1),
        np.array(0.5),
        torch.tensor(0.5),
        torch.tensor(1, dtype=torch.int64),
    ],
    ids=repr,
)
def test_accepts_scalar_types(value: Any) -> None:
    opt = make_optimizer()
    sched = MILES(opt, mu=MU)
    decision = sched.step(fused=value, unimodal={"A": value, "B": torch.tensor(0.0)})
    assert decision is not None
    assert type(decision.fused) is float and decision.fused == float(value)
    assert all(type(v) is float for v in decision.metrics.values())
    # fused == M_A, M_B = 0 -> u_A = 1, u_B = 0 -> A slowed
    assert decision.u == {"A": 1.0, "B": 0.0}
    assert lrs(opt) == expected(MU, 1.0)
    sched.step(fused=value, without={"A": value, "B": value})
    assert lrs(opt) == expected(1.0, 1.0)


# ---------------------------------------------------------------- N = 3


def three_optimizer() -> torch.optim.Optimizer:
    return make_optimizer(("a", "b", None, "c", "a"), lrs=[0.1, 0.2, 0.3, 0.4, 0.5])


def test_three_modalities_heads_hand_computed() -> None:
    opt = three_optimizer()
    sched = MILES(opt, tau=0.2, mu=MU)
    decision = sched.step(fused=1.0, unimodal={"c": 0.25, "a": 0.75, "b": 0.5})
    assert decision is not None
    # u_a = 1 - max(b, c) = 0.5; u_b = 1 - max(a, c) = 0.25; u_c = 1 - max(a, b) = 0.25
    assert decision.u == {"a": 0.5, "b": 0.25, "c": 0.25}
    assert list(decision.metrics) == ["a", "b", "c"]  # param-group order, not argument order
    assert decision.delta == 0.25
    assert (decision.slowed, decision.reason, decision.estimator) == ("a", "slowed", "heads")
    assert lrs(opt) == [0.1 * MU, 0.2, 0.3, 0.4, 0.5 * MU]
    # b becomes the strongest head: b is slowed, a keeps mu (literal mode)
    decision = sched.step(fused=1.0, unimodal={"a": 0.25, "b": 1.0, "c": 0.5})
    assert decision is not None
    assert decision.u == {"a": 0.0, "b": 0.5, "c": 0.0}
    assert decision.slowed == "b"
    assert lrs(opt) == [0.1 * MU, 0.2 * MU, 0.3, 0.4, 0.5 * MU]
    decision = sched.step(fused=1.0, unimodal={"a": 0.5, "b": 0.5, "c": 0.5})
    assert decision is not None and decision.reason == "balanced"
    assert lrs(opt) == [0.1, 0.2, 0.3, 0.4, 0.5]


def test_three_modalities_ablation_hand_computed() -> None:
    opt = three_optimizer()
    sched = MILES(opt, tau=0.2, mu=0.25, reset_other=True)
    decision = sched.step(fused=0.8, without={"a": 0.8, "b": 0.4, "c": 0.7})
    assert decision is not None
    assert decision.estimator == "ablation"
    assert decision.u == pytest.approx({"a": 0.0, "b": 0.5, "c": 0.125}, rel=1e-12, abs=1e-15)
    assert decision.delta == pytest.approx(0.5, rel=1e-12)
    assert decision.slowed == "b"
    assert lrs(opt) == [0.1, 0.2 * 0.25, 0.3, 0.4, 0.5]
    decision = sched.step(fused=0.8, without={"a": 0.8, "b": 0.8, "c": 0.2})
    assert decision is not None and decision.slowed == "c"
    assert lrs(opt) == [0.1, 0.2, 0.3, 0.4 * 0.25, 0.5]  # reset mode: b back to base


def test_three_modalities_tie_goes_to_first_in_param_group_order() -> None:
    sched = MILES(three_optimizer(), tau=0.2)
    decision = sched.step(fused=1.0, without={"c": 0.5, "b": 0.5, "a": 1.0})
    assert decision is not None and decision.slowed == "b"
    opt = make_optimizer(("c", "b", "a"))
    decision = MILES(opt).step(fused=1.0, without={"a": 1.0, "b": 0.5, "c": 0.5})
    assert decision is not None and decision.slowed == "c"


def test_three_modalities_all_negative_and_synthetic_run() -> None:
    opt = three_optimizer()
    sched = MILES(opt, tau=0.1, mu=MU)
    decision = sched.step(fused=0.25, unimodal={"a": 0.5, "b": 0.75, "c": 1.0})
    assert decision is not None and decision.reason == "all-negative"
    # a synthetic run where modality a dominates and the others catch up
    for epoch in range(1, 11):
        weak = 0.05 * epoch
        decision = sched.step(fused=0.8 + weak / 10, unimodal={"a": 0.7, "b": weak, "c": weak / 2})
        assert decision is not None
        assert decision.slowed == ("a" if decision.reason == "slowed" else None)
    assert sched.history[1].slowed == "a"
    assert sched.factors["b"] == sched.factors["c"] == 1.0


# ---------------------------------------------------------------- Decision and state


def test_decision_round_trip() -> None:
    sched = MILES(make_optimizer())
    decision = sched.step(**CASES["A>0>B"][0])
    assert decision is not None
    data = decision.to_dict()
    assert Decision.from_dict(data) == decision
    assert data["slowed"] == "A" and data["factors"] == {"A": MU, "B": 1.0}
    with pytest.raises(AttributeError):
        decision.slowed = "B"  # type: ignore[misc]


def metric_stream(seed: int, n: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for _ in range(n):
        out.append({"fused": rng.uniform(0.1, 1.0), "unimodal": {m: rng.random() for m in "AB"}})
    return out


def only_builtins(obj: Any) -> bool:
    if isinstance(obj, dict):
        return all(isinstance(k, str) and only_builtins(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(only_builtins(v) for v in obj)
    return obj is None or type(obj) in (bool, int, float, str)


@pytest.mark.parametrize("reset_other", [False, True])
def test_state_dict_round_trip_through_torch_save(reset_other: bool) -> None:
    stream = metric_stream(3, 30)
    opt = make_optimizer(lrs=[0.1, 0.2, 0.3, 0.4])
    sched = MILES(opt, tau=0.05, mu=0.3, reset_other=reset_other)
    for metrics in stream[:10]:
        sched.step(**metrics)
    state = sched.state_dict()
    assert only_builtins(state)
    assert set(state) == {
        "version",
        "tau",
        "mu",
        "reset_other",
        "mode",
        "scale",
        "modalities",
        "group_modalities",
        "factors",
        "history",
        "last_epoch",
        "_step_count",
        "_last_lr",
        "base_lrs",
        "written",
        "unscaled",
        "window_open",
        "base",
    }
    buffer = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": state}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    opt2 = make_optimizer(lrs=[0.1, 0.2, 0.3, 0.4])
    sched2 = MILES(opt2)  # default hyper-parameters: restored from the state
    opt2.load_state_dict(loaded["optimizer"])
    sched2.load_state_dict(loaded["scheduler"])
    assert (sched2.tau, sched2.mu, sched2.reset_other) == (0.05, 0.3, reset_other)
    assert sched2.history == sched.history
    assert sched2.factors == sched.factors
    assert sched2.last_epoch == sched.last_epoch
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert lrs(opt2) == lrs(opt)
    for metrics in stream[10:]:
        d1, d2 = sched.step(**metrics), sched2.step(**metrics)
        assert d1 == d2
        assert lrs(opt) == lrs(opt2)
    assert sched2.state_dict() == sched.state_dict()


@pytest.mark.parametrize("modalities", [("A", "C", None, "A"), ("B", "A", None, "B")])
def test_load_state_dict_with_other_modalities_raises(modalities: tuple[str | None, ...]) -> None:
    sched = MILES(make_optimizer())
    sched.step(**CASES["A>0>B"][0])
    other = MILES(make_optimizer(modalities))
    before = other.state_dict()
    with pytest.raises(ValueError, match="modalities"):
        other.load_state_dict(sched.state_dict())
    assert other.state_dict() == before


def test_tensor_learning_rates_are_supported() -> None:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "modality": m} for m in ("A", "B")]
    opt = torch.optim.Adam(groups, lr=torch.tensor(0.1))
    sched = MILES(opt, mu=MU)
    sched.step(**CASES["A>0>B"][0])
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.05)
    assert float(opt.param_groups[1]["lr"]) == pytest.approx(0.1)
    assert only_builtins(sched.state_dict())


def test_all_grid_cases_covered() -> None:
    """Guard: the branch table above covers every reason and both slowed modalities."""
    outcomes = {(slowed, reason) for _, slowed, reason in CASES.values()}
    assert outcomes == {
        (None, "balanced"),
        (None, "all-negative"),
        ("A", "slowed"),
        ("B", "slowed"),
    }
    assert len(list(itertools.product(CASES, [False, True]))) == 2 * len(CASES)


def test_param_groups_changed_after_construction_is_an_error_that_changes_nothing() -> None:
    opt = make_optimizer()
    sched = MILES(opt)
    before = (lrs(opt), sched.last_epoch, len(sched.history), sched.factors)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "modality": "A"})
    with pytest.raises(ValueError, match="param groups"):
        sched.step(fused=0.9, unimodal={"A": 0.9, "B": 0.1})
    assert (lrs(opt)[:-1], sched.last_epoch, len(sched.history), sched.factors) == before


def test_reset_restores_base_lr_exactly_for_awkward_mu() -> None:
    opt = make_optimizer()
    start = lrs(opt)
    sched = MILES(opt, tau=0.2, mu=0.3)
    sched.step(fused=1.0, unimodal={"A": 0.9, "B": 0.1})  # slow A
    assert lrs(opt) != start
    sched.step(fused=1.0, unimodal={"A": 0.5, "B": 0.5})  # balanced: reset
    assert lrs(opt) == start
