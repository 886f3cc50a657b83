"""A study's runs on several worker processes, one torch thread each.

Small models gain nothing from intra-op threads, so on ``k`` cores ``k`` single-threaded processes
finish a study about ``k`` times sooner than one process. :func:`run_parallel` keeps every rule of
the one run loop (:mod:`miles.studies.runner`: settings check, done markers, resume from
``last.pt``, diverged runs recorded, a progress line per run with the time left) and adds:

- each run builds its own dataset from its config (studies whose runs use several datasets or
  dataset parameters), cached per worker process;
- planned runs that share a run folder (the same settings planned twice, e.g. a unimodal
  reference shared by several cells) are trained once and reported under each plan entry;
- a :class:`RunTask` may add work around each run in the worker (a hook per epoch, a step after
  the run), e.g. keeping one epoch's weights and scoring read-outs.

Every run is seeded, so a run gives the same numbers in any worker and in any order.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

from miles.studies.runner import (
    Echo,
    PlannedRun,
    Progress,
    RunBatch,
    RunOutcome,
    describe_test,
    is_done,
    run_or_resume,
)
from miles.validation import check_positive_int

__all__ = ["RunTask", "cached_dataset", "dataset_of", "execute_run", "run_parallel"]


class RunTask:
    """Work done in the worker around each run; the base does nothing. Must be picklable."""

    def epoch_hook(self, run: PlannedRun) -> Callable[[dict[str, Any]], None] | None:
        """Called with each epoch's history row (after its checkpoint is saved)."""
        return None

    def after(self, run: PlannedRun, result: Mapping[str, Any], data: Any) -> None:
        """Called once the run is finished (also when it was only read from disk)."""


@functools.lru_cache(maxsize=4)
def _dataset(name: str, params: str) -> Any:
    from miles.data import build_dataset

    return build_dataset(name, **json.loads(params))


def cached_dataset(name: str, params: Mapping[str, Any]) -> Any:
    """``build_dataset(name, **params)``, built once per process (the last four are kept)."""
    return _dataset(name, json.dumps(dict(params), sort_keys=True))


def dataset_of(run: PlannedRun) -> Any:
    """The run's dataset, built once per process for each (name, parameters)."""
    return cached_dataset(run.config.dataset, run.config.dataset_params)


def execute_run(run: PlannedRun, task: RunTask | None = None) -> tuple[RunOutcome, float]:
    """Run, resume or read one planned run on its own dataset; ``(outcome, seconds)``."""
    start = time.perf_counter()
    data = dataset_of(run)
    hook = task.epoch_hook(run) if task is not None else None
    result, failed, trained = run_or_resume(run.config, data, label="run", on_epoch_end=hook)
    if result is not None and task is not None:
        task.after(run, result, data)
    return RunOutcome(run, result, failed, trained), time.perf_counter() - start


def _one_thread() -> None:
    """Worker initializer: one torch thread (and one for any OpenMP library loaded later)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def run_parallel(
    runs: Sequence[PlannedRun],
    *,
    workers: int = 2,
    echo: Echo = print,
    task: RunTask | None = None,
    summary: Callable[[Mapping[str, Any]], str] = describe_test,
) -> RunBatch:
    """Run every planned run on ``workers`` processes (1: in this process); outcomes in plan
    order. A run that raises stops the study (the others are cancelled; finished runs are kept
    and a re-run resumes)."""
    check_positive_int("workers", workers)
    folders: dict[str, int] = {}  # run folder -> index of the plan entry that trains it
    first: list[int] = []
    for i, run in enumerate(runs):
        key = str(run.run_dir) if run.run_dir is not None else f"#memory{i}"
        if key not in folders:
            folders[key] = i
            first.append(i)
    owner = [
        folders[str(r.run_dir) if r.run_dir is not None else f"#memory{i}"]
        for i, r in enumerate(runs)
    ]
    to_train = sum(not is_done(runs[i].run_dir) for i in first)
    echo(
        f"{len(runs)} runs planned ({len(first)} distinct), {len(first) - to_train} already "
        f"done, {to_train} to train on {workers} process{'es' if workers > 1 else ''}"
    )
    progress = Progress(to_train, echo)
    done: dict[int, RunOutcome] = {}

    def report(i: int, outcome: RunOutcome, seconds: float) -> None:
        done[i] = outcome
        tag = f"[{len(done)}/{len(first)}] {runs[i].name}"
        if not outcome.trained:
            echo(
                f"{tag}: done earlier"
                + (f" (diverged: {outcome.failed})" if outcome.failed else "")
            )
        else:
            text = (
                f"DIVERGED ({outcome.failed})"
                if outcome.result is None
                else summary(outcome.result)
            )
            progress.finished(tag, text, seconds)

    if workers == 1:
        for i in first:
            report(i, *execute_run(runs[i], task))
    else:
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_one_thread)
        pending: dict[Future[tuple[RunOutcome, float]], int] = {}
        try:
            pending = {pool.submit(execute_run, runs[i], task): i for i in first}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    report(pending.pop(future), *future.result())
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
    outcomes = []
    for i, run in enumerate(runs):
        trained = done[owner[i]]
        outcomes.append(
            RunOutcome(run, trained.result, trained.failed, trained.trained and owner[i] == i)
        )
    return RunBatch(outcomes, time.perf_counter() - progress.start)
