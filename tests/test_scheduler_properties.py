"""Property tests of MILES over random metric sequences (hypothesis), N = 2 and N = 3."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from miles.scheduler import MILES

SETTINGS = settings(max_examples=200, deadline=None)

metric = st.floats(min_value=0.0, max_value=1.0, allow_nan=False, allow_infinity=False)
fused_metric = st.floats(min_value=1e-3, max_value=1.0, allow_nan=False, allow_infinity=False)
mus = st.one_of(
    st.sampled_from([0.5, 0.25, 0.3, 1.0]),
    st.floats(min_value=1e-3, max_value=1.0, exclude_min=False),
)
taus = st.one_of(st.sampled_from([0.0, 0.2]), st.floats(min_value=0.0, max_value=0.6))


def layouts(n: int) -> st.SearchStrategy[list[str | None]]:
    """Param-group layouts: every modality at least once, plus shared groups and repeats."""
    names = [f"m{i}" for i in range(n)]
    extra = st.lists(st.sampled_from([*names, None]), min_size=1, max_size=4)
    return st.builds(lambda more: [*names, *more], extra).flatmap(st.permutations)


def step_inputs(n: int) -> st.SearchStrategy[dict[str, Any] | None]:
    names = [f"m{i}" for i in range(n)]
    values = st.fixed_dictionaries(dict.fromkeys(names, metric))
    heads = st.builds(lambda f, v: {"fused": f, "unimodal": v}, fused_metric, values)
    ablation = st.builds(lambda f, v: {"fused": f, "without": v}, fused_metric, values)
    return st.one_of(heads, ablation, st.none())


def scenario(n: int) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.tuples(
        layouts(n),
        st.lists(st.floats(min_value=1e-4, max_value=1.0), min_size=8, max_size=8),
        mus,
        taus,
        st.booleans(),
        st.lists(step_inputs(n), min_size=1, max_size=25),
    )


def check_run(
    layout: list[str | None],
    base_lrs: list[float],
    mu: float,
    tau: float,
    reset_other: bool,
    steps: list[dict[str, Any] | None],
) -> None:
    groups = [
        {"params": [torch.nn.Parameter(torch.zeros(1))], "modality": m, "lr": base_lrs[i]}
        for i, m in enumerate(layout)
    ]
    opt = torch.optim.SGD(groups, lr=0.1)
    sched = MILES(opt, tau=tau, mu=mu, reset_other=reset_other)
    base = [g["lr"] for g in opt.param_groups]
    previous = sched.factors
    for epoch, inputs in enumerate(steps, start=1):
        decision = sched.skip() if inputs is None else sched.step(**inputs)
        factors = sched.factors
        assert sched.last_epoch == epoch
        # every factor is 1 or mu: never compounded
        assert all(f in (1.0, mu) for f in factors.values())
        # at most one modality goes from 1 to mu per step
        newly_slowed = [m for m in factors if previous[m] == 1.0 and factors[m] == mu != 1.0]
        assert len(newly_slowed) <= 1
        if decision is None:
            assert factors == previous
        else:
            assert decision.factors == factors
            if decision.slowed is None:
                assert set(factors.values()) == {1.0}
            else:
                assert factors[decision.slowed] == mu
                assert decision.u[decision.slowed] == max(decision.u.values())
                assert decision.delta > tau
                if reset_other:
                    assert all(f == 1.0 for m, f in factors.items() if m != decision.slowed)
                else:
                    assert all(factors[m] == previous[m] for m in factors if m != decision.slowed)
        if reset_other:
            assert sum(f < 1.0 for f in factors.values()) <= 1
        current = [g["lr"] for g in opt.param_groups]
        for modality, lr, lr0 in zip(layout, current, base, strict=True):
            if modality is None:
                assert lr == lr0  # shared groups never change, bit for bit
            else:
                assert lr == lr0 * factors[modality]  # exact, whatever mu
                if factors[modality] < 1.0:
                    assert lr < lr0
        assert sched.get_last_lr() == current
        previous = factors
    assert len(sched.history) == sum(s is not None for s in steps)


@SETTINGS
@given(scenario(2))
def test_properties_two_modalities(args: tuple[Any, ...]) -> None:
    check_run(*args)


@SETTINGS
@given(scenario(3))
def test_properties_three_modalities(args: tuple[Any, ...]) -> None:
    check_run(*args)


@SETTINGS
@given(
    st.lists(st.tuples(fused_metric, metric, metric), min_size=1, max_size=20),
    st.booleans(),
)
def test_two_modalities_heads_slow_the_better_head(
    steps: list[tuple[float, float, float]], reset_other: bool
) -> None:
    """At N = 2 with heads, a slowed modality is always the one with the better unimodal head."""
    opt = torch.optim.SGD(
        [{"params": [torch.nn.Parameter(torch.zeros(1))], "modality": m} for m in ("a", "b")],
        lr=0.1,
    )
    sched = MILES(opt, tau=0.0, reset_other=reset_other)
    for fused, m_a, m_b in steps:
        decision = sched.step(fused=fused, unimodal={"a": m_a, "b": m_b})
        assert decision is not None
        if decision.slowed == "a":
            assert m_a > m_b
        elif decision.slowed == "b":
            assert m_b > m_a
        else:  # with tau = 0, only equal u or all-negative u leave both at base
            assert decision.delta == 0.0 or all(u < 0 for u in decision.u.values())
