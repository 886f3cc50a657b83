"""One contract every registered strategy meets, checked by one harness for all of them.

For each strategy: it builds from its registered name, its state survives a ``state_dict`` round
trip (JSON-able builtins and tensors, through ``torch.save``/``weights_only`` loading), a run cut
after 2 epochs and resumed gives the uninterrupted 4-epoch run bit for bit, and, where the method
has one, its neutral setting is its parent method exactly (while an acting setting is not).

A strategy the library registers without an entry in ``EXAMPLES`` fails
:func:`test_every_registered_strategy_has_an_example`: a new method adds a line here.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from miles.data import DatasetSplits, collate_multimodal
from miles.models import JointFusionModel
from miles.strategies import Strategy, available_strategies, build_strategy
from miles.strategies.registry import strategy_class
from miles.training import RunResult, Trainer, TrainerConfig
from tests.conftest import make_toy_splits
from tests.helpers import assert_table_covers_library, interrupted_after, same_weights, strip_times

LRS = {"strong": 1e-2, "weak": 3e-2}  # unequal modality rates (the trainer's base rate is 1e-2)
BASE_LRS = {"strong": 1e-2, "weak": 1e-2}


@dataclass(frozen=True)
class Example:
    """Constructor parameters that make a strategy act on the toy task within 4 epochs."""

    params: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "adam"  #: OGM's authors use SGD (its gradient mode; Adam: step mode)


EXAMPLES: dict[str, Example] = {
    "joint": Example(),
    "joint+aux": Example({"aux_weights": {"weak": 0.5}}),
    "unimodal": Example({"modality": "weak"}),
    # frozen after epoch 2 with the best weights reloaded at the start of epoch 3: the cut at
    # epoch 2 falls between the freeze and the reload
    "mses": Example({"patience": 1, "min_delta": 1.0, "stop_when_converged": False}),
    "mslr-k": Example({"unimodal_lrs": LRS}),
    "mslr-s": Example({"unimodal_lrs": LRS, "smoothing": 0.5}),
    "mslr-d": Example({"unimodal_lrs": LRS, "window": 2}),  # Eq. 2: a new rate every epoch
    "ogm": Example({"alpha": 1.0}),  # Adam: step mode
    "ogm-ge": Example({"alpha": 1.0}, optimizer="sgd"),  # SGD: the authors' gradient mode
    "gblend": Example({"warmup_epochs": 1, "super_epoch": 1}),  # copies at every epoch start
    "miles": Example({"tau": 0.0}),
    # newer methods (issue 13): the authors' SGD
    "agm": Example({"alpha": 1.0}, optimizer="sgd"),
    "pmr": Example({"alpha": 1.0, "momentum": 0.5}, optimizer="sgd"),
    "mla": Example(optimizer="sgd"),
    "mmpareto": Example(optimizer="sgd"),
    # boost a, rectify a twice, boost b: the cut at epoch 2 falls inside a phase
    "reconboost": Example({"boost_epochs": 1, "rectify_epochs": 2}, optimizer="sgd"),
    # 4 batches an epoch: the 5-step re-balancing window triggered in epoch 2 crosses the cut
    "greedy": Example({"epsilon": 0.0, "window": 5}, optimizer="sgd"),
    # newer methods (issue 13)
    "mmcosine": Example({"scaling": 5.0}),
    "umt": Example({"teacher_epochs": 2}),
    "ume": Example({"rule": "probs"}),
    "relearning": Example({"every": 1}),  # re-initialises before epochs 3 and 4
    "opm": Example({"warmup": 0}),
    "ogm-tpami": Example({"modulation_starts": 1}, optimizer="sgd"),
    # re-sampled from epoch 2: the cut at epoch 2 falls between a plan and its first epoch
    "valuation-sample": Example({"warmup": 1}),
    "valuation-modality": Example({"warmup": 1, "alpha": 3.0}),
    "lfm": Example(),
    "cml": Example(),
}


@dataclass(frozen=True)
class Neutral:
    """``strategy(neutral)`` trains exactly like ``parent(parent_params)``; ``acting`` does not."""

    strategy: str
    neutral: dict[str, Any]
    parent: str
    acting: dict[str, Any]
    parent_params: dict[str, Any] = field(default_factory=dict)
    #: attributes set on the parent instance (e.g. the same held-out split as G-Blend's)
    parent_attributes: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "adam"


NEUTRAL = [
    Neutral("ogm", {"alpha": 0.0}, "joint", {"alpha": 1.0}, optimizer="sgd"),  # gradient mode
    Neutral("ogm", {"alpha": 0.0}, "joint", {"alpha": 1.0}),  # Adam: step mode
    Neutral(
        "gblend",  # uniform weights (1 per head) although the copies estimate at every epoch
        {"uniform_floor": 1.0, "normalize": "sum-to-heads", "warmup_epochs": 1, "super_epoch": 1},
        "joint+aux",
        {"normalize": "sum-to-heads", "warmup_epochs": 1, "super_epoch": 1},
        parent_attributes={"holdout_fraction": 0.08},
    ),
    # MSLR without auxiliary losses (the paper) is joint at equal rates; with them, joint+aux
    Neutral("mslr-k", {"unimodal_lrs": BASE_LRS}, "joint", {"unimodal_lrs": LRS}),
    Neutral(
        "mslr-k",
        {"unimodal_lrs": BASE_LRS, "aux_losses": True},
        "joint+aux",
        {"unimodal_lrs": LRS, "aux_losses": True},
    ),
    Neutral("mslr-s", {"unimodal_lrs": BASE_LRS, "smoothing": 0.5}, "joint", {"unimodal_lrs": LRS}),
    Neutral(
        "mslr-s",
        {"unimodal_lrs": BASE_LRS, "target": "joint"},  # already at the joint (base) rate
        "joint",
        {"unimodal_lrs": LRS, "target": "joint"},
    ),
    Neutral(
        "mslr-d", {"unimodal_lrs": BASE_LRS, "strength": 0.0}, "joint", {"unimodal_lrs": BASE_LRS}
    ),
    Neutral("mses", {"patience": 10}, "joint+aux", {"patience": 1, "min_delta": 1.0}),
    Neutral("miles", {"mu": 1.0, "tau": 0.0}, "joint+aux", {"mu": 0.5, "tau": 0.0}),
    Neutral("agm", {"alpha": 0.0, "clip": None}, "joint", {"alpha": 1.0}, optimizer="sgd"),
    Neutral("pmr", {"alpha": 0.0}, "joint", {"alpha": 1.0}, optimizer="sgd"),
    Neutral(
        "mmpareto", {"gamma": 1.0, "resolve_conflicts": False}, "joint+aux", {}, optimizer="sgd"
    ),
    Neutral(  # Table VI: the training-set pass leaves the run as it is
        "miles",
        {"mu": 1.0, "tau": 0.0, "metrics": "training"},
        "joint+aux",
        {"mu": 0.5, "tau": 0.0, "metrics": "training"},
    ),
    # the teachers are still trained (on their own streams): they must change nothing at s = 0
    Neutral("umt", {"scaling": 0.0, "teacher_epochs": 2}, "joint", {"teacher_epochs": 2}),
    # the diagnosis still runs (k-means on its own stream): lambda = 0 must change nothing
    Neutral("relearning", {"lam": 0.0, "every": 1}, "joint", {"lam": 3.0, "every": 1}),
    # the drops are still drawn (on OPM's own stream): q_base = 0 must change nothing
    Neutral("opm", {"q_base": 0.0, "warmup": 0}, "joint", {"warmup": 0}),
    Neutral(
        "ogm-tpami",
        {"alpha": 0.0, "noise": False, "modulation_starts": 1},
        "joint",
        {"alpha": 1.0, "noise": False, "modulation_starts": 1},
        optimizer="sgd",
    ),
    Neutral("lfm", {"alpha": 0.0}, "joint", {"alpha": 0.5}),
    # the values are still computed (one pass per epoch): alpha = 0 must change nothing
    Neutral(
        "valuation-modality", {"warmup": 1, "alpha": 0.0}, "joint", {"warmup": 1, "alpha": 3.0}
    ),
]


@pytest.fixture(scope="module")
def data() -> DatasetSplits:
    return make_toy_splits(n=(120, 40, 40))


def _fit(
    data: DatasetSplits,
    strategy: Strategy,
    *,
    epochs: int,
    optimizer: str = "adam",
    out_dir: Path | None = None,
    resume: bool = False,
    precision: str = "32",
) -> tuple[RunResult, JointFusionModel]:
    torch.manual_seed(0)
    model = JointFusionModel(data.build_encoders(8), data.num_classes)
    cfg = TrainerConfig(
        epochs=epochs,
        lr=1e-2,
        batch_size=32,
        seed=0,
        optimizer=optimizer,
        progress=False,
        precision=precision,
    )
    trainer = Trainer(model, strategy, cfg, out_dir=out_dir, collate_fn=collate_multimodal)
    return trainer.fit(data.train, data.val, data.test, resume=resume), model


def _build(name: str) -> Strategy:
    return build_strategy(name, **EXAMPLES[name].params)


def _check_plain(value: Any, where: str = "state") -> None:
    """JSON-able builtins (str-keyed dicts, lists, numbers, strings, None) and tensors only."""
    if value is None or isinstance(value, (bool, int, float, str, Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str), f"{where} has a non-str key {key!r}"
            _check_plain(item, f"{where}[{key!r}]")
    else:
        raise AssertionError(f"{where} is a {type(value).__name__}, not a builtin or a tensor")


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _without_strategy_record(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "strategy"} for row in strip_times(history)]


def test_every_registered_strategy_has_an_example() -> None:
    """Strategies the library registers (not ones a test or plugin adds) must be in the table."""
    modules = {n: strategy_class(n).__module__ for n in available_strategies()}
    assert_table_covers_library("strategies", modules, EXAMPLES, __file__)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_builds_by_name_and_describes_itself(name: str) -> None:
    strategy = _build(name)
    assert isinstance(strategy, strategy_class(name)) and strategy.name == name
    info = strategy.describe()
    assert info["name"] == name and info["uses_aux_losses"] == strategy.uses_aux_losses
    json.dumps(info)  # results.json holds it


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_state_dict_round_trip(name: str, data: DatasetSplits) -> None:
    """After 2 epochs the state is plain data, survives a weights-only load and loads back into a
    fresh instance, which then reports the same state."""
    trained = _build(name)
    _fit(data, trained, epochs=2, optimizer=EXAMPLES[name].optimizer)
    state = trained.state_dict()
    _check_plain(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=True)
    fresh = _build(name)
    fresh.load_state_dict(reloaded)
    assert _equal(fresh.state_dict(), state)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_resume_is_bit_exact(name: str, data: DatasetSplits, tmp_path: Path) -> None:
    """4 epochs straight = 2 epochs, then a fresh process-like resume to 4 (new objects)."""
    optimizer = EXAMPLES[name].optimizer
    full, m_full = _fit(data, _build(name), epochs=4, optimizer=optimizer)
    with interrupted_after(2):
        _fit(data, _build(name), epochs=4, optimizer=optimizer, out_dir=tmp_path)
    resumed, m_res = _fit(
        data, _build(name), epochs=4, optimizer=optimizer, out_dir=tmp_path, resume=True
    )
    assert strip_times(resumed.history) == strip_times(full.history)
    assert resumed.best_epoch == full.best_epoch
    assert resumed.test == full.test and resumed.test_last == full.test_last
    assert same_weights(m_full, m_res)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_trains_under_bf16_mixed_precision(name: str, data: DatasetSplits) -> None:
    """Every method's step works under autocast: methods that read the outputs again outside it
    (logit shares, prototypes, a shared head on the latents) get float32 outputs."""
    result, _ = _fit(
        data, _build(name), epochs=2, optimizer=EXAMPLES[name].optimizer, precision="bf16-mixed"
    )
    assert len(result.history) >= 1
    assert all(math.isfinite(row["train_loss"]) for row in result.history)


@pytest.mark.parametrize("case", NEUTRAL, ids=lambda c: f"{c.strategy}-is-{c.parent}")
def test_neutral_setting_is_the_parent_method(case: Neutral, data: DatasetSplits) -> None:
    parent = build_strategy(case.parent, **case.parent_params)
    for attribute, value in case.parent_attributes.items():
        setattr(parent, attribute, value)
    ref, m_ref = _fit(data, parent, epochs=4, optimizer=case.optimizer)
    neutral = build_strategy(case.strategy, **case.neutral)
    got, m_got = _fit(data, neutral, epochs=4, optimizer=case.optimizer)
    assert same_weights(m_ref, m_got)
    assert _without_strategy_record(got.history) == _without_strategy_record(ref.history)
    assert got.test == ref.test
    # the comparison can fail: the acting setting trains differently
    acting = build_strategy(case.strategy, **case.acting)
    _, m_acting = _fit(data, acting, epochs=4, optimizer=case.optimizer)
    assert not same_weights(m_ref, m_acting)
