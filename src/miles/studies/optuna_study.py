"""The Optuna side of ``miles sweep``: seeded per-trial samplers, storage, resumption.

- **Samplers**: Optuna's ``RandomSampler`` (the paper's protocol) or ``TPESampler``. Each fresh
  trial gets a *fresh* sampler seeded by ``(seed, slot)`` (:func:`trial_seed`), where the slot is
  the trial's number minus the re-runs of interrupted trials before it (:func:`trial_slot`), so
  with the random sampler the parameters of the ``k``-th fresh trial are a pure function of
  ``(seed, k)``: the same in one process, after a crash and resume, or on another machine.
- **Storage**: an Optuna RDB storage with a heartbeat (:func:`open_study`), so a sweep resumes
  after a crash and can be spread over processes or machines sharing one database (SQLite on
  one machine, PostgreSQL across machines). A trial interrupted by Ctrl-C, or left running by a
  killed process (silent for ``stale_after`` seconds), is re-queued once with the *same*
  parameters (:func:`requeue_interrupted`).
- **Workers**: each worker claims its trials one at a time under the storage's lock
  (:meth:`SharedStudy.claim`, :mod:`miles.studies.storage`), so workers starting together never
  start more than ``--trials`` trials, nor re-queue one interrupted trial twice.

Optuna is imported inside functions only, so ``import miles`` (and ``miles --help``) stay light.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

__all__ = [
    "RETRY_OF",
    "SAMPLERS",
    "SETTINGS_ATTR",
    "Claim",
    "SharedStudy",
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
class Claim:
    """What one worker found and took under the storage lock (:meth:`SharedStudy.claim`)."""

    #: the trial this worker is now running, or ``None`` when none was left to start
    trial: optuna.Trial | None
    #: interrupted trials this worker re-queued with their parameters
    requeued: list[int]
    #: trials finished (complete or diverged) and running elsewhere, before this claim
    finished: int
    running: int


@dataclass
class SharedStudy:
    """An Optuna study that several processes, on one machine or many, work on together.

    ``lock`` (:func:`~miles.studies.storage.storage_lock`; ``None`` for a backend without one)
    serialises what the workers decide together: which trial to start and which interrupted
    trial to re-queue, so no trial is started twice or re-queued twice.
    """

    study: optuna.Study
    storage: optuna.storages.RDBStorage
    lock: AbstractContextManager[Any] | None
    heartbeat_interval: int

    def _locked(self) -> AbstractContextManager[Any]:
        return self.lock if self.lock is not None else contextlib.nullcontext()

    def claim(self, trials: int) -> Claim:
        """Under the lock: fail the trials of killed workers (silent past the grace period),
        re-queue the interrupted trials, and start a trial if fewer than ``trials`` are finished
        or running (a re-queued trial first). Its first heartbeat is written before the lock is
        released, so a worker killed right after the claim is found by the others."""
        import optuna

        with self._locked():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(self.study)
            requeued = requeue_interrupted(self.study)
            finished, running = trial_counts(self.study)
            trial = None
            if finished + running < trials:
                with warnings.catch_warnings():
                    # we run the heartbeat ourselves (run), as Study.optimize would
                    warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
                    trial = self.study.ask()
                self.storage.record_heartbeat(self._trial_id(trial))
        return Claim(trial, requeued, finished, running)

    def _trial_id(self, trial: optuna.Trial) -> int:
        study_id = self.storage.get_study_id_from_name(self.study.study_name)
        return self.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)

    def run(self, trial: optuna.Trial, objective: Callable[[optuna.Trial], float]) -> None:
        """Run a claimed trial with a heartbeat, and record how it ended.

        A value: COMPLETE. ``optuna.TrialPruned`` (a diverged setting): PRUNED. An error or
        Ctrl-C: FAIL (re-queued later with the same parameters), then re-raised. Anything
        else tearing the process down leaves it RUNNING, as a killed process does, for the
        heartbeat check to find. A trial failed meanwhile by another worker (this one was
        silent past the grace period, e.g. paused) keeps that state: its re-run counts.
        """
        import optuna
        from optuna.trial import TrialState

        state, value = TrialState.COMPLETE, None
        trial_id = self._trial_id(trial)
        with _heartbeat(self.storage, trial_id, self.heartbeat_interval):
            try:
                value = objective(trial)
            except optuna.TrialPruned:
                state = TrialState.PRUNED
            except (Exception, KeyboardInterrupt):
                self._tell(trial, trial_id, TrialState.FAIL, None)
                raise
        self._tell(trial, trial_id, state, value)

    def _tell(self, trial: optuna.Trial, trial_id: int, state: Any, value: float | None) -> None:
        stored = self.storage.get_trial(trial_id).state
        if stored.is_finished():
            warnings.warn(
                f"trial {trial.number} was declared dead by another worker while it ran here "
                f"(silent for longer than the grace period) and is re-run; this run's outcome "
                f"({state.name}) is not recorded",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        # skip_if_finished: the same can still happen between the check and this write
        self.study.tell(trial, value, state=state, skip_if_finished=True)


@contextlib.contextmanager
def _heartbeat(storage: Any, trial_id: int, interval: int) -> Iterator[None]:
    """Record the trial's heartbeat every ``interval`` seconds from a thread, while the body
    runs: the other workers take a trial whose heartbeat stops for one whose process died."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            with contextlib.suppress(Exception):  # a database blip: the next beat retries
                storage.record_heartbeat(trial_id)

    thread = threading.Thread(target=beat, name=f"miles-heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def open_study(
    url: str,
    name: str,
    *,
    sampler: str,
    seed: int,
    stale_after: int,
    settings: Mapping[str, Any],
) -> SharedStudy:
    """Create the study, or join the existing one after checking it was made with ``settings``
    (what every worker of one study must share).

    Safe for any number of workers starting at the same instant on a fresh database: the
    storage, the study and its settings are created under the storage lock
    (:mod:`miles.studies.storage`).
    """
    import optuna

    from miles.studies.storage import heartbeat_interval, open_storage, shown, storage_lock

    lock = storage_lock(url)
    if lock is None:
        warnings.warn(
            f"no lock for the storage {shown(url)} (only SQLite and PostgreSQL have one): workers "
            "claiming trials at the same instant may start one trial more than --trials, or "
            "re-run an interrupted trial twice",
            RuntimeWarning,
            stacklevel=2,
        )
    with lock if lock is not None else contextlib.nullcontext():
        storage = open_storage(url, stale_after, retry=lock is None)
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            sampler=make_sampler(sampler, seed),
            direction="maximize",
            load_if_exists=True,
        )
        stored = study.user_attrs.get(SETTINGS_ATTR)
        if stored is None:
            study.set_user_attr(SETTINGS_ATTR, dict(settings))
    if stored is not None and stored != settings:
        from miles.studies.runner import settings_diff

        diff = settings_diff(stored, settings)
        raise ValueError(
            f"study {name!r} in {shown(url)} was started with different settings (differs in "
            f"{diff}); use another --study-name or --storage to sweep under new settings"
        )
    return SharedStudy(study, storage, lock, heartbeat_interval(stale_after))


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """Enqueue once, with the same parameters, every failed trial not re-run yet.

    A FAIL trial here is an interrupted one (Ctrl-C, or a killed process found stale by the
    heartbeat and failed by ``fail_stale_trials``): divergence is recorded as PRUNED and other
    errors stop the sweep, so re-running its parameters is what the uninterrupted sweep would
    have measured.

    Workers call it holding the storage lock (:meth:`SharedStudy.claim`), so one interrupted
    trial is re-queued once. On a backend without a lock, another worker may re-queue the same
    trial meanwhile: the trials are read again right before each enqueue and a trial some other
    trial already re-runs is skipped, which leaves only a race within the same instant
    (documented in ``docs/sweep.md``).
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
