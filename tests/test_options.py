"""MILES decision options: Algorithm 1 unchanged by default, each remedy and rule as documented."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch

from miles.options import MILESOptions
from miles.scheduler import MILES
from miles.strategies import build_strategy
from miles.training.experiment import run_experiment
from tests.conftest import make_toy_splits

BASE = 0.1


def optimizer(modalities: Sequence[str] = ("A", "B")) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "modality": m} for m in modalities]
    groups.append({"params": [torch.nn.Parameter(torch.zeros(1))]})
    return torch.optim.SGD(groups, lr=BASE)


def random_metrics(n: int, modalities: Sequence[str], seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        fused = rng.uniform(0.3, 1.0)
        out.append({"fused": fused, "unimodal": {m: rng.uniform(0.0, 1.0) for m in modalities}})
    return out


def run(sched: MILES, steps: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    out = []
    for metrics in steps:
        d = sched.step(**metrics)
        assert d is not None
        out.append((d.slowed, d.reason, dict(d.factors), list(d.lrs)))
    return out


def test_defaults_are_algorithm_1_bit_for_bit() -> None:
    steps = random_metrics(40, "AB", 0)
    plain, explicit = MILES(optimizer()), MILES(optimizer(), options=MILESOptions())
    also = MILES(optimizer(), options={"warmup": 0, "smoothing": 0.0, "min_duration": 1})
    assert explicit.options.is_default and also.options.is_default
    a, b, c = run(plain, steps), run(explicit, steps), run(also, steps)
    assert a == b == c
    assert [d.to_dict() for d in plain.history] == [d.to_dict() for d in explicit.history]
    assert plain.state_dict() == explicit.state_dict()
    assert "options" not in plain.state_dict()  # the saved state of Algorithm 1 is unchanged


@pytest.mark.parametrize(
    "options",
    [{"release_tau": 0.2}, {"pairwise": True}, {"smoothing": 0.0, "release_tau": 0.2}],
    ids=["hysteresis at tau", "pairwise, 2 modalities", "no-op smoothing"],
)
def test_inert_options_take_their_own_path_and_decide_as_algorithm_1(
    options: dict[str, Any],
) -> None:
    """Options that cannot change a 2-modality decision go through the options code and must
    agree with Algorithm 1 on every decision, factor and LR (pairwise: delta to rounding)."""
    steps = random_metrics(60, "AB", 1)
    plain, variant = MILES(optimizer(), tau=0.2), MILES(optimizer(), tau=0.2, options=options)
    assert variant._options is not None
    assert run(plain, steps) == run(variant, steps)
    for d, e in zip(plain.history, variant.history, strict=True):
        assert d.delta == pytest.approx(e.delta, abs=1e-12)
        assert d.u == e.u


def slowing(u_a: float = 0.5, u_b: float = 0.0) -> dict[str, Any]:
    """Heads with fused 1: u_A = 1 - M_B, u_B = 1 - M_A."""
    return {"fused": 1.0, "unimodal": {"A": 1.0 - u_b, "B": 1.0 - u_a}}


def test_warmup_skips_the_first_decisions() -> None:
    sched = MILES(optimizer(), options={"warmup": 2})
    reasons = [sched.step(**slowing()).reason for _ in range(4)]  # type: ignore[union-attr]
    assert reasons == ["warm-up", "warm-up", "slowed", "slowed"]
    assert sched.history[1].factors == {"A": 1.0, "B": 1.0}
    assert sched.history[2].factors == {"A": 0.5, "B": 1.0}


def test_smoothing_is_an_ema_of_the_metrics() -> None:
    sched = MILES(optimizer(), options={"smoothing": 0.5})
    sched.step(fused=1.0, unimodal={"A": 0.9, "B": 0.5})
    d = sched.step(fused=0.8, unimodal={"A": 0.7, "B": 0.7})
    assert d is not None
    fused, a, b = 0.9, 0.8, 0.6  # halfway between the two epochs
    assert d.u == pytest.approx({"A": (fused - b) / fused, "B": (fused - a) / fused})
    # the raw metrics of this epoch are balanced (delta 0); the smoothed ones are not
    assert d.slowed == "A" and d.delta == pytest.approx((a - b) / fused)
    assert d.metrics == {"A": 0.7, "B": 0.7}  # the record keeps the raw metrics


def test_hysteresis_releases_only_below_release_tau() -> None:
    sched = MILES(optimizer(), tau=0.2, options={"release_tau": 0.1})
    seq = [slowing(0.3), slowing(0.15), slowing(0.15, 0.1), slowing(0.05)]
    got = [(d.slowed, d.reason) for d in (sched.step(**m) for m in seq) if d]
    assert got == [("A", "slowed"), ("A", "held"), (None, "balanced"), (None, "balanced")]
    with pytest.raises(ValueError, match="release_tau"):
        MILES(optimizer(), tau=0.2, options={"release_tau": 0.3})


def test_min_duration_holds_a_slow_down() -> None:
    sched = MILES(optimizer(), options={"min_duration": 3})
    seq = [slowing(0.5), slowing(0.0), slowing(0.0), slowing(0.0), slowing(0.0, 0.5)]
    got = [(d.slowed, d.reason) for d in (sched.step(**m) for m in seq) if d]
    assert got == [
        ("A", "slowed"),
        ("A", "held"),
        ("A", "held"),
        (None, "balanced"),
        ("B", "slowed"),
    ]


def test_reference_aware_removes_an_intrinsic_gap() -> None:
    """Two heads at their own unimodal references, 27 points apart: Algorithm 1 slows the
    stronger one every epoch; the reference-aware rule sees two modalities at their potential."""
    metrics = {"fused": 0.98, "unimodal": {"A": 0.97, "B": 0.70}}
    plain = MILES(optimizer())
    aware = MILES(
        optimizer(), options={"reference": "unimodal", "references": {"A": 0.97, "B": 0.7}}
    )
    assert [plain.step(**metrics).slowed for _ in range(3)] == ["A"] * 3  # type: ignore[union-attr]
    decisions = [aware.step(**metrics) for _ in range(3)]
    assert all(d is not None and d.slowed is None and d.delta == 0.0 for d in decisions)
    # a head far below its own reference is still helped: A is slowed while B lags
    d = aware.step(fused=0.9, unimodal={"A": 0.97, "B": 0.35})
    assert d is not None and d.slowed == "A" and d.delta == pytest.approx(0.5)


def test_reference_best_so_far() -> None:
    sched = MILES(optimizer(), options={"reference": "best"})
    d1 = sched.step(fused=0.9, unimodal={"A": 0.9, "B": 0.4})  # both at their best
    d2 = sched.step(fused=0.9, unimodal={"A": 0.9, "B": 0.2})  # B at half its best
    assert d1 is not None and d1.delta == 0.0 and d1.slowed is None
    assert d2 is not None and d2.slowed == "A" and d2.delta == pytest.approx(0.5)


def test_pairwise_sees_a_third_modality_far_behind() -> None:
    metrics = {"fused": 0.96, "unimodal": {"A": 0.95, "B": 0.93, "C": 0.60}}
    plain = MILES(optimizer("ABC"))
    pairwise = MILES(optimizer("ABC"), options={"pairwise": True})
    d, p = plain.step(**metrics), pairwise.step(**metrics)
    assert d is not None and d.slowed is None  # best vs second best: 0.02 / 0.96
    assert p is not None and p.slowed == "A" and p.delta == pytest.approx(0.35 / 0.96)
    assert p.u == d.u


def test_state_dict_round_trip_continues_exactly() -> None:
    options = {"smoothing": 0.3, "min_duration": 2, "warmup": 1, "reference": "best"}
    steps = random_metrics(20, "AB", 3)
    whole = MILES(optimizer(), options=options)
    expected = run(whole, steps)
    first = MILES(optimizer(), options=options)
    head = run(first, steps[:9])
    state = first.state_dict()
    assert state["options"] == {
        "warmup": 1,
        "smoothing": 0.3,
        "min_duration": 2,
        "reference": "best",
    }
    restored = optimizer()  # the LRs live in the optimizer's state: restore it first
    restored.load_state_dict(first.optimizer.state_dict())
    second = MILES(restored, options=options)
    second.load_state_dict(state)
    assert head + run(second, steps[9:]) == expected
    with pytest.raises(ValueError, match="saved with MILES options"):
        MILES(optimizer()).load_state_dict(state)
    with pytest.raises(ValueError, match="saved with MILES options"):
        MILES(optimizer(), options={"warmup": 1}).load_state_dict(MILES(optimizer()).state_dict())


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"warmup": -1}, ValueError, "warmup"),
        ({"warmup": 1.5}, TypeError, "warmup"),
        ({"smoothing": 1.0}, ValueError, "smoothing"),
        ({"min_duration": 0}, ValueError, "min_duration"),
        ({"reference": "oracle"}, ValueError, "reference"),
        ({"reference": "unimodal"}, ValueError, "needs references"),
        ({"reference": "best", "references": {"A": 1.0}}, ValueError, "only read"),
        ({"reference": "unimodal", "references": {"A": 1.0}}, ValueError, "missing"),
        ({"reference": "unimodal", "references": {"A": 1.0, "B": 0.0}}, ValueError, "references"),
        ({"pairwise": 1}, TypeError, "pairwise"),
        ({"speed": 2}, ValueError, "unknown MILES options"),
    ],
)
def test_bad_options_fail_at_construction(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        MILES(optimizer(), options=options)


def test_rules_on_the_heads_refuse_the_ablation_estimator() -> None:
    sched = MILES(optimizer(), options={"pairwise": True})
    with pytest.raises(ValueError, match="pairwise"):
        sched.step(fused=0.9, without={"A": 0.5, "B": 0.8})
    with pytest.raises(ValueError, match="mode='max'"):
        MILES(optimizer(), mode="min", options={"reference": "best"})
    with pytest.raises(ValueError, match="estimator='heads'"):
        build_strategy("miles", estimator="ablation", pairwise=True)


def test_strategy_options_reach_the_scheduler_and_defaults_train_bit_identically() -> None:
    """In a real run, options that cannot change a decision (hysteresis at tau) give the very same
    history as Algorithm 1, and the default strategy describes itself as before."""
    from miles.training.experiment import ExperimentConfig
    from miles.training.trainer import TrainerConfig

    data = make_toy_splits()
    results = {}
    for name, params in {"plain": {}, "inert": {"release_tau": 0.2}}.items():
        config = ExperimentConfig(
            dataset="toy",
            strategy="miles",
            strategy_params={"tau": 0.2, **params},
            latent_dim=8,
            trainer=TrainerConfig(epochs=4, progress=False, batch_size=32),
        )
        results[name] = run_experiment(config, data=data).to_dict()
    plain, inert = results["plain"], results["inert"]
    val = [{k: v for k, v in r.items() if k.startswith("val_")} for r in plain["history"]]
    assert val == [{k: v for k, v in r.items() if k.startswith("val_")} for r in inert["history"]]
    assert plain["test"] == inert["test"] and plain["best_epoch"] == inert["best_epoch"]
    assert set(plain["strategy"]) == {
        "name",
        "uses_aux_losses",
        "tau",
        "mu",
        "reset_other",
        "estimator",
    }
    assert inert["strategy"]["release_tau"] == 0.2
