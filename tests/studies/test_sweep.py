"""`miles sweep`: seeded sampling, best-on-validation selection, resuming a killed sweep."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import optuna
import pytest

import miles.training.experiment as experiment
from miles.cli import main
from miles.data import DatasetSplits, build_dataset
from miles.results import RunResult
from miles.strategies import available_strategies
from miles.studies import optuna_study, search_space
from miles.studies.config import quiet_base
from miles.studies.sweep import SweepConfig, run_sweep, select_best, study_slug

SMALL = {"max_train": 60}
quiet = {"echo": lambda _m: None}
RETRY_OF = optuna_study.RETRY_OF


@pytest.fixture(scope="module")
def data() -> DatasetSplits:
    """Built once: reading FSDD-MNIST costs seconds, a 60-sample run a fraction of one."""
    return build_dataset("fsdd-mnist", **SMALL)


def _config(tmp_path: Path, *, seed: int = 0, epochs: int = 1, **kw: Any) -> SweepConfig:
    base = quiet_base(epochs=epochs, seed=seed)
    base = dataclasses.replace(base, dataset_params=dict(SMALL), latent_dim=8)
    fields: dict[str, Any] = {
        "base": base,
        "method": "miles",
        "trials": 3,
        "rerun_seeds": 0,
        "out_dir": str(tmp_path / "out"),
        "storage": f"sqlite:///{tmp_path / 'sweep.db'}",
    }
    return SweepConfig(**(fields | kw))


def _val_of(lr: float) -> float:
    """A validation metric with one optimum (lr = 1e-3) and no ties between sampled rates."""
    return 0.9 - 0.1 * abs(math.log10(lr) + 3)


class FakeRuns:
    """Stands in for ``run_experiment``: records each call, fails where told, returns results
    whose validation metric is a known function of the learning rate (no training)."""

    def __init__(self, fail_on_call: int | None = None, exc: BaseException | None = None):
        self.calls: list[dict[str, Any]] = []
        self.fail_on_call, self.exc = fail_on_call, exc

    def __call__(self, config: Any, **_kw: Any) -> RunResult:
        self.calls.append({"lr": config.trainer.lr, **config.strategy_params})
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            assert self.exc is not None
            raise self.exc
        val = _val_of(config.trainer.lr)
        scores = {"fused": val, "unimodal": {"audio": val / 2, "image": val / 3}}
        return RunResult(
            best_epoch=1,
            epochs_run=1,
            val=scores,
            test={"fused": val - 0.05, "unimodal": scores["unimodal"]},
            test_last=None,
            history=[],
            strategy={"name": config.strategy},
            config={"seed": config.trainer.seed},
            wall_time_s=0.0,
        )


def _params(payload: dict[str, Any], state: str = "COMPLETE") -> list[dict[str, Any]]:
    return [t["params"] for t in payload["trials"] if t["state"] == state]


def test_search_spaces_cover_every_method_but_unimodal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spaces = search_space.SEARCH_SPACES
    assert set(spaces) | set(search_space.NOT_SWEEPABLE) == set(available_strategies())
    for method, space in spaces.items():
        assert space[0] == search_space.LR, method  # every method tunes its learning rate
    with pytest.raises(ValueError, match="cannot be swept"):
        _config(tmp_path, method="unimodal")
    with pytest.raises(ValueError, match="no search space"):
        search_space.search_space("no-such-method")
    assert main(["sweep", "--method", "unimodal", "--out", str(tmp_path)]) == 2
    assert "miles sweep: error: method 'unimodal' cannot be swept" in capsys.readouterr().err


def test_search_space_to_run_settings() -> None:
    study = optuna.create_study(sampler=optuna_study.make_sampler("random", 0))
    trial = study.ask()
    params = search_space.suggest(trial, "mslr-s", ["audio", "image"])
    assert list(params) == ["lr", "unimodal_lrs.audio", "unimodal_lrs.image", "smoothing"]
    lr, strategy_params = search_space.run_settings("mslr-s", params, ["audio", "image"])
    assert lr == params["lr"] and 1e-4 <= lr <= 1e-2
    assert strategy_params == {
        "unimodal_lrs": {
            "audio": params["unimodal_lrs.audio"],
            "image": params["unimodal_lrs.image"],
        },
        "smoothing": params["smoothing"],
    }
    gblend = search_space.suggest(study.ask(), "gblend", ["audio", "image"])
    assert isinstance(gblend["super_epoch"], int) and 2 <= gblend["super_epoch"] <= 10


def test_real_sweep_selects_best_on_validation_and_reruns(
    tmp_path: Path, data: DatasetSplits, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _config(tmp_path, rerun_seeds=2)
    payload = run_sweep(cfg, data=data, **quiet)
    assert cfg.study_dir == tmp_path / "out" / "fsdd-mnist-miles-concat"
    trials = payload["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE"] * 3
    best = max(trials, key=lambda t: (t["val"], -t["number"]))  # ties: the lowest number
    assert payload["best"]["number"] == best["number"]
    assert payload["best"]["test"] == best["test"]
    for t in trials:  # the run's own record agrees with the trial table
        assert Path(t["run_dir"]).parent == cfg.study_dir / "trials"
        result = json.loads((Path(t["run_dir"]) / "result.json").read_text())
        assert result["val"]["fused"] == pytest.approx(t["val"])
        assert result["test"]["fused"] == pytest.approx(t["test"])
    (agg,) = payload["aggregate"]
    assert agg["n"] == 2 and payload["kind"] == "sweep"
    fused = [r["fused"] for r in payload["rows"]]
    assert agg["fused_mean"] == pytest.approx(sum(fused) / 2)
    assert [r["seed"] for r in payload["rows"]] == [0, 1]
    md = (cfg.study_dir / "sweep.md").read_text()
    assert f"**Best trial {best['number']}**" in md and "mean ± std" in md
    assert json.loads((cfg.study_dir / "sweep.json").read_text())["best"] == payload["best"]

    # a finished sweep run again trains nothing, not even the re-runs
    monkeypatch.setattr(experiment, "run_experiment", lambda *a, **k: pytest.fail("trained again"))
    again = run_sweep(_config(tmp_path, rerun_seeds=2), data=data, **quiet)
    assert again["best"] == payload["best"] and again["rows"] == payload["rows"]


def test_seeded_sampling_is_reproducible(
    tmp_path: Path, data: DatasetSplits, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(experiment, "run_experiment", FakeRuns())
    runs = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        cfg = _config(tmp_path / name, seed=seed)
        runs[name] = _params(run_sweep(cfg, data=data, **quiet))
    assert runs["a"] == runs["b"]  # same seed, separate databases: the same parameters
    assert all(x != y for x, y in zip(runs["a"], runs["c"], strict=True))  # another seed
    # trial k's parameters do not depend on the process: a fresh process (here: a fresh sampler
    # on a fresh study) asking for trial 2 alone gets what the sweep got
    study = optuna.create_study(sampler=optuna_study.make_sampler("random", 0))
    for _ in range(2):
        study.tell(study.ask(), 0.0)
    assert search_space.suggest(study.ask(), "miles", data.modalities) == runs["a"][2]


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_sampler_is_a_function_of_seed_and_history(sampler: str) -> None:
    """Past TPE's 10 random start-up trials its proposals follow the results; with the same
    seed and the same results they are the same, in any process."""

    def sampled(seed: int) -> list[dict[str, Any]]:
        study = optuna.create_study(
            sampler=optuna_study.make_sampler(sampler, seed), direction="maximize"
        )
        for _ in range(14):
            trial = study.ask()
            study.tell(trial, _val_of(search_space.suggest(trial, "ogm", ["a", "b"])["lr"]))
        return [t.params for t in study.trials]

    first = sampled(0)
    assert sampled(0) == first
    assert sampled(1) != first


def test_best_is_argmax_of_validation(
    tmp_path: Path, data: DatasetSplits, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(experiment, "run_experiment", FakeRuns())
    payload = run_sweep(_config(tmp_path, trials=6), data=data, **quiet)
    vals = {t["number"]: t["val"] for t in payload["trials"]}
    assert len(set(vals.values())) == 6  # no ties: the check below is not vacuous
    assert payload["best"]["number"] == max(vals, key=lambda n: vals[n])
    for t in payload["trials"]:
        assert t["val"] == pytest.approx(_val_of(t["params"]["lr"]))
        assert t["test"] == pytest.approx(t["val"] - 0.05)  # the test stored with its trial
    assert payload["best"]["test"] == pytest.approx(payload["best"]["val"] - 0.05)
    # ties go to the lowest trial number; failed and diverged trials are never chosen
    rows = [
        {"number": 0, "state": "COMPLETE", "val": 0.5},
        {"number": 1, "state": "COMPLETE", "val": 0.7},
        {"number": 2, "state": "COMPLETE", "val": 0.7},
        {"number": 3, "state": "PRUNED", "val": None},
        {"number": 4, "state": "FAIL", "val": None},
    ]
    assert select_best(rows)["number"] == 1  # type: ignore[index]
    assert select_best(rows[3:]) is None


@pytest.mark.parametrize("fail_on_call", [2, 3])
def test_interrupted_sweep_resumes_without_repeating(
    tmp_path: Path, data: DatasetSplits, monkeypatch: pytest.MonkeyPatch, fail_on_call: int
) -> None:
    """Ctrl-C in trial ``fail_on_call`` of 3: the finished trials are kept, the interrupted one
    is run again with the same parameters, and the later fresh trials get the parameters they
    get in an uninterrupted sweep (the re-run uses up no sampling slot), so the resumed sweep
    measures exactly what an uninterrupted one would."""
    fake = FakeRuns(fail_on_call=fail_on_call, exc=KeyboardInterrupt())
    monkeypatch.setattr(experiment, "run_experiment", fake)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(_config(tmp_path), data=data, **quiet)
    assert len(fake.calls) == fail_on_call
    first_calls = list(fake.calls)

    monkeypatch.setattr(experiment, "run_experiment", FakeRuns())
    straight = run_sweep(_config(tmp_path / "straight"), data=data, **quiet)
    straight_params = _params(straight)

    resumed = FakeRuns()
    monkeypatch.setattr(experiment, "run_experiment", resumed)
    payload = run_sweep(_config(tmp_path), data=data, **quiet)
    interrupted = fail_on_call - 1
    # the interrupted trial again, same parameters, then the remaining fresh trials
    assert resumed.calls[0] == first_calls[interrupted]
    assert len(resumed.calls) == 3 - interrupted
    states = [(t["number"], t["state"], t[RETRY_OF]) for t in payload["trials"]]
    expected = [(n, "COMPLETE", None) for n in range(interrupted)]
    expected += [(interrupted, "FAIL", None), (interrupted + 1, "COMPLETE", interrupted)]
    expected += [(n + 1, "COMPLETE", None) for n in range(interrupted + 1, 3)]
    assert states == expected
    assert _params(payload) == straight_params  # the same parameter sets, in the same order
    assert [t["params"] for t in payload["trials"] if t["state"] == "FAIL"] == [
        straight_params[interrupted]
    ]


def test_trial_slot_skips_reruns() -> None:
    study = optuna.create_study()
    for _ in range(2):
        study.tell(study.ask(), 0.0)
    study.enqueue_trial({}, user_attrs={RETRY_OF: 1})
    study.tell(study.ask(), 0.0)  # trial 2: the re-run of trial 1
    study.tell(study.ask(), 0.0)  # trial 3: the third fresh trial
    trials = study.get_trials()
    assert [optuna_study.trial_slot(trials, n) for n in range(4)] == [0, 1, 2, 2]


def test_requeue_rereads_trials_before_enqueueing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker B re-queues an interrupted trial after worker A read the trials: A reads them
    again right before enqueueing and leaves the trial alone."""
    study = optuna.create_study()
    study.tell(study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)}), 0.0)
    failed = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)})
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    before_b = study.get_trials(deepcopy=False)
    study.enqueue_trial(dict(study.trials[1].params), user_attrs={RETRY_OF: 1})  # worker B
    real = study.get_trials
    reads = []

    def get_trials(*args: Any, **kwargs: Any) -> Any:
        """A's first read predates B's enqueue; later reads see the storage as it is."""
        reads.append(1)
        if len(reads) == 1:
            states = kwargs.get("states")
            return [t for t in before_b if states is None or t.state in states]
        return real(*args, **kwargs)

    monkeypatch.setattr(study, "get_trials", get_trials)
    assert optuna_study.requeue_interrupted(study) == []
    retries = [t for t in real() if t.user_attrs.get(RETRY_OF) == 1]
    assert len(retries) == 1  # B's re-run only


class ProcessKilled(BaseException):
    """Not an Exception: Optuna lets it through without finishing the trial, exactly as when
    the process dies (the trial stays RUNNING in the database)."""


def test_killed_sweep_resumes_once_its_trial_is_stale(
    tmp_path: Path, data: DatasetSplits, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRuns(fail_on_call=3, exc=ProcessKilled())
    monkeypatch.setattr(experiment, "run_experiment", fake)
    cfg = _config(tmp_path, stale_after=1, rerun_seeds=1)
    with pytest.raises(ProcessKilled):
        run_sweep(cfg, data=data, **quiet)
    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "RUNNING"]

    # while its heartbeat is fresh the trial may be running on another machine: left alone
    resumed = FakeRuns()
    monkeypatch.setattr(experiment, "run_experiment", resumed)
    early = run_sweep(cfg, data=data, **quiet)
    assert resumed.calls == [] and early["rows"] == []
    assert "Re-runs wait" in (cfg.study_dir / "sweep.md").read_text()

    time.sleep(2.2)  # silent for longer than stale_after (SQLite clock: whole seconds)
    payload = run_sweep(cfg, data=data, **quiet)
    assert resumed.calls[0] == fake.calls[2]  # the killed trial again, same parameters
    assert len(resumed.calls) == 2  # ... and the best trial's one re-run, nothing else
    assert [t["state"] for t in payload["trials"]] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    assert payload["trials"][3][RETRY_OF] == 2
    assert payload["finished"] == 3 and payload["aggregate"][0]["n"] == 1


def test_waiting_worker_reruns_a_killed_trial_once_it_is_stale(
    tmp_path: Path, data: DatasetSplits, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``wait=True``: with no trial left to start but one still RUNNING (its process killed),
    the sweep polls until the heartbeat check fails it, re-runs it, and finishes."""
    fake = FakeRuns(fail_on_call=2, exc=ProcessKilled())
    monkeypatch.setattr(experiment, "run_experiment", fake)
    with pytest.raises(ProcessKilled):
        run_sweep(_config(tmp_path, trials=2, stale_after=1), data=data, **quiet)
    resumed = FakeRuns()
    monkeypatch.setattr(experiment, "run_experiment", resumed)
    payload = run_sweep(_config(tmp_path, trials=2, stale_after=1, wait=True), data=data, **quiet)
    assert resumed.calls == [fake.calls[1]]  # only the killed trial, with its parameters
    assert [t["state"] for t in payload["trials"]] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert payload["finished"] == 2 and payload["rerun_note"] is None
    with pytest.raises(TypeError, match="wait must be a bool"):
        _config(tmp_path, wait="yes")


def test_diverged_trial_counts_and_is_not_rerun(
    tmp_path: Path, data: DatasetSplits, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRuns(fail_on_call=1, exc=FloatingPointError("training loss became nan"))
    monkeypatch.setattr(experiment, "run_experiment", fake)
    payload = run_sweep(_config(tmp_path), data=data, **quiet)
    assert len(fake.calls) == 3
    assert [t["state"] for t in payload["trials"]] == ["PRUNED", "COMPLETE", "COMPLETE"]
    assert payload["trials"][0]["diverged"] == "training loss became nan"
    monkeypatch.setattr(experiment, "run_experiment", lambda *a, **k: pytest.fail("re-ran"))
    run_sweep(_config(tmp_path), data=data, **quiet)
    md = (_config(tmp_path).study_dir / "sweep.md").read_text()
    assert "diverged: training loss became nan" in md


def test_more_trials_extend_the_study_but_other_settings_are_refused(
    tmp_path: Path, data: DatasetSplits, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRuns()
    monkeypatch.setattr(experiment, "run_experiment", fake)
    run_sweep(_config(tmp_path, trials=2), data=data, **quiet)
    run_sweep(_config(tmp_path, trials=4), data=data, **quiet)
    assert len(fake.calls) == 4  # two more, the first two kept
    with pytest.raises(ValueError, match=r"different settings .*epochs"):
        run_sweep(_config(tmp_path, trials=4, epochs=2), data=data, **quiet)


@pytest.mark.filterwarnings("ignore:OGM rescales encoder gradients")
def test_two_studies_in_one_out_keep_their_own_runs(
    tmp_path: Path, data: DatasetSplits, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--method ogm`` then ``--method miles`` with the same ``--out``: each study trains and
    reads only its own run folders and reports, the storage file is shared."""
    ogm_cfg = _config(tmp_path, method="ogm", trials=2, rerun_seeds=1, storage=None)
    ogm = run_sweep(ogm_cfg, data=data, **quiet)
    ogm_files = {p: p.read_bytes() for p in ogm_cfg.study_dir.rglob("*") if p.is_file()}
    miles_cfg = _config(tmp_path, method="miles", trials=2, rerun_seeds=1, storage=None)
    assert ogm_cfg.storage_url == miles_cfg.storage_url  # one shared sweep.db
    assert ogm_cfg.study_dir != miles_cfg.study_dir
    payload = run_sweep(miles_cfg, data=data, **quiet)
    assert payload["aggregate"][0]["n"] == 1
    # the miles re-run trained its own run (with miles' parameters), not read ogm's result
    rerun = miles_cfg.study_dir / "rerun" / f"trial{payload['best']['number']:04d}" / "seed0"
    assert json.loads((rerun / "result.json").read_text())["strategy"]["name"] == "miles"
    for t in payload["trials"]:
        assert Path(t["run_dir"]).is_relative_to(miles_cfg.study_dir)
    # ... and left every file of the ogm study as it was
    assert {p: p.read_bytes() for p in ogm_files} == ogm_files
    assert json.loads((ogm_cfg.study_dir / "sweep.json").read_text())["best"] == ogm["best"]
    assert "miles sweep: ogm" in (ogm_cfg.study_dir / "sweep.md").read_text()

    # a run folder made under other settings (here: the same study name in another storage,
    # with another method) is refused before anything is trained in it
    other = _config(
        tmp_path,
        method="ogm",
        trials=2,
        storage=f"sqlite:///{tmp_path / 'other.db'}",
        study_name=miles_cfg.name,
    )
    monkeypatch.setattr(experiment, "run_experiment", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match=r"sweep run .*trial0000 was started with different"):
        run_sweep(other, data=data, **quiet)


def test_study_slug() -> None:
    assert study_slug("fsdd-mnist-miles-concat") == "fsdd-mnist-miles-concat"
    plus = study_slug("fsdd-mnist-joint+aux-sum")
    assert plus.startswith("fsdd-mnist-joint_aux-sum-") and "/" not in plus
    assert study_slug("a b") != study_slug("a_b")
    assert study_slug("..") not in ("..", ".", "")
