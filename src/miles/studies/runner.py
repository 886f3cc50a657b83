"""The one run loop of every study: plan -> run or resume -> aggregate -> write.

A study (compare, ablate, sweep's re-runs, demo, the unimodal LR sweep) plans a list of
:class:`PlannedRun` s, each a complete :class:`~miles.training.experiment.ExperimentConfig` with
its own output folder, and hands them to :func:`run_all`, which:

- locks each run folder while it works in it (a second process working on the same study waits
  for that run instead of training it twice) and refuses a run folder started under other
  settings (``run_config.json``, :class:`~miles.training.run_folder.RunFolder`), before anything
  in it is read or trained (settings in :data:`IGNORED_SETTINGS` may differ: they do not change
  what a run measures, and neither does how its folder is spelled or where it was moved);
- reads a finished run (``done.json`` next to its ``result.json``) instead of training it again,
  and resumes an unfinished one from its ``last.pt``;
- records a run whose training diverges (``FloatingPointError``) as failed, with the reason,
  instead of aborting the study: training it again would diverge the same way;
- prints one line per run, with the elapsed time and an estimate of the time left.

The study then turns the outcomes into rows (:meth:`RunOutcome.row`), aggregates them and writes
its files through :mod:`miles.report.document`.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from miles.fileio import read_json, write_json
from miles.report.tables import pct
from miles.results import load_result, run_row
from miles.training.experiment import ExperimentConfig
from miles.training.run_folder import (
    IGNORED_SETTINGS,
    RECORD,
    RunFolder,
    RunFolderError,
    comparable,
    describe_diff,
    settings_diff,
)

__all__ = [
    "DONE",
    "IGNORED_SETTINGS",
    "RUN_CONFIG",
    "Echo",
    "PlannedRun",
    "Progress",
    "RunBatch",
    "RunOutcome",
    "check_run_settings",
    "check_same_settings",
    "describe_test",
    "hardware_line",
    "is_done",
    "run_all",
    "run_one",
    "run_or_resume",
    "setting_line",
    "settings_diff",
]

DONE = "done.json"
#: the settings record of a run folder (:data:`miles.training.run_folder.RECORD`)
RUN_CONFIG = RECORD

Echo = Callable[[str], None]


@dataclass
class PlannedRun:
    """One training run of a study: what to train, and what the run is in the study's rows.

    ``ident`` (method, label, fusion, seed, ...) is copied into every row of this run; ``name``
    is how progress lines call it. ``config.out_dir`` is the run folder (``None``: train in
    memory, without resuming).
    """

    config: ExperimentConfig
    ident: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    @property
    def run_dir(self) -> Path | None:
        return None if self.config.out_dir is None else Path(self.config.out_dir)


@dataclass
class RunOutcome:
    """A planned run after :func:`run_one`: its result (``result.json`` as a dict) or why it
    failed; ``trained`` is whether this invocation trained it (else it was read from disk)."""

    run: PlannedRun
    result: dict[str, Any] | None
    failed: str | None = None
    trained: bool = False

    def row(self, root: Path | None = None) -> dict[str, Any]:
        """The run's table row: its identifiers, then :func:`miles.results.run_row` (or
        ``failed``), then ``run_dir`` relative to ``root`` (where ``miles report`` finds it)."""
        row = dict(self.run.ident)
        if self.result is None:
            row["failed"] = self.failed
        else:
            row.update(run_row(self.result))
            row.update(self.run.ident)  # the study's identifiers win (e.g. a shown fusion)
        run_dir = self.run.run_dir
        if run_dir is not None:
            row["run_dir"] = (
                run_dir.relative_to(root).as_posix()
                if root is not None and run_dir.is_relative_to(root)
                else str(run_dir)
            )
        return row


def check_same_settings(
    path: Path, settings: Mapping[str, Any], *, what: str, ignore: Sequence[str] = ()
) -> None:
    """Refuse to mix results made under different settings in one folder.

    The first call records ``settings`` in ``path``; later calls compare against it (leaving out
    the dotted paths in ``ignore``) and raise ``ValueError`` naming the keys that differ and
    their two values. A damaged ``path`` is a :class:`~miles.fileio.DamagedFileError` naming it.
    """
    if path.is_file():
        stored = read_json(
            path,
            what=f"the settings record of {what}",
            advice="delete it to record the settings of the next run, or use another --out",
        )
        diff = settings_diff(comparable(stored, ignore), comparable(settings, ignore))
        if diff:
            raise ValueError(
                f"{what} was started with different settings (differs in {diff}: "
                f"{describe_diff(stored, settings, diff)}); use a new --out folder, or delete the "
                "old one, to run under new settings"
            )
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, dict(settings))


def check_run_settings(run_dir: Path, exp: ExperimentConfig, *, label: str = "run") -> None:
    """Refuse a run folder made under other settings; the first call records them (call it
    holding the folder's lock, :meth:`~miles.training.run_folder.RunFolder.lock`)."""
    try:
        RunFolder(run_dir).open(exp.to_dict(), resume=True)
    except RunFolderError as exc:  # which study's run it is
        raise RunFolderError(f"{label} {exc}") from None


def is_done(run_dir: Path | None) -> bool:
    """A finished (or diverged) run: its folder holds ``done.json``."""
    return run_dir is not None and (run_dir / DONE).is_file()


def _read_done(run_dir: Path) -> dict[str, Any] | None:
    """``(result, failure)`` of a finished run as ``done.json`` and ``result.json`` say, or
    ``None`` when it is not finished; a damaged file names itself."""
    if not is_done(run_dir):
        return None
    advice = f"delete {run_dir / DONE} to train that run again"
    status = read_json(run_dir / DONE, what="the run's status", advice=advice)
    if status.get("failed"):
        return {"failed": str(status["failed"])}
    if (run_dir / "result.json").is_file():
        return {"result": load_result(run_dir).to_dict()}
    return None


def run_or_resume(
    exp: ExperimentConfig,
    data: Any = None,
    *,
    label: str = "run",
    echo: Echo | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any] | None, str | None, bool]:
    """Train, resume or read the run of ``exp``: ``(result, failure, trained)``.

    ``result`` is ``result.json`` as a dict (``None`` when the run diverged, ``failure`` then says
    why); ``trained`` is ``False`` when a finished run was only read. Without ``exp.out_dir`` the
    run trains in memory. ``on_epoch_end`` goes to the trainer (called with each epoch's history
    row, after the epoch's checkpoint is saved), e.g. to keep a copy of one epoch's weights. The
    run folder is locked meanwhile: when another process works in it, this one waits (``echo``
    says so), then reads what it finished.
    """
    from miles.training import experiment  # looked up at call time, so tests can stand in for it

    if exp.out_dir is None:
        try:
            trained = experiment.run_experiment(exp, data=data, on_epoch_end=on_epoch_end)
            return trained.to_dict(), None, True
        except FloatingPointError as exc:
            return None, str(exc), True
    run_dir = Path(exp.out_dir)
    with RunFolder(run_dir).lock(wait=True, on_wait=echo):
        check_run_settings(run_dir, exp, label=label)
        done = _read_done(run_dir)
        if done is not None:
            return done.get("result"), done.get("failed"), False
        try:
            result = experiment.run_experiment(
                exp, data=data, resume=True, on_epoch_end=on_epoch_end
            ).to_dict()
        except FloatingPointError as exc:
            # a setting that diverges is a finished, bad run: recorded, never trained again
            write_json(run_dir / DONE, {"failed": str(exc)})
            return None, str(exc), True
        write_json(run_dir / DONE, {"finished": True, "wall_time_s": result["wall_time_s"]})
    return result, None, True


class Progress:
    """Elapsed time and an estimate of the time left, from the runs trained so far."""

    def __init__(self, to_train: int, echo: Echo) -> None:
        self.to_train = to_train
        self.trained = 0
        self.echo = echo
        self.start = time.perf_counter()

    def finished(self, tag: str, outcome: str, seconds: float) -> None:
        """One line for a run just trained: its outcome, its time, elapsed and time left."""
        self.trained += 1
        elapsed = time.perf_counter() - self.start
        left = max(self.to_train - self.trained, 0)
        eta = f", ~{elapsed / self.trained * left:.0f} s left" if left else ""
        self.echo(f"{tag}: {outcome} ({seconds:.1f} s; elapsed {elapsed:.0f} s{eta})")


def describe_test(result: Mapping[str, Any]) -> str:
    """``test fused 97.6, audio 77.6, image 91.3 (chosen epoch 8)``: a run in one phrase."""
    which = "test" if result.get("test") else "val"
    scores = result[which]
    heads = ", ".join(f"{m} {pct(v)}" for m, v in scores["unimodal"].items())
    return f"{which} fused {pct(scores['fused'])}, {heads} (chosen epoch {result['best_epoch']})"


def run_one(
    run: PlannedRun,
    data: Any = None,
    *,
    tag: str | None = None,
    progress: Progress | None = None,
    summary: Callable[[Mapping[str, Any]], str] = describe_test,
    label: str = "run",
) -> RunOutcome:
    """Run (or resume, or read) one planned run, printing its progress line."""
    tag = tag or run.name
    echo = progress.echo if progress is not None else None
    if echo is not None and not is_done(run.run_dir):
        echo(f"{tag}: training ...")
    t0 = time.perf_counter()
    result, failed, trained = run_or_resume(run.config, data, label=label, echo=echo)
    outcome = RunOutcome(run, result, failed, trained)
    if echo is None or progress is None:
        return outcome
    if not trained:
        echo(f"{tag}: done earlier" + (f" (diverged: {failed})" if failed else ""))
    else:
        text = f"DIVERGED ({failed})" if result is None else summary(result)
        progress.finished(tag, text, time.perf_counter() - t0)
    return outcome


@dataclass
class RunBatch:
    """What :func:`run_all` did: the outcomes in plan order, and how long it took."""

    outcomes: list[RunOutcome]
    wall_s: float

    @property
    def trained(self) -> int:
        return sum(o.trained for o in self.outcomes)

    def rows(self, root: Path | None = None) -> list[dict[str, Any]]:
        return [o.row(root) for o in self.outcomes]


def run_all(
    runs: Sequence[PlannedRun],
    data: Any = None,
    *,
    echo: Echo = print,
    summary: Callable[[Mapping[str, Any]], str] = describe_test,
    label: str = "run",
) -> RunBatch:
    """Run every planned run in order (see the module docstring); one line per run."""
    to_train = sum(not is_done(r.run_dir) for r in runs)
    echo(f"{len(runs)} runs planned, {len(runs) - to_train} already done, {to_train} to train")
    progress = Progress(to_train, echo)
    outcomes = [
        run_one(
            run,
            data,
            tag=f"[{i}/{len(runs)}] {run.name}",
            progress=progress,
            summary=summary,
            label=label,
        )
        for i, run in enumerate(runs, 1)
    ]
    return RunBatch(outcomes, time.perf_counter() - progress.start)


def setting_line(base: ExperimentConfig) -> str:
    """The training budget every run of a study shares, in one sentence."""
    t = base.trainer
    params = base.dataset_params or "default"
    return (
        f"Setting: {t.epochs} epochs, {t.optimizer} lr {t.lr:g}, batch {t.batch_size}, latent "
        f"{base.latent_dim}, device {t.device}, dataset params {params}."
    )


def hardware_line(wall_s: float, trained: int, read: int) -> str:
    """Where and how long this invocation ran (for the study's ``meta`` line)."""
    import torch

    return (
        f"Hardware: {platform.machine()}, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}. Wall time of this invocation: {wall_s:.0f} s ({trained} runs "
        f"trained, {read} read from disk)."
    )
