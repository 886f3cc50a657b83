"""The Optuna side of ``miles sweep``: seeded per-trial samplers, storage, resumption.

- **Samplers**: Optuna's ``RandomSampler`` (the paper's protocol) or ``TPESampler``. Each fresh
  trial gets a *fresh* sampler seeded by ``(seed, slot)`` (:func:`trial_seed`), where the slot is
  the trial's number minus the re-runs of interrupted trials before it (:func:`trial_slot`), so
  with the random sampler the parameters of the ``k``-th fresh trial are a pure function of
  ``(seed, k)``: the same in one process, after a crash and resume, or on another machine.
- **Storage**: an Optuna RDB storage with a heartbeat (:func:`open_study`), so a sweep resumes
  after a crash and can be spread over processes or machines sharing one database. A trial
  interrupted by Ctrl-C, or left running by a killed process (silent for ``stale_after``
  seconds), is re-queued once with the *same* parameters (:func:`requeue_interrupted`).

Optuna is imported inside functions only, so ``import miles`` (and ``miles --help``) stay light.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

__all__ = [
    "RETRY_OF",
    "SAMPLERS",
    "SETTINGS_ATTR",
    "make_sampler",
    "open_study",
    "requeue_interrupted",
    "trial_counts",
    "trial_seed",
    "trial_slot",
]

SAMPLERS = ("random", "tpe")
#: study user attribute holding the settings every worker of one study must share
SETTINGS_ATTR = "miles_settings"
#: trial user attribute of a re-run of an interrupted trial: the interrupted trial's number
RETRY_OF = "retry_of"
#: what to do about a sweep database that is not one
DAMAGED_DB = (
    "move it away (the trials it held are lost) or pass another --storage, or another --out"
)


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


def _storage(url: str, stale_after: int) -> optuna.storages.RDBStorage:
    """RDB storage with Optuna's heartbeat, so trials of killed processes are detected."""
    import optuna

    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        from miles.fileio import check_sqlite_database

        check_sqlite_database(url.removeprefix("sqlite:///"), advice=DAMAGED_DB)
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # several local processes may share the file: wait for its lock instead of failing
        engine_kwargs = {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=max(1, stale_after // 4),
            grace_period=stale_after,
        )


def open_study(
    url: str,
    name: str,
    *,
    sampler: str,
    seed: int,
    stale_after: int,
    settings: Mapping[str, Any],
) -> optuna.Study:
    """Create the study, or join the existing one after checking it was made with ``settings``
    (what every worker of one study must share)."""
    import optuna

    study = optuna.create_study(
        storage=_storage(url, stale_after),
        study_name=name,
        sampler=make_sampler(sampler, seed),
        direction="maximize",
        load_if_exists=True,
    )
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if stored is None:
        study.set_user_attr(SETTINGS_ATTR, dict(settings))
    elif stored != settings:
        from miles.studies.runner import settings_diff

        diff = settings_diff(stored, settings)
        raise ValueError(
            f"study {name!r} in {url} was started with different settings (differs in {diff}); "
            "use another --study-name or --storage to sweep under new settings"
        )
    return study


def requeue_interrupted(study: optuna.Study) -> list[int]:
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


def trial_counts(study: optuna.Study) -> tuple[int, int]:
    """(finished trials: complete or diverged, trials running now)."""
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    finished = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
    return finished, sum(s == TrialState.RUNNING for s in states)
