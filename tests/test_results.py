"""Typed results and the one definition of every reported number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from miles.data import collate_multimodal
from miles.models import JointFusionModel
from miles.results import (
    EpochRecord,
    RunResult,
    acted_epochs,
    chosen_epoch,
    dominant_order,
    factors_in_force,
    heads_at_last_epoch,
    idle_reasons,
    load_result,
    run_row,
    signed_gap,
    slowed_epochs,
)
from miles.strategies import build_strategy
from miles.training import Trainer, TrainerConfig
from tests.handmade import joint_result, miles_result


def test_epoch_record_round_trips_the_trainers_rows(toy) -> None:  # type: ignore[no-untyped-def]
    import torch

    torch.manual_seed(0)
    model = JointFusionModel(toy.build_encoders(8), toy.num_classes, "concat")
    trainer = Trainer(
        model,
        build_strategy("miles", tau=0.0),
        TrainerConfig(epochs=2, progress=False),
        collate_fn=collate_multimodal,
    )
    result = trainer.fit(toy.train, toy.val, toy.test)
    for row in result.history:
        record = EpochRecord.from_dict(row)
        back = record.to_dict()
        assert back == row and list(back) == list(row)  # same keys, same order
        assert record.val == {m: row[f"val_{m}"] for m in toy.modalities}
        assert set(record.lrs) == {*toy.modalities, "shared"}
        assert record.decision == row["strategy"]["decision"]
    # the typed view of the whole result, and its JSON round trip
    again = RunResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again == result and again.to_dict()["kind"] == "run"
    assert [r.epoch for r in again.records] == [1, 2]


def test_bad_rows_and_results_name_what_is_wrong(tmp_path: Path) -> None:
    row = miles_result()["history"][0]
    with pytest.raises(ValueError, match=r"lacks \['val_fused'\]"):
        EpochRecord.from_dict({k: v for k, v in row.items() if k != "val_fused"})
    with pytest.raises(ValueError, match="unknown keys"):
        EpochRecord.from_dict(row | {"mystery": 1})
    with pytest.raises(ValueError, match="not a run result"):
        RunResult.from_dict(miles_result() | {"kind": "compare"})
    damaged = tmp_path / "result.json"
    damaged.write_text('{"best_epoch": 1', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"damaged run result {damaged}: not valid JSON"):
        load_result(tmp_path)
    damaged.write_text(json.dumps({"best_epoch": 1}), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"damaged run result {damaged}: run result lacks"):
        load_result(damaged)
    with pytest.raises(FileNotFoundError, match="no run result"):
        load_result(tmp_path / "missing")


def test_acted_and_slowed_epochs_come_from_the_factors_trained_with() -> None:
    res = miles_result()
    assert factors_in_force(res) == [
        {"a": 1.0, "b": 1.0},
        {"a": 0.5, "b": 1.0},
        {"a": 0.5, "b": 1.0},  # no decision after epoch 2: the factors stay
        {"a": 1.0, "b": 1.0},
    ]
    assert acted_epochs(res) == [2, 3]  # the decision after the last epoch never counts
    assert slowed_epochs(res) == {"a": [2, 3], "b": []}
    assert idle_reasons(res) == {"balanced": 1}  # epoch 4 trained at full rate
    # mu = 1: MILES "slows" a modality by a factor of 1, which never acts
    assert acted_epochs(miles_result(mu_one=True)) == []
    assert idle_reasons(miles_result(mu_one=True)) == {
        "slowed": 1,
        "no decision (fused metric 0)": 1,
        "balanced": 1,
    }
    # a strategy that records no decisions has no such numbers at all
    assert acted_epochs(joint_result()) is None and slowed_epochs(joint_result()) is None


def test_run_row_and_the_other_definitions() -> None:
    res = miles_result()
    row = run_row(res)
    assert row["acted"] == 2 and row["acted_epochs"] == [2, 3]
    assert row["slowed_a"] == 2 and row["slowed_b"] == 0
    assert row["best_epoch"] == chosen_epoch(res) == 3
    assert heads_at_last_epoch(res) == {"a": pytest.approx(0.68), "b": pytest.approx(0.78)}
    assert row["a_last"] == pytest.approx(0.68) and row["fused_last"] == pytest.approx(0.89)
    assert run_row(joint_result())["acted"] is None
    assert signed_gap({"a": 0.7, "b": 0.8}, ["b", "a"]) == pytest.approx(0.1)
    assert signed_gap({"a": 0.7, "b": 0.8}, ["a", "b"]) == pytest.approx(-0.1)  # signed


def test_dominant_order_rules() -> None:
    joint = [{"method": "joint", "label": "", "a": 0.4, "b": 0.9}]
    refs = [
        {"method": "unimodal", "label": "a", "a": 0.95, "b": 0.1},
        {"method": "unimodal", "label": "b", "a": 0.1, "b": 0.85},
    ]
    assert dominant_order(joint + refs, ["a", "b"]) == (["a", "b"], "unimodal reference (test)")
    assert dominant_order(joint, ["a", "b"]) == (["b", "a"], "head under joint training (test)")
    order, rule = dominant_order([{"method": "miles", "a": 0.1, "b": 0.9}], ["a", "b"])
    assert order == ["a", "b"] and rule.startswith("modality order")
    # a failed reference does not count
    failed = [refs[0], {"method": "unimodal", "label": "b", "failed": "nan"}]
    assert dominant_order(failed + joint, ["a", "b"])[1].startswith("head under joint")
