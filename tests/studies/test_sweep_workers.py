"""Several `miles sweep` workers on one study: started at the same instant on a fresh database
(SQLite and PostgreSQL), and on a real PostgreSQL server with a worker killed mid-trial."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest

from miles.studies import optuna_study, search_space
from tests.postgres import create_database, postgres_server

ROOT = Path(__file__).resolve().parents[2]
RETRY_OF = optuna_study.RETRY_OF
MODALITIES = ("strong", "weak")  # the toy task's (tests/studies/sweep_plugin.py)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server for this module's tests (skipped where none can be started)."""
    with postgres_server() as url:
        yield url


def expected_params(trials: int, seed: int = 0) -> list[dict[str, Any]]:
    """What an uninterrupted single-process sweep samples for trials 0..trials-1."""
    study = optuna.create_study(sampler=optuna_study.make_sampler("random", seed))
    params = []
    for _ in range(trials):
        trial = study.ask()
        params.append(search_space.suggest(trial, "miles", MODALITIES))
        study.tell(trial, 0.0)
    return params


def _worker(url: str, name: str, trials: int, barrier: Any, errors: Any) -> None:
    """One worker, forked. All workers open the study at the same instant, then claim trials in
    lock-step rounds (each round, every worker claims at the same instant), as `miles sweep`
    does; the objective only samples, so a trial takes milliseconds."""
    try:
        barrier.wait(timeout=60)
        shared = optuna_study.open_study(
            url, name, sampler="random", seed=0, stale_after=30, settings={"test": 1}
        )
        for _ in range(-(-trials // barrier.parties) + 1):
            barrier.wait(timeout=60)  # a round ends when the last of its trials has finished
            claim = shared.claim(trials)
            if claim.trial is not None:
                shared.run(
                    claim.trial, lambda t: search_space.suggest(t, "miles", MODALITIES)["lr"]
                )
    except BaseException:
        errors.put(f"worker {os.getpid()}:\n{traceback.format_exc()}")
        raise


def _start_together(url: str, workers: int, trials: int) -> None:
    ctx = mp.get_context("fork")  # the workers need no imports of their own: they start at once
    barrier, errors = ctx.Barrier(workers), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(url, "s", trials, barrier, errors))
        for _ in range(workers)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert not failures, "\n".join(failures)
    assert [p.exitcode for p in procs] == [0] * workers


def _check_trials_once_each(url: str, trials: int) -> None:
    study = optuna.load_study(study_name="s", storage=url)
    assert len(optuna.get_all_study_summaries(url)) == 1
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * trials  # none more, none lost
    assert [t.params for t in study.trials] == expected_params(trials)


def test_workers_starting_together_on_a_fresh_sqlite_database(tmp_path: Path) -> None:
    """Today's failures: a worker crashed at start-up (`table studies already exists`,
    `IntegrityError ... alembic_version`), and workers claiming together could start more
    trials than asked for. Each try is a fresh database; the second round of claims finds 4 of
    6 trials finished, so 4 workers claiming at once must start exactly 2."""
    for attempt in range(2):
        url = f"sqlite:///{tmp_path / f'try{attempt}' / 'sweep.db'}"
        _start_together(url, workers=4, trials=6)
        _check_trials_once_each(url, trials=6)


def test_workers_starting_together_on_a_fresh_postgres_database(postgres_url: str) -> None:
    for attempt in range(2):
        url = create_database(postgres_url, f"together{attempt}")
        _start_together(url, workers=4, trials=6)
        _check_trials_once_each(url, trials=6)


def _sweep(out: Path, url: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "miles",
        "--plugin",
        "tests.studies.sweep_plugin",
        "sweep",
        "--dataset",
        "sweep-toy",
        "--method",
        "miles",
        "--trials",
        "6",
        "--epochs",
        "1",
        "--latent-dim",
        "8",
        "--rerun-seeds",
        "0",
        "--stale-after",
        "2",
        "--storage",
        url,
        "--study-name",
        "killed",
        "--out",
        str(out),
        *extra,
    ]


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def _wait_for(what: str, done: Any, procs: list[subprocess.Popen[str]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        for p in procs:
            if p.poll() is not None:
                out, _ = p.communicate()
                pytest.fail(f"worker exited ({p.returncode}) before {what}:\n{out}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_two_workers_on_postgres_rerun_a_killed_workers_trial(
    postgres_url: str, tmp_path: Path
) -> None:
    """Two `miles sweep` processes on one PostgreSQL study of 6 trials: worker A is killed
    (SIGKILL) in the middle of its trial while B runs others; B waits, finds A's trial silent
    for --stale-after, re-runs it with the same parameters, and finishes the study. Every
    trial is trained exactly once to the end, none is lost or duplicated."""
    hung = tmp_path / "hung"
    a = subprocess.Popen(
        _sweep(tmp_path / "a", postgres_url),
        cwd=ROOT,
        env=_env(MILES_TEST_HANG_MARKER=str(hung)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    b = subprocess.Popen(
        _sweep(tmp_path / "b", postgres_url, "--wait"),
        cwd=ROOT,
        env=_env(MILES_TEST_START_AFTER=str(hung)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for("worker A hangs in its trial", hung.exists, [a, b], timeout=120)

        def trials() -> list[optuna.trial.FrozenTrial]:
            return optuna.load_study(study_name="killed", storage=postgres_url).trials

        _wait_for("worker B starts a trial", lambda: len(trials()) >= 2, [a, b], timeout=120)
        a.send_signal(signal.SIGKILL)  # mid-trial: A's trial stays RUNNING in the database
        a.communicate(timeout=30)
        out, _ = b.communicate(timeout=120)
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert a.returncode == -signal.SIGKILL
    assert b.returncode == 0, out

    study = optuna.load_study(study_name="killed", storage=postgres_url)
    by_state: dict[str, list[optuna.trial.FrozenTrial]] = {}
    for t in study.trials:
        by_state.setdefault(t.state.name, []).append(t)
    (killed,) = by_state.pop("FAIL")  # A's trial, failed by B once its heartbeat stopped
    complete = by_state.pop("COMPLETE")
    assert not by_state and len(complete) == 6  # nothing running, waiting or pruned is left
    (rerun,) = [t for t in complete if RETRY_OF in t.user_attrs]
    assert rerun.user_attrs[RETRY_OF] == killed.number and rerun.params == killed.params
    # the six finished parameter sets are an uninterrupted sweep's, each once
    assert sorted(map(str, (t.params for t in complete))) == sorted(map(str, expected_params(6)))
    # each trial trained to the end exactly once, all by B; A's run folder has no result
    results = sorted(p.parent.name for p in tmp_path.glob("*/killed/trials/*/result.json"))
    assert results == sorted(f"trial{t.number:04d}" for t in complete)
    assert all(Path(t.user_attrs["run_dir"]).is_relative_to(tmp_path / "b") for t in complete)
    assert (tmp_path / "a" / "killed" / "trials" / f"trial{killed.number:04d}").is_dir()
    assert f"interrupted trials [{killed.number}]" in out


def test_each_backend_gets_its_lock_or_none() -> None:
    """SQLite: a lock file beside the database; PostgreSQL: an advisory lock (no connection is
    made until it is taken); a backend without one: None, and the sweep warns."""
    from miles.studies import storage

    assert isinstance(storage.storage_lock("sqlite:////tmp/x/sweep.db"), storage._FileLock)
    assert storage.storage_lock("sqlite://") is not None  # in memory: one process, no lock needed
    assert isinstance(storage.storage_lock("postgresql://u@db/x"), storage._AdvisoryLock)
    assert storage.storage_lock("mysql://u@db/x") is None


def test_a_password_in_the_storage_url_is_never_written(tmp_path: Path) -> None:
    from miles.studies.config import quiet_base
    from miles.studies.storage import shown
    from miles.studies.sweep import SweepConfig

    url = "postgresql://miles:s3cret@db.example:5432/sweeps"
    assert "s3cret" not in shown(url) and shown(url).startswith("postgresql://miles:***@db")
    cfg = SweepConfig(base=quiet_base(epochs=1), storage=url, out_dir=str(tmp_path))
    assert "s3cret" not in str(cfg.to_dict()) and cfg.storage_url == url


def test_without_a_postgres_server_the_fixture_skips_or_fails_in_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tests.postgres as pg

    monkeypatch.setattr(pg, "server_binaries", lambda: None)
    for name in ("CI", "MILES_REQUIRE_POSTGRES"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install postgresql"):
        pg.postgres_server().__enter__()
    monkeypatch.setenv("MILES_REQUIRE_POSTGRES", "1")
    with pytest.raises(pytest.fail.Exception, match="required in CI"):
        pg.postgres_server().__enter__()


def test_a_trial_failed_meanwhile_by_another_worker_keeps_that_state(tmp_path: Path) -> None:
    """This worker was silent past the grace period (paused, say): another worker failed its
    trial and re-queued it. Finishing here must not overwrite that: a warning, no error."""
    shared = optuna_study.open_study(
        f"sqlite:///{tmp_path / 'sweep.db'}",
        "s",
        sampler="random",
        seed=0,
        stale_after=30,
        settings={"test": 1},
    )
    claim = shared.claim(trials=2)
    assert claim.trial is not None

    def objective(trial: optuna.Trial) -> float:
        search_space.suggest(trial, "miles", MODALITIES)
        trial_id = shared.storage.get_trial_id_from_study_id_trial_number(
            shared.storage.get_study_id_from_name("s"), trial.number
        )
        shared.storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)  # "them"
        return 0.5

    with pytest.warns(RuntimeWarning, match="declared dead by another worker"):
        shared.run(claim.trial, objective)
    assert [t.state.name for t in shared.study.trials] == ["FAIL"]
    again = shared.claim(trials=2)  # the next claim re-queues it with its parameters
    assert again.requeued == [0] and again.trial is not None
    rerun = search_space.suggest(again.trial, "miles", MODALITIES)  # the enqueued parameters
    assert rerun == shared.study.trials[0].params
