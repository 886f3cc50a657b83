"""What MILES refuses and how it reads its inputs: state dicts, metric scales, losses, log views."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

from miles import conditional_utilization
from miles.scheduler import MILES, Decision

SLOW_A = {"fused": 0.8, "unimodal": {"A": 0.75, "B": 0.25}}


def make_optimizer(modalities: tuple[str | None, ...] = ("A", "B", None)) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "modality": m} for m in modalities]
    return torch.optim.SGD(groups, lr=0.1)


def snapshot(sched: MILES) -> tuple[Any, ...]:
    return (
        sched.state_dict(),
        [g["lr"] for g in sched.optimizer.param_groups],
        sched.get_last_lr(),
    )


# ---------------------------------------------------------------- load_state_dict (issue 12, 14)


def _saved() -> dict[str, Any]:
    sched = MILES(make_optimizer(), tau=0.1, mu=0.3)
    sched.step(**SLOW_A)
    return sched.state_dict()


def _without(key: str) -> dict[str, Any]:
    state = _saved()
    del state[key]
    return state


def _with(**changes: Any) -> dict[str, Any]:
    return {**_saved(), **changes}


def _older_format(n_groups: int) -> dict[str, Any]:
    """A state as saved before written/unscaled/group tags existed, for ``n_groups`` groups."""
    state = _saved()
    for key in ("version", "mode", "scale", "group_modalities", "window_open", "base"):
        state.pop(key, None)
    for key in ("written", "unscaled"):
        del state[key]
    state["_last_lr"] = [0.03] * n_groups
    state["base_lrs"] = [0.1] * n_groups
    return state


BAD_STATES: dict[str, tuple[dict[str, Any], str]] = {
    "missing key": (_without("history"), r"missing keys \['history'\]"),
    "missing last_epoch": (_without("last_epoch"), "missing keys"),
    "other modality names": (_with(modalities=["A", "C"]), "modalities"),
    "other group tags": (_with(group_modalities=["B", "A", None]), "tagged"),
    "more groups": (_with(_last_lr=[0.1] * 4), "4 param groups"),
    "older format, other group count": (_older_format(5), "5 param groups"),
    "bad factor": (_with(factors={"A": 0.7, "B": 1.0}), "factors"),
    "bad reset_other": (_with(reset_other="no"), "reset_other"),
    "bad history": (_with(history=[{"epoch": 1}]), r"history'\]\[0\]"),
    "bad counter": (_with(last_epoch=1.5), "last_epoch"),
    "bad mode": (_with(mode="maximum"), "mode"),
    "base state without base": (_with(base={"last_epoch": 3}), "base schedule"),
}


@pytest.mark.parametrize("name", list(BAD_STATES))
def test_bad_state_is_refused_and_changes_nothing(name: str) -> None:
    state, pattern = BAD_STATES[name]
    sched = MILES(make_optimizer(), tau=0.2, mu=0.5)
    sched.step(fused=0.8, unimodal={"A": 0.25, "B": 0.75})  # slow B: a state worth protecting
    before = copy.deepcopy(snapshot(sched))
    with pytest.raises((ValueError, TypeError), match=pattern):
        sched.load_state_dict(state)
    assert snapshot(sched) == before


def test_older_format_state_of_the_same_layout_loads() -> None:
    sched = MILES(make_optimizer())
    sched.load_state_dict(_older_format(3))
    assert (sched.tau, sched.mu, sched.factors) == (0.1, 0.3, {"A": 0.3, "B": 1.0})
    assert sched.unscaled_lrs == [None, None, None]
    sched.optimizer.param_groups[0]["lr"] = 0.03  # what the optimizer's state held
    decision = sched.step(fused=0.8, unimodal={"A": 0.5, "B": 0.5})  # balanced: A back to base
    assert decision is not None and decision.reason == "balanced"
    assert math.isclose(sched.optimizer.param_groups[0]["lr"], 0.1)


def test_state_dict_of_a_base_schedule_needs_one() -> None:
    opt = make_optimizer()
    with_base = MILES(opt, base=torch.optim.lr_scheduler.ExponentialLR(opt, 0.9))
    with pytest.raises(ValueError, match="holds none"):
        with_base.load_state_dict(_saved())


# ---------------------------------------------------------------- near-zero fused, scales


def test_near_zero_fused_metric_gives_a_clear_error() -> None:
    sched = MILES(make_optimizer())
    before = snapshot(sched)
    with pytest.raises(ValueError, match=r"fused metric 1e-309 is too close to 0.*skip\(\)"):
        sched.step(fused=1e-309, unimodal={"A": 0.9, "B": 0.1})
    assert snapshot(sched) == before
    with pytest.raises(ValueError, match="too close to 0"):
        conditional_utilization(1e-309, without={"A": 0.9, "B": 0.0})
    # small but representable: a well-defined (very negative) utilization, no error
    d = sched.step(fused=1e-6, unimodal={"A": 0.9, "B": 0.1})
    assert d is not None and d.reason == "all-negative"


def test_percent_fused_with_fraction_heads_is_refused() -> None:
    sched = MILES(make_optimizer())
    before = snapshot(sched)
    with pytest.raises(ValueError, match=r"'fused' = 85.0 exceeds scale=1.0.*scale=100"):
        sched.step(fused=85.0, unimodal={"A": 0.8, "B": 0.3})
    with pytest.raises(ValueError, match=r"unimodal\['A'\] = 80.0 exceeds scale"):
        sched.step(fused=0.85, unimodal={"A": 80.0, "B": 30.0})
    assert snapshot(sched) == before


def test_percentages_with_scale_100_decide_like_fractions() -> None:
    frac, pct = MILES(make_optimizer()), MILES(make_optimizer(), scale=100)
    d1 = frac.step(fused=0.875, unimodal={"A": 0.75, "B": 0.25})
    d2 = pct.step(fused=87.5, unimodal={"A": 75.0, "B": 25.0})
    assert d1 is not None and d2 is not None
    assert (d1.u, d1.slowed) == (d2.u, d2.slowed)
    with pytest.raises(ValueError, match="scale"):
        MILES(make_optimizer(), scale=0)


# ---------------------------------------------------------------- mode="min" (losses)


def test_loss_mode_computes_u_on_inverse_loss() -> None:
    # losses: fused 0.5, A 0.8, B 2.0. Scores 1/L: 2, 1.25, 0.5.
    # u_A = 1 - L_fused / L_B = 0.75; u_B = 1 - L_fused / L_A = 0.375.
    u = conditional_utilization(0.5, {"A": 0.8, "B": 2.0}, mode="min")
    assert u == pytest.approx({"A": 0.75, "B": 0.375})
    sched = MILES(make_optimizer(), tau=0.2, mode="min")
    d = sched.step(fused=0.5, unimodal={"A": 0.8, "B": 2.0})
    assert d is not None and d.slowed == "A" and d.mode == "min"
    assert d.metrics == {"A": 0.8, "B": 2.0}  # the losses as given


def test_loss_mode_agrees_with_a_score_that_is_its_inverse() -> None:
    losses = {"fused": 0.4, "A": 0.5, "B": 1.6}
    by_loss = conditional_utilization(losses["fused"], {"A": 0.5, "B": 1.6}, mode="min")
    scores = {k: 1 / v for k, v in losses.items()}
    by_score = conditional_utilization(
        scores["fused"], {"A": scores["A"], "B": scores["B"]}, scale=math.inf
    )
    assert by_loss == pytest.approx(by_score)


def test_a_loss_passed_as_a_score_does_not_silently_invert_the_rule() -> None:
    """A loss above 1 is refused by the default scale, with mode='min' named."""
    sched = MILES(make_optimizer())
    with pytest.raises(ValueError, match="mode='min'"):
        sched.step(fused=0.9, unimodal={"A": 1.4, "B": 2.3})
    with pytest.raises(ValueError, match="loss 'A' is 0"):
        conditional_utilization(0.5, {"A": 0.0, "B": 1.0}, mode="min")
    with pytest.raises(ValueError, match="mode"):
        MILES(make_optimizer(), mode="lower")


def test_mode_round_trips_through_the_state() -> None:
    sched = MILES(make_optimizer(), mode="min", scale=10.0)
    sched.step(fused=0.5, unimodal={"A": 0.8, "B": 2.0})
    other = MILES(make_optimizer())
    other.load_state_dict(sched.state_dict())
    assert (other.mode, other.scale) == ("min", 10.0)
    assert other.history == sched.history


# ---------------------------------------------------------------- flat view for loggers


def test_decision_scalars_are_flat_numbers_named_by_modality() -> None:
    groups = [
        {"params": [torch.nn.Parameter(torch.zeros(1))], "modality": "audio", "name": "audio"},
        {"params": [torch.nn.Parameter(torch.zeros(1))], "modality": "image", "name": "image"},
        {"params": [torch.nn.Parameter(torch.zeros(1))], "modality": None, "name": "shared"},
        {"params": [torch.nn.Parameter(torch.zeros(1))], "modality": "audio"},
    ]
    sched = MILES(torch.optim.SGD(groups, lr=0.1), mu=0.5)
    d = sched.step(fused=0.8, unimodal={"audio": 0.75, "image": 0.25})
    assert d is not None
    scalars = d.scalars()
    assert scalars == {
        "miles/fused": 0.8,
        "miles/delta": d.delta,
        "miles/u/audio": d.u["audio"],
        "miles/u/image": d.u["image"],
        "miles/metric/audio": 0.75,
        "miles/metric/image": 0.25,
        "miles/factor/audio": 0.5,
        "miles/factor/image": 1.0,
        "miles/slowed/audio": 1.0,
        "miles/slowed/image": 0.0,
        "miles/lr/audio": 0.05,
        "miles/lr/image": 0.1,
        "miles/lr/shared": 0.1,
        "miles/lr/audio/3": 0.05,
    }
    assert all(type(v) is float for v in scalars.values())
    assert Decision.from_dict(d.to_dict()).scalars(prefix="") == {
        k.removeprefix("miles/"): v for k, v in scalars.items()
    }


def test_tensorboard_add_scalars_accepts_the_flat_view(tmp_path: Any) -> None:
    tensorboard = pytest.importorskip("torch.utils.tensorboard")
    sched = MILES(make_optimizer())
    d = sched.step(**SLOW_A)
    assert d is not None
    writer = tensorboard.SummaryWriter(str(tmp_path))
    for key, value in d.scalars().items():
        writer.add_scalar(key, value, global_step=d.epoch)
    writer.add_scalars("miles", d.scalars(prefix=""), global_step=d.epoch)
    writer.close()
    assert any(tmp_path.iterdir())
