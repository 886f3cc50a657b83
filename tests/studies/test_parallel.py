"""Runs on worker processes: the same numbers as in one process, shared folders trained once, and
the read-outs (the fixed epoch's weights, the probes) exactly as defined."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import miles.training.experiment as experiment
from miles.studies.config import quiet_base
from miles.studies.parallel import RunTask, run_parallel
from miles.studies.readouts import READOUTS, Readouts, fit_probe, snapshot_name
from miles.studies.runner import PlannedRun


def _run(
    root: Path,
    name: str,
    *,
    epochs: int = 1,
    folder: str | None = None,
    strategy: str = "joint+aux",
    **params: Any,
) -> PlannedRun:
    base = dataclasses.replace(
        quiet_base(epochs=epochs),
        dataset="mfeat-pix-fou",
        latent_dim=8,
        strategy=strategy,
        strategy_params=params,
    )
    base.out_dir = str(root / (folder or name))
    return PlannedRun(base, {"method": strategy, "label": name, "seed": 0}, name)


class Marker(RunTask):
    """Leaves a file in the run folder after each run (a picklable task)."""

    def after(self, run: PlannedRun, result: Any, data: Any) -> None:
        assert run.run_dir is not None
        (run.run_dir / "marker.txt").write_text(str(result["best_epoch"]))


def test_shared_folders_train_once_and_outcomes_keep_the_plan_order(tmp_path: Path) -> None:
    runs = [_run(tmp_path, "a"), _run(tmp_path, "b"), _run(tmp_path, "a again", folder="a")]
    lines: list[str] = []
    batch = run_parallel(runs, workers=1, echo=lines.append, task=Marker())
    assert lines[0] == "3 runs planned (2 distinct), 0 already done, 2 to train on 1 process"
    assert [o.run.name for o in batch.outcomes] == ["a", "b", "a again"]
    assert [o.trained for o in batch.outcomes] == [True, True, False]
    assert batch.outcomes[0].result == batch.outcomes[2].result
    assert (tmp_path / "a" / "marker.txt").is_file()


def test_two_workers_give_the_numbers_of_one(tmp_path: Path) -> None:
    one = run_parallel([_run(tmp_path / "one", n) for n in "ab"], workers=1, echo=lambda _m: None)
    lines: list[str] = []
    two = run_parallel([_run(tmp_path / "two", n) for n in "ab"], workers=2, echo=lines.append)
    assert "on 2 processes" in lines[0] and len(lines) == 3
    for x, y in zip(one.outcomes, two.outcomes, strict=True):
        assert x.result is not None and y.result is not None
        assert x.result["test"] == y.result["test"] and x.result["val"] == y.result["val"]
        assert [r["val_fused"] for r in x.result["history"]] == [
            r["val_fused"] for r in y.result["history"]
        ]


def test_a_finished_study_is_read_not_trained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = [_run(tmp_path, "a")]
    run_parallel(runs, workers=1, echo=lambda _m: None)
    monkeypatch.setattr(experiment, "run_experiment", lambda *a, **k: pytest.fail("trained"))
    lines: list[str] = []
    again = run_parallel(runs, workers=1, echo=lines.append)
    assert lines[-1] == "[1/1] a: done earlier" and not again.outcomes[0].trained


def test_readouts_fixed_epoch_is_that_epoch_and_probes_are_scored(tmp_path: Path) -> None:
    """The 2-epoch run's weights after epoch 1 are those of the same run stopped at epoch 1:
    its 'fixed epoch' heads must equal the 1-epoch run's last-epoch heads, bit for bit."""
    task = Readouts(fixed_epoch=1, probe=True)
    long, short = _run(tmp_path, "long", epochs=2), _run(tmp_path, "short", epochs=1)
    batch = run_parallel([long, short], workers=1, echo=lambda _m: None, task=task)
    readouts = json.loads((tmp_path / "long" / READOUTS).read_text())
    assert (tmp_path / "long" / snapshot_name(1)).is_file()
    short_result = batch.outcomes[1].result
    assert short_result is not None
    assert readouts["test_fixed"] == short_result["test_last"]
    assert set(readouts["probe"]) == {"chosen", "last", "fixed"}
    for scores in readouts["probe"].values():
        assert set(scores) == {"pix", "fou"} and all(0.1 < v <= 1.0 for v in scores.values())
    unimodal = _run(tmp_path, "uni", strategy="unimodal", modality="pix")
    run_parallel([unimodal], workers=1, echo=lambda _m: None, task=task)
    assert not (tmp_path / "uni" / READOUTS).exists()  # its other encoder never trained


def test_probe_separates_separable_latents_and_not_noise() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    centers = 3 * torch.randn(4, 6, generator=g)
    train = centers[y] + 0.3 * torch.randn(200, 6, generator=g)
    test = centers[y] + 0.3 * torch.randn(200, 6, generator=g)

    def accuracy(logits: torch.Tensor) -> float:
        return float((logits.argmax(1) == y).float().mean())

    assert fit_probe(train, y, test, 4, accuracy) == 1.0
    noise = torch.randn(200, 6, generator=g)
    assert fit_probe(noise, y, torch.randn(200, 6, generator=g), 4, accuracy) < 0.5
