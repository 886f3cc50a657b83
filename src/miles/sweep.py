"""``miles sweep``: the paper's hyper-parameter search for one method, with Optuna.

The paper tunes every method on the validation set: it samples the learning rate and the method's
own hyper-parameters (``tau``/``mu`` for MILES, ``alpha`` for OGM, ...) at random, keeps the trial
with the best validation fused metric, reports that trial's test result, and re-runs it over
several seeds for mean ± std. This module does exactly that with Optuna, a maintained library,
instead of a hand-written search:

- **Search spaces** are a table here (:data:`SEARCH_SPACES`), keyed by the registered method
  name, so that no strategy has to know about tuning.
- **Samplers**: Optuna's ``RandomSampler`` (the paper's protocol, the default) or ``TPESampler``.
  Each fresh trial gets a *fresh* sampler seeded by ``(seed, slot)`` (:func:`trial_seed`), where
  the slot is the trial's number minus the re-runs of interrupted trials before it
  (:func:`trial_slot`), so with the random sampler the parameters of the ``k``-th fresh trial
  are a pure function of ``(seed, k)``: the same in one process, after a crash and resume, or on
  another machine.
- **Storage**: trials live in an Optuna RDB storage (SQLite ``OUT/sweep.db`` by default, shared by
  the studies of one ``OUT``), so a sweep resumes after a crash and can be spread over processes
  or machines sharing one database. Run folders and reports of a study go to
  ``OUT/<study slug>/`` (:attr:`SweepConfig.study_dir`), so two studies never mix their files.
  Finished trials (complete, or diverged) are never run again. A trial interrupted by Ctrl-C, or
  left running by a killed process (detected by Optuna's heartbeat once it has been silent for
  ``stale_after`` seconds), is re-run once with the *same* parameters, so an interrupted and
  resumed sweep evaluates the same parameter sets as an uninterrupted one.
- **Selection**: best = highest validation fused metric (ties: lowest trial number). Its
  parameters are re-run over seeds ``0..K-1`` (resumable: ``done.json`` markers as in
  ``miles compare``), and ``OUT/<study slug>/sweep.json``/``sweep.md`` hold the best
  parameters, every trial (parameters, validation, test) and the mean ± std over the re-runs.

Optuna is imported inside functions only, so ``import miles`` (and ``miles --help``) stay light.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from miles.cli_args import key_value
from miles.compare import check_run_settings, run_or_resume
from miles.report.tables import aggregate, pm, summarize_run
from miles.training.experiment import ExperimentConfig, run_experiment
from miles.training.history import write_json
from miles.training.trainer import TrainerConfig

if TYPE_CHECKING:
    import optuna

SAMPLERS = ("random", "tpe")
#: study user attribute holding the settings every worker of one study must share
SETTINGS_ATTR = "miles_settings"
#: trial user attribute of a re-run of an interrupted trial: the interrupted trial's number
RETRY_OF = "retry_of"


@dataclass(frozen=True)
class Param:
    """One searched hyper-parameter: its range and where its value goes.

    ``per_modality`` parameters are sampled once per modality (Optuna names ``name.<modality>``)
    and passed to the strategy as a ``{modality: value}`` mapping; ``trainer`` parameters go to
    :class:`~miles.training.trainer.TrainerConfig` instead of the strategy.
    """

    name: str
    low: float
    high: float
    log: bool = False
    integer: bool = False
    per_modality: bool = False
    trainer: bool = False

    def describe(self) -> str:
        kind = "int" if self.integer else ("log-uniform" if self.log else "uniform")
        low, high = (int(self.low), int(self.high)) if self.integer else (self.low, self.high)
        where = " (one per modality)" if self.per_modality else ""
        return f"`{self.name}`{where}: {kind} [{low:g}, {high:g}]"


LR = Param("lr", 1e-4, 1e-2, log=True, trainer=True)
#: MSLR's per-encoder rates: the paper's own search over them replaces our unimodal LR sweep here
UNIMODAL_LRS = Param("unimodal_lrs", 1e-4, 1e-2, log=True, per_modality=True)

#: the search space of every sweepable method (the base learning rate first, for all)
SEARCH_SPACES: dict[str, tuple[Param, ...]] = {
    "joint": (LR,),
    "joint+aux": (LR,),
    "miles": (LR, Param("tau", 0.0, 0.5), Param("mu", 0.01, 1.0, log=True)),
    "ogm": (LR, Param("alpha", 0.05, 1.0, log=True)),
    "ogm-ge": (LR, Param("alpha", 0.05, 1.0, log=True)),
    "gblend": (LR, Param("super_epoch", 2, 10, integer=True)),
    "mses": (LR, Param("patience", 2, 10, integer=True)),
    "mslr-k": (LR, UNIMODAL_LRS),
    "mslr-s": (LR, UNIMODAL_LRS, Param("smoothing", 0.0, 1.0)),
    "mslr-d": (LR, UNIMODAL_LRS, Param("window", 2, 10, integer=True)),
}
#: methods that exist but cannot be swept, and why
NOT_SWEEPABLE = {
    "unimodal": "it is a reference with one run per modality, not a fusion method to tune; "
    "sweep 'joint+aux' or train the unimodal references with `miles compare`",
}


def search_space(method: str) -> tuple[Param, ...]:
    """The searched parameters of ``method``; a clear error for methods that cannot be swept."""
    if method in NOT_SWEEPABLE:
        raise ValueError(f"method {method!r} cannot be swept: {NOT_SWEEPABLE[method]}")
    try:
        return SEARCH_SPACES[method]
    except KeyError:
        raise ValueError(
            f"no search space for method {method!r}; sweepable: {sorted(SEARCH_SPACES)} "
            "(add an entry to miles.sweep.SEARCH_SPACES for a new method)"
        ) from None


def _names(param: Param, modalities: Sequence[str]) -> list[str]:
    return [f"{param.name}.{m}" for m in modalities] if param.per_modality else [param.name]


def suggest(trial: optuna.Trial, method: str, modalities: Sequence[str]) -> dict[str, Any]:
    """Sample ``method``'s parameters in ``trial``: the flat Optuna parameters, in table order."""
    params: dict[str, Any] = {}
    for param in search_space(method):
        for name in _names(param, modalities):
            if param.integer:
                params[name] = trial.suggest_int(name, int(param.low), int(param.high))
            else:
                params[name] = trial.suggest_float(name, param.low, param.high, log=param.log)
    return params


def run_settings(
    method: str, params: Mapping[str, Any], modalities: Sequence[str]
) -> tuple[float, dict[str, Any]]:
    """Flat trial parameters -> (base learning rate, strategy parameters) for one run."""
    lr: float | None = None
    strategy_params: dict[str, Any] = {}
    for param in search_space(method):
        if param.per_modality:
            strategy_params[param.name] = {m: params[f"{param.name}.{m}"] for m in modalities}
        elif param.trainer:
            lr = float(params[param.name])
        else:
            strategy_params[param.name] = params[param.name]
    if lr is None:  # pragma: no cover - every table entry starts with LR
        raise ValueError(f"search space of {method!r} has no learning rate")
    return lr, strategy_params


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial ``number``: a well-mixed pure function of ``(seed, number)``.

    Seeding per trial, rather than one sampler stream per process, is what makes the sampled
    parameters independent of resumptions and of which process runs the trial.
    """
    import numpy as np

    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def trial_slot(trials: Sequence[optuna.trial.FrozenTrial], number: int) -> int:
    """The sampling slot of trial ``number``: its number minus the re-runs of interrupted trials
    (trials carrying :data:`RETRY_OF`) numbered before it.

    A re-run takes a new trial number but re-uses its interrupted trial's parameters, so it must
    not use up a slot: the fresh trials of a resumed sweep then get slots ``0, 1, 2, ...`` exactly
    as in an uninterrupted one.
    """
    return number - sum(1 for t in trials if t.number < number and RETRY_OF in t.user_attrs)


def make_sampler(kind: str, seed: int) -> optuna.samplers.BaseSampler:
    """An Optuna sampler that delegates every trial to a fresh ``kind`` sampler seeded by
    :func:`trial_seed` of that trial's slot (:func:`trial_slot`; ``kind``: ``random`` or
    ``tpe``)."""
    import optuna

    if kind not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {kind!r}")

    def build(slot: int) -> optuna.samplers.BaseSampler:
        s = trial_seed(seed, slot)
        if kind == "tpe":
            return optuna.samplers.TPESampler(seed=s)
        return optuna.samplers.RandomSampler(seed=s)

    class PerTrialSeeded(optuna.samplers.BaseSampler):
        """Only public sampler hooks: ``before_trial`` (which knows the trial and the study)
        picks the delegate; everything else is forwarded to it."""

        def __init__(self) -> None:
            self._current = build(0)

        def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            slot = trial_slot(study.get_trials(deepcopy=False), trial.number)
            self._current = build(slot)
            self._current.before_trial(study, trial)

        def infer_relative_search_space(
            self, study: optuna.Study, trial: optuna.trial.FrozenTrial
        ) -> dict[str, optuna.distributions.BaseDistribution]:
            return self._current.infer_relative_search_space(study, trial)

        def sample_relative(
            self,
            study: optuna.Study,
            trial: optuna.trial.FrozenTrial,
            search_space: dict[str, optuna.distributions.BaseDistribution],
        ) -> dict[str, Any]:
            return self._current.sample_relative(study, trial, search_space)

        def sample_independent(
            self,
            study: optuna.Study,
            trial: optuna.trial.FrozenTrial,
            param_name: str,
            param_distribution: optuna.distributions.BaseDistribution,
        ) -> Any:
            return self._current.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(
            self,
            study: optuna.Study,
            trial: optuna.trial.FrozenTrial,
            state: optuna.trial.TrialState,
            values: Sequence[float] | None,
        ) -> None:
            self._current.after_trial(study, trial, state, values)

        def reseed_rng(self) -> None:  # seeds are derived per trial; nothing to reseed
            pass

    return PerTrialSeeded()


@dataclass
class SweepConfig:
    """One sweep: a method on a dataset and fusion, ``trials`` sampled settings, ``rerun_seeds``
    re-runs of the best one. ``storage`` defaults to ``sqlite:///OUT/sweep.db`` and
    ``study_name`` to ``dataset-method-fusion``."""

    dataset: str = "fsdd-mnist"
    method: str = "miles"
    fusion: str = "concat"
    dataset_params: dict[str, Any] = field(default_factory=dict)
    trials: int = 10
    sampler: str = "random"
    seed: int = 0
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adam"
    latent_dim: int = 64
    device: str = "cpu"
    rerun_seeds: int = 3
    storage: str | None = None
    study_name: str | None = None
    stale_after: int = 120
    out_dir: str = "sweep-out"

    def __post_init__(self) -> None:
        search_space(self.method)  # unknown or unsweepable methods fail here, before any work
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        for name, low in (("trials", 1), ("rerun_seeds", 0), ("stale_after", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        # ExperimentConfig and TrainerConfig validate the rest; build one now to fail early.
        ExperimentConfig(
            dataset=self.dataset,
            fusion=self.fusion,
            latent_dim=self.latent_dim,
            strategy=self.method,
            trainer=self.trainer_config(lr=1e-3, seed=0),
        )

    @property
    def storage_url(self) -> str:
        if self.storage:
            return self.storage
        return f"sqlite:///{(Path(self.out_dir) / 'sweep.db').resolve()}"

    @property
    def name(self) -> str:
        return self.study_name or f"{self.dataset}-{self.method}-{self.fusion}"

    @property
    def study_dir(self) -> Path:
        """``OUT/<slug of the study name>``: the run folders and reports of this study only."""
        return Path(self.out_dir) / study_slug(self.name)

    def trainer_config(self, *, lr: float, seed: int) -> TrainerConfig:
        return TrainerConfig(
            epochs=self.epochs,
            lr=lr,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            seed=seed,
            device=self.device,
            progress=False,
        )

    def shared_settings(self) -> dict[str, Any]:
        """What every process working on one study must agree on (trials, re-run seeds, device,
        output folder and storage may differ: they do not change what a trial measures)."""
        keep = (
            *("dataset", "method", "fusion", "dataset_params", "sampler", "seed", "epochs"),
            *("batch_size", "optimizer", "latent_dim"),
        )
        settings = {k: v for k, v in asdict(self).items() if k in keep}
        settings["search_space"] = [asdict(p) for p in search_space(self.method)]
        return json.loads(json.dumps(settings))


def study_slug(name: str) -> str:
    """A folder name for study ``name``: the name itself when it is a safe one, else its safe
    characters plus a short hash of the name, so two names never share a folder."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "study"
    if slug == name:
        return slug
    return f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _check_run_dir(run_dir: Path, exp: ExperimentConfig) -> None:
    """Refuse a run folder made under other settings (another study, or an older one in the
    same ``--out``): checked before training in it or reading its result. The device is left
    out: it does not change what a run measures and may differ between invocations."""
    check_run_settings(run_dir, exp, ignore_trainer_keys=("device",), label="sweep run")


def _storage(config: SweepConfig) -> optuna.storages.RDBStorage:
    """RDB storage with Optuna's heartbeat, so trials of killed processes are detected."""
    import optuna

    url = config.storage_url
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # several local processes may share the file: wait for its lock instead of failing
        engine_kwargs = {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=max(1, config.stale_after // 4),
            grace_period=config.stale_after,
        )


def _load_study(config: SweepConfig) -> optuna.Study:
    """Create the study, or join the existing one after checking it was made with our settings."""
    import optuna

    study = optuna.create_study(
        storage=_storage(config),
        study_name=config.name,
        sampler=make_sampler(config.sampler, config.seed),
        direction="maximize",
        load_if_exists=True,
    )
    settings = config.shared_settings()
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if stored is None:
        study.set_user_attr(SETTINGS_ATTR, settings)
    elif stored != settings:
        diff = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        raise ValueError(
            f"study {config.name!r} in {config.storage_url} was started with different settings "
            f"(differs in {diff}); use another --study-name or --storage to sweep under new "
            "settings"
        )
    return study


def _requeue_interrupted(study: optuna.Study) -> list[int]:
    """Enqueue once, with the same parameters, every failed trial not re-run yet.

    A FAIL trial here is an interrupted one (Ctrl-C, or a killed process found stale by the
    heartbeat and failed by ``fail_stale_trials``): divergence is recorded as PRUNED and other
    errors stop the sweep, so re-running its parameters is what the uninterrupted sweep would
    have measured.

    Another worker sharing the storage may re-queue the same trial meanwhile, so the trials are
    read again right before each enqueue and a trial some other trial already re-runs is
    skipped. Optuna has no atomic claim, so two workers enqueueing within the same instant can
    still both re-queue it (the residual race documented in ``docs/sweep.md``).
    """
    import optuna

    def retried() -> set[Any]:
        return {t.user_attrs.get(RETRY_OF) for t in study.get_trials(deepcopy=False)}

    failed = [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
        if t.params
    ]
    requeued = []
    for t in failed:
        if t.number in retried():  # re-read: another worker may have just re-queued it
            continue
        study.enqueue_trial(dict(t.params), user_attrs={RETRY_OF: t.number})
        requeued.append(t.number)
    return requeued


def _counts(study: optuna.Study) -> tuple[int, int]:
    """(finished trials: complete or diverged, trials running now)."""
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    finished = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
    return finished, sum(s == TrialState.RUNNING for s in states)


def select_best(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The completed trial with the highest validation fused metric; ties: lowest number."""
    done = [r for r in rows if r["state"] == "COMPLETE" and r["val"] is not None]
    if not done:
        return None
    return dict(max(done, key=lambda r: (r["val"], -r["number"])))


def _trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        result = t.user_attrs.get("result") or {}
        test = result.get("test") or {}
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "params": dict(t.params),
                "val": t.value if t.state.name == "COMPLETE" else None,
                "test": test.get("fused"),
                "test_unimodal": test.get("unimodal"),
                "best_epoch": result.get("best_epoch"),
                "wall_time_s": result.get("wall_time_s"),
                "diverged": t.user_attrs.get("diverged"),
                RETRY_OF: t.user_attrs.get(RETRY_OF),
                "run_dir": t.user_attrs.get("run_dir"),
            }
        )
    return rows


def _rerun(
    config: SweepConfig, best: Mapping[str, Any], modalities: Sequence[str], data: Any, seed: int
) -> dict[str, Any]:
    """Train (or resume, or read) the best parameters under one seed."""
    out = config.study_dir / "rerun" / f"trial{best['number']:04d}" / f"seed{seed}"
    lr, strategy_params = run_settings(config.method, best["params"], modalities)
    exp = ExperimentConfig(
        dataset=config.dataset,
        dataset_params=dict(config.dataset_params),
        fusion=config.fusion,
        latent_dim=config.latent_dim,
        strategy=config.method,
        strategy_params=strategy_params,
        trainer=config.trainer_config(lr=lr, seed=seed),
        out_dir=str(out),
    )
    return run_or_resume(
        exp, data, runner=run_experiment, ignore_trainer_keys=("device",), label="sweep run"
    )


def _fmt_params(params: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown_report(payload: Mapping[str, Any]) -> str:
    """``sweep.md``: the best trial, the mean ± std of its re-runs, and every trial."""
    cfg = payload["config"]
    best = payload["best"]
    lines = [
        f"# miles sweep: {cfg['method']} on {cfg['dataset']} ({cfg['fusion']} fusion)",
        "",
        f"Study `{payload['study_name']}`: {payload['finished']} of {cfg['trials']} trials "
        f"finished, {cfg['sampler']} sampler, seed {cfg['seed']}, {cfg['epochs']} epochs each. "
        f"Metric: {payload['metric']} (%); val = the run's best validation fused metric (the "
        "selection criterion), test = fused test metric at that epoch.",
        "",
        "Search space: " + "; ".join(payload["search_space"]) + ".",
        "",
    ]
    if best is None:
        lines += ["No trial has completed yet.", ""]
    else:
        lines += [
            f"**Best trial {best['number']}** (highest val; ties: lowest number): "
            f"{_fmt_params(best['params'])}; val {_pct(best['val'])}, test {_pct(best['test'])}.",
            "",
        ]
    agg = payload.get("rerun_aggregate")
    if agg:
        heads = payload["modalities"]
        lines += [
            f"## Best parameters over seeds {payload['rerun_seeds']} (test, mean ± std)",
            "",
            "| fused | " + " | ".join(f"{m} head" for m in heads) + " | chosen epoch | n |",
            "|---|" + "---|" * len(heads) + "---|---|",
            f"| {pm(agg, 'fused')} | "
            + " | ".join(pm(agg, m) for m in heads)
            + f" | {pm(agg, 'best_epoch', pct=False)} | {agg['n']} |",
            "",
        ]
        if payload.get("rerun_failed"):
            lines += [f"Diverged re-runs (left out): seeds {payload['rerun_failed']}.", ""]
    elif payload.get("rerun_note"):
        lines += [payload["rerun_note"], ""]
    lines += [
        "## Trials",
        "",
        "| trial | state | params | val | test | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in payload["trials"]:
        note = []
        if r["diverged"]:
            note.append(f"diverged: {r['diverged']}")
        if r[RETRY_OF] is not None:
            note.append(f"re-run of interrupted trial {r[RETRY_OF]}")
        if r["state"] == "FAIL":
            note.append("interrupted")
        lines.append(
            f"| {r['number']} | {r['state']} | {_fmt_params(r['params'])} | {_pct(r['val'])} | "
            f"{_pct(r['test'])} | {'; '.join(note)} |"
        )
    lines += ["", payload["meta"]]
    return "\n".join(lines) + "\n"


def run_sweep(
    config: SweepConfig, *, data: Any = None, echo: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run (or resume, or join) the sweep, re-run its best trial, write the reports.

    Everything of the study goes to :attr:`SweepConfig.study_dir` (``OUT/<study slug>``).
    ``data`` may be given to reuse an already-built dataset. Returns what ``sweep.json`` holds.
    A sweep whose trials are still running elsewhere reports what has finished and skips the
    re-runs; running the command again once they finish completes it.
    """
    import optuna

    from miles.data import build_dataset

    out = config.study_dir
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = build_dataset(config.dataset, **config.dataset_params)
    modalities = list(data.modalities)
    study = _load_study(config)
    start = time.perf_counter()
    trained = 0

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, config.method, modalities)
        lr, strategy_params = run_settings(config.method, params, modalities)
        run_dir = out / "trials" / f"trial{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        exp = ExperimentConfig(
            dataset=config.dataset,
            dataset_params=dict(config.dataset_params),
            fusion=config.fusion,
            latent_dim=config.latent_dim,
            strategy=config.method,
            strategy_params=strategy_params,
            trainer=config.trainer_config(lr=lr, seed=config.seed),
            out_dir=str(run_dir),
        )
        _check_run_dir(run_dir, exp)
        echo(f"trial {trial.number}: {_fmt_params(params)} ...")
        try:
            result = run_experiment(exp, data=data)
        except FloatingPointError as exc:
            # a setting that diverges is a finished, bad trial: recorded, never re-run
            trial.set_user_attr("diverged", str(exc))
            raise optuna.TrialPruned(f"diverged: {exc}") from exc
        value = float(result.val["fused"])
        # one attribute, one storage write: what the trial table shows besides the value
        trial.set_user_attr(
            "result",
            {
                "test": result.test,
                "best_epoch": result.best_epoch,
                "wall_time_s": result.wall_time_s,
            },
        )
        if not math.isfinite(value):
            trial.set_user_attr("diverged", f"validation fused metric {value}")
            raise optuna.TrialPruned(f"validation fused metric {value}")
        test = result.test["fused"] if result.test else None
        echo(f"trial {trial.number}: val {_pct(value)}, test {_pct(test)}")
        return value

    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        requeued = _requeue_interrupted(study)
        if requeued:
            echo(f"interrupted trials {requeued}: re-run with the same parameters")
        finished, running = _counts(study)
        if finished + running >= config.trials:
            break
        if trained == 0:
            echo(
                f"study {config.name!r}: {finished} of {config.trials} trials finished, "
                f"{running} running elsewhere; storage {config.storage_url}"
            )
        study.optimize(objective, n_trials=1)
        trained += 1

    rows = _trial_rows(study)
    best = select_best(rows)
    finished, running = _counts(study)
    rerun_rows: list[dict[str, Any]] = []
    rerun_failed: list[int] = []
    rerun_note = None
    seeds = list(range(config.rerun_seeds))
    if best is not None and finished >= config.trials and seeds:
        echo(f"best trial {best['number']}: {_fmt_params(best['params'])}; re-runs {seeds}")
        for seed in seeds:
            result = _rerun(config, best, modalities, data, seed)
            if "failed" in result:
                rerun_failed.append(seed)
            else:
                rerun_rows.append(summarize_run(result))
    elif best is not None and seeds:
        rerun_note = (
            f"Re-runs wait until all {config.trials} trials have finished ({finished} finished, "
            f"{running} running elsewhere or left by a killed process, which is re-run once "
            f"silent for {config.stale_after} s): run the same command again."
        )
    agg = None
    if rerun_rows:
        agg = aggregate(rerun_rows, ["method"], ["fused", *modalities, "best_epoch"])[0]
    wall = time.perf_counter() - start
    import torch

    meta = (
        f"Setting: batch {config.batch_size}, {config.optimizer}, latent {config.latent_dim}, "
        f"device {config.device}. Hardware: {platform.machine()}, {torch.get_num_threads()} "
        f"torch threads, torch {torch.__version__}, optuna {optuna.__version__}. Wall time of "
        f"this invocation: {wall:.0f} s ({trained} trials trained here)."
    )
    payload: dict[str, Any] = {
        "config": asdict(config),
        "study_name": config.name,
        "storage": config.storage_url,
        "metric": data.metric,
        "modalities": modalities,
        "search_space": [p.describe() for p in search_space(config.method)],
        "finished": finished,
        "best": best,
        "rerun_seeds": seeds,
        "reruns": rerun_rows,
        "rerun_failed": rerun_failed,
        "rerun_aggregate": agg,
        "rerun_note": rerun_note,
        "trials": rows,
        "meta": meta,
    }
    write_json(out / "sweep.json", payload)
    report = markdown_report(payload)
    (out / "sweep.md").write_text(report, encoding="utf-8")
    echo("")
    echo(report)
    echo(f"wrote {out / 'sweep.md'} and sweep.json")
    return payload


# -- command line ---------------------------------------------------------------------------------


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text}")
        return value

    return parse


def add_parser(subparsers: Any) -> None:
    """Add ``miles sweep`` to the ``miles`` command's subparsers."""
    p = subparsers.add_parser(
        "sweep",
        help="the paper's hyper-parameter search for one method (Optuna, resumable)",
        description="Sample a method's hyper-parameters, keep the best trial on validation, "
        "report its test result and re-run it over seeds. Trials live in an Optuna storage: "
        "re-run the same command to resume, or start it on several machines sharing one "
        "database to spread the trials.",
    )
    p.add_argument("--dataset", default="fsdd-mnist")
    p.add_argument(
        "--dataset-option",
        action="append",
        type=key_value,
        default=[],
        metavar="KEY=VALUE",
        help="a dataset parameter (repeatable), e.g. --dataset-option root=cache/cremad",
    )
    p.add_argument("--method", required=True, help=f"one of {sorted(SEARCH_SPACES)}")
    p.add_argument("--fusion", default="concat", choices=["concat", "sum"])
    p.add_argument(
        "--trials", type=_int_at_least(1), default=10, help="default 10; the paper uses 80"
    )
    p.add_argument("--sampler", choices=SAMPLERS, default="random", help="default: random")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="sampler and trial seed")
    p.add_argument("--epochs", type=_int_at_least(1), default=10)
    p.add_argument("--batch-size", type=_int_at_least(1), default=64)
    p.add_argument("--latent-dim", type=_int_at_least(1), default=64)
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--device", default="cpu", help="e.g. cuda (default cpu)")
    p.add_argument(
        "--rerun-seeds",
        type=_int_at_least(0),
        default=3,
        help="re-run the best trial over seeds 0..K-1 (default 3; 0: no re-runs)",
    )
    p.add_argument("--storage", help="Optuna RDB URL (default sqlite:///OUT/sweep.db)")
    p.add_argument("--study-name", help="default DATASET-METHOD-FUSION")
    p.add_argument(
        "--stale-after",
        type=_int_at_least(1),
        default=120,
        help="seconds without heartbeat after which a running trial counts as killed (120)",
    )
    p.add_argument(
        "--out",
        default="sweep-out",
        help="output folder (default sweep-out); each study writes into OUT/<study name>/",
    )


def run_cli(args: argparse.Namespace) -> int:
    """Run ``miles sweep`` from parsed arguments; 130 when interrupted (resume by re-running)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # we print our own progress lines
    try:
        config = SweepConfig(
            dataset=args.dataset,
            dataset_params=dict(args.dataset_option),
            method=args.method,
            fusion=args.fusion,
            trials=args.trials,
            sampler=args.sampler,
            seed=args.seed,
            epochs=args.epochs,
            batch_size=args.batch_size,
            optimizer=args.optimizer,
            latent_dim=args.latent_dim,
            device=args.device,
            rerun_seeds=args.rerun_seeds,
            storage=args.storage,
            study_name=args.study_name,
            stale_after=args.stale_after,
            out_dir=args.out,
        )
    except ValueError as exc:
        raise SystemExit(f"miles sweep: {exc}") from None
    try:
        run_sweep(config)
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume (finished trials are kept)")
        return 130
    return 0
