"""``kill -9`` at seeded points during ``miles train``, ``compare``, ``sweep`` and ``prepare``;
then the same command again: the outputs equal an uninterrupted run's, bit for bit.

Each case draws a few kill points among the writes an uninterrupted run makes (in the middle of a
temporary file, before its rename, after it: see :mod:`tests.faults.helpers`) plus one kill after a
seeded random delay, kills a forked child at each in turn (each one resuming the last), finishes
the command and compares. The default run holds one or two cases per command; ``MILES_FAULTS=full``
runs them all. A failing case names its seed and points, so it can be replayed.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from miles.cli import main
from tests.faults import helpers
from tests.faults.helpers import (
    SEED,
    TOY,
    TRAIN_YAML,
    assert_same_outputs,
    count_events,
    interrupted,
    kill_points,
    run_outputs,
    temp_files,
    timeless,
)

FULL = pytest.mark.faults_full
#: kill points per case, and whether a seeded-delay kill follows them
POINTS = 3


@dataclass
class Reference:
    """An uninterrupted run: its folder, its events per kind, how long it took."""

    out: Path
    counts: dict[str, int]
    seconds: float


def _reference(run: Callable[[Path], Any], root: Path, *, warm_up: bool = True) -> Reference:
    """Run ``run(folder)`` once to warm up (the imports a first run pays), then into
    ``root/"ref"``, timed and with its events counted."""
    if warm_up:
        run(root / "warm-up")
    out = root / "ref"
    start = time.perf_counter()
    counts = count_events(lambda: run(out))
    return Reference(out, counts, time.perf_counter() - start)


def _campaign(
    name: str, ref: Reference, run: Callable[[bool], int | None], tmp_path: Path
) -> list[tuple[str, int]]:
    """Kill ``run`` at the case's seeded points and once after a seeded delay (each kill
    resuming the last); returns the points, for the failure message."""
    points = kill_points(name, ref.counts, POINTS)
    delay = random.Random(f"{SEED}:{name}:delay").uniform(0.2, 0.9) * ref.seconds
    statuses = interrupted(run, points, tmp_path, delays=[delay])
    assert set(statuses) <= {0, -9}, (name, points, statuses)
    return points


# -- miles train -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_ref(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    helpers.register_toy_dataset()
    root = tmp_path_factory.mktemp("train-ref")
    config = root / "run.yaml"
    config.write_text(TRAIN_YAML, encoding="utf-8")
    return _reference(lambda out: _train(config, out)(False), root)


def _train(config: Path, out: Path) -> Callable[[bool], int | None]:
    def run(resume: bool) -> int:
        resumed = ["--resume"] if resume else []
        return main(["train", "--config", str(config), "--out", str(out), "--quiet", *resumed])

    return run


@pytest.mark.parametrize("case", [0, 1, *(pytest.param(i, marks=FULL) for i in range(2, 10))])
def test_train_killed_then_resumed_is_the_uninterrupted_run(
    tmp_path: Path, train_ref: Reference, case: int
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(TRAIN_YAML, encoding="utf-8")
    out = tmp_path / "out"
    run = _train(config, out)
    points = _campaign(f"train-{case}", train_ref, run, tmp_path)
    assert run(True) == 0, points
    assert_same_outputs(run_outputs(out), run_outputs(train_ref.out))
    assert temp_files(out) == [], points


# -- miles compare ---------------------------------------------------------------------------------


def _compare(out: Path) -> Callable[[bool], int | None]:
    argv = ["compare", "--dataset", TOY, "--methods", "joint+aux,miles", "--fusion", "concat",
            "--seeds", "2", "--epochs", "2", "--lr", "0.05", "--batch-size", "32",
            "--latent-dim", "8", "--out", str(out), "--quiet"]  # fmt: skip
    return lambda _resume: main(argv)


def _compare_outputs(out: Path) -> dict[str, Any]:
    payload = timeless(json.loads((out / "compare.json").read_text()))
    payload["config"].pop("out_dir")
    runs = {
        str(p.parent.relative_to(out)): run_outputs(p.parent)
        for p in sorted(out.glob("runs/**/result.json"))
    }
    return {"compare": payload, "runs": runs}


@pytest.fixture(scope="module")
def compare_ref(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    helpers.register_toy_dataset()
    return _reference(lambda out: _compare(out)(False), tmp_path_factory.mktemp("compare-ref"))


@pytest.mark.parametrize("case", [0, *(pytest.param(i, marks=FULL) for i in range(1, 5))])
def test_compare_killed_then_rerun_gives_the_same_tables_and_runs(
    tmp_path: Path, compare_ref: Reference, case: int
) -> None:
    out = tmp_path / "cmp"
    run = _compare(out)
    points = _campaign(f"compare-{case}", compare_ref, run, tmp_path)
    assert run(True) == 0, points
    got, want = _compare_outputs(out), _compare_outputs(compare_ref.out)
    assert got["compare"] == want["compare"], points
    assert got["runs"].keys() == want["runs"].keys()
    for where in want["runs"]:
        assert_same_outputs(got["runs"][where], want["runs"][where])
    assert temp_files(out) == [], points


# -- miles sweep -----------------------------------------------------------------------------------

#: a sweep trial left running by a killed worker is re-run once silent this long (seconds)
STALE = 1


def _sweep(out: Path) -> Callable[[bool], int | None]:
    argv = ["sweep", "--dataset", TOY, "--method", "miles", "--trials", "2", "--rerun-seeds",
            "1", "--epochs", "2", "--batch-size", "32", "--latent-dim", "8", "--stale-after",
            str(STALE), "--out", str(out), "--quiet"]  # fmt: skip
    return lambda _resume: main(argv)


def _sweep_outputs(out: Path) -> dict[str, Any]:
    """What must not depend on interruptions: the completed trials' parameters and values, the
    best parameters and the re-runs (trial numbers and failed trials may differ)."""
    (study,) = [p for p in out.iterdir() if p.is_dir()]
    payload = json.loads((study / "sweep.json").read_text())
    done = sorted(
        (json.dumps(t["params"], sort_keys=True), t["val"], t["test"])
        for t in payload["trials"]
        if t["state"] == "COMPLETE"
    )
    rerun = sorted(study.glob("rerun/*/seed*/result.json"))
    return {
        "trials": done,
        "best": (payload["best"]["params"], payload["best"]["val"]),
        "aggregate": timeless(payload["aggregate"]),
        "reruns": [run_outputs(p.parent) for p in rerun],
    }


@pytest.fixture(scope="module")
def sweep_ref(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    pytest.importorskip("optuna")
    import miles.studies.sweep  # noqa: F401  (the imports a first sweep pays: no timed warm-up)

    helpers.register_toy_dataset()
    root = tmp_path_factory.mktemp("sweep-ref")
    return _reference(lambda out: _sweep(out)(False), root, warm_up=False)


@pytest.mark.parametrize("case", [0, *(pytest.param(i, marks=FULL) for i in range(1, 4))])
def test_sweep_killed_then_rerun_finds_the_same_best_and_reruns(
    tmp_path: Path, sweep_ref: Reference, case: int
) -> None:
    out = tmp_path / "sw"
    run = _sweep(out)
    points = _campaign(f"sweep-{case}", sweep_ref, run, tmp_path)
    for _ in range(4):  # a killed worker's trial is re-run once its heartbeat is stale
        time.sleep(STALE + 0.5)
        assert run(True) == 0, points
        (study,) = [p for p in out.iterdir() if p.is_dir()]
        if list(study.glob("rerun/*/seed0/result.json")):
            break
    got, want = _sweep_outputs(out), _sweep_outputs(sweep_ref.out)
    assert got["trials"] == want["trials"], points
    assert got["best"] == want["best"] and got["aggregate"] == want["aggregate"], points
    assert len(got["reruns"]) == len(want["reruns"]) == 1
    assert_same_outputs(got["reruns"][0], want["reruns"][0])
    assert temp_files(study / "rerun") == [], points


# -- miles prepare ---------------------------------------------------------------------------------


def _prepare(raw: Path, out: Path) -> Callable[[bool], int | None]:
    argv = ["prepare", helpers.TEXT, "--raw", str(raw), "--out", str(out), "--quiet"]
    return lambda _resume: main(argv)


def _cache(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def prepare_ref(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    helpers.register_text_preparer()
    root = tmp_path_factory.mktemp("prepare-ref")
    raw = helpers.text_raw(root / "raw", n=200)
    return _reference(lambda out: _prepare(raw, out)(False), root)


@pytest.mark.parametrize("case", [0, *(pytest.param(i, marks=FULL) for i in range(1, 5))])
def test_prepare_killed_then_rerun_writes_the_same_cache(
    tmp_path: Path, prepare_ref: Reference, case: int
) -> None:
    raw = helpers.text_raw(tmp_path / "raw", n=200)
    out = tmp_path / "cache"
    run = _prepare(raw, out)
    points = _campaign(f"prepare-{case}", prepare_ref, run, tmp_path)
    assert run(True) == 0, points
    got, want = _cache(out), _cache(prepare_ref.out)
    assert got.keys() == want.keys(), points
    for name in want:
        if name == "manifest.json":  # the raw folder's path differs; everything else may not
            assert timeless(json.loads(got[name])) == timeless(json.loads(want[name]))
        else:
            assert got[name] == want[name], (name, points)
    assert temp_files(out) == [], points
