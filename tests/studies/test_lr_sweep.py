"""Unimodal learning-rate sweep: argmax choice, cache hits, changed settings, bad cache files,
resuming an interrupted sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from miles.studies.lr_sweep import best_lrs, read_sweep, sweep_unimodal_lrs
from miles.training import experiment
from miles.training.experiment import ExperimentConfig
from miles.training.trainer import TrainerConfig
from tests.conftest import make_toy_splits

LRS = (1e-3, 3e-2)


@pytest.fixture(scope="module")
def small() -> Any:
    return make_toy_splits(n=(96, 48, 16))


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Count run_experiment calls (and keep their configs), still running the real thing."""
    calls: list[Any] = []
    real = experiment.run_experiment

    def spy(config: Any, **kwargs: Any) -> Any:
        calls.append(config)
        return real(config, **kwargs)

    monkeypatch.setattr(experiment, "run_experiment", spy)
    return calls


def _sweep(
    data: Any, cache: Path | None, *, seed: int = 0, batch_size: int = 32, **kw: Any
) -> dict[str, float]:
    base = ExperimentConfig(
        dataset="toy",
        latent_dim=8,
        trainer=TrainerConfig(epochs=5, seed=seed, batch_size=batch_size, progress=False),
    )
    args: dict[str, Any] = {"lrs": LRS, "epochs": 2, "cache_dir": cache, "echo": None}
    return sweep_unimodal_lrs(base, data, **{**args, **kw})


def test_best_lrs_by_hand() -> None:
    scores = {"a": {1e-3: 0.5, 1e-2: 0.7, 1e-1: 0.7}, "b": {1e-3: math.nan, 1e-2: 0.1}}
    assert best_lrs(scores) == {"a": 1e-2, "b": 1e-2}  # tie -> smaller; NaN never wins


def test_sweep_picks_argmax_and_caches(tmp_path: Path, small: Any, counted: list[Any]) -> None:
    lines: list[str] = []
    best = _sweep(small, tmp_path, echo=lines.append)
    # one unimodal trial per (modality, lr), each configured as asked
    assert len(counted) == 4
    assert {(c.strategy, c.strategy_params["modality"], c.trainer.lr) for c in counted} == {
        ("unimodal", m, lr) for m in small.modalities for lr in LRS
    }
    assert all(c.trainer.epochs == 2 and c.trainer.batch_size == 32 for c in counted)
    # one line per trial through the shared run loop, with the trial's validation score
    assert sum(": val " in line and "[lr-sweep] toy" in line for line in lines) == 4
    assert lines[-1] == f"[lr-sweep] toy: best {best}"
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    record = read_sweep(files[0])
    assert record["best"] == best and set(best) == set(small.modalities)
    for m in small.modalities:
        table = {t["lr"]: t["val"] for t in record["trials"] if t["modality"] == m}
        assert set(table) == set(LRS)
        top = max(table.values())
        assert best[m] == min(lr for lr, v in table.items() if v == top)

    # second call: instant, nothing retrained, same answer
    again = _sweep(small, tmp_path)
    assert again == best and len(counted) == 4


def test_changed_setting_recomputes(tmp_path: Path, small: Any, counted: list[Any]) -> None:
    _sweep(small, tmp_path, lrs=(1e-2,))
    assert len(counted) == 2
    _sweep(small, tmp_path, lrs=(1e-2,), seed=1)
    assert len(counted) == 4
    _sweep(small, tmp_path, lrs=(1e-2,), batch_size=16)
    assert len(counted) == 6
    assert len(list(tmp_path.glob("*.json"))) == 3
    _sweep(small, tmp_path, lrs=(1e-2,), seed=1)  # still cached
    assert len(counted) == 6


def test_corrupt_cache_warns_and_recomputes(tmp_path: Path, small: Any, counted: list[Any]) -> None:
    best = _sweep(small, tmp_path, lrs=(1e-2,))
    (path,) = tmp_path.glob("*.json")
    path.write_text("{not json", encoding="utf-8")
    with pytest.warns(RuntimeWarning, match="unusable learning-rate sweep cache"):
        again = _sweep(small, tmp_path, lrs=(1e-2,))
    # recomputed from the finished trial runs, which are only read, not trained again
    assert again == best and len(counted) == 2
    assert json.loads(path.read_text())["best"] == best  # rewritten
    payload = json.loads(path.read_text())
    payload["settings"]["lrs"] = [5.0]  # a hand-edited file no longer matches its name
    path.write_text(json.dumps(payload), encoding="utf-8")
    with pytest.warns(RuntimeWarning, match="settings differ"):
        _sweep(small, tmp_path, lrs=(1e-2,))
    assert len(counted) == 2


def test_interrupted_sweep_resumes(
    tmp_path: Path, small: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[float] = []
    real = experiment.run_experiment

    def interrupt_third(config: Any, **kwargs: Any) -> Any:
        calls.append(config.trainer.lr)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(config, **kwargs)

    monkeypatch.setattr(experiment, "run_experiment", interrupt_third)
    with pytest.raises(KeyboardInterrupt):
        _sweep(small, tmp_path)
    calls.clear()
    monkeypatch.setattr(
        experiment, "run_experiment", lambda c, **k: calls.append(1) or real(c, **k)
    )
    _sweep(small, tmp_path)
    assert len(calls) == 2  # the interrupted trial and the one never started


def test_no_cache_dir_always_trains(small: Any, counted: list[Any]) -> None:
    _sweep(small, None, lrs=(1e-2,))
    _sweep(small, None, lrs=(1e-2,))
    assert len(counted) == 4


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"lrs": ()}, "at least one"),
        ({"lrs": (1e-3, -1.0)}, "every lr must be a finite number > 0"),
        ({"lrs": (1e-3, 1e-3)}, "duplicates"),
    ],
)
def test_bad_arguments(small: Any, kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _sweep(small, None, **kw)
    with pytest.raises(TypeError, match="ExperimentConfig"):
        sweep_unimodal_lrs({"dataset": "toy"}, small, epochs=1)  # type: ignore[arg-type]


def test_all_diverged_is_an_error_not_a_choice() -> None:

    with pytest.raises(FloatingPointError, match="every candidate learning rate diverged"):
        best_lrs({"a": {1e-3: float("nan"), 3e-3: float("nan")}})
    assert best_lrs({"a": {1e-3: float("nan"), 3e-3: 0.5}}) == {"a": 3e-3}
