"""The one study loop: check -> plan -> run or resume -> aggregate -> write, written once.

A study kind is a :class:`Study` subclass that says only what differs: what to plan
(:meth:`Study.plan`), which rows a run gives (:meth:`Study.rows`), how to aggregate them
(:meth:`Study.summarize`), what else its JSON holds (:meth:`Study.extra`) and how its document
reads (:meth:`Study.document`, also used by ``miles report``). :meth:`Study.run` does the rest for
every kind: it refuses an output folder started under other settings, builds the dataset once,
runs the plan through :func:`miles.studies.runner.run_all`, and writes ``<stem>.md``,
``<stem>.json``, ``<stem>_runs.csv`` and ``<stem>_table.csv``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from miles.fileio import remove_stale_temp_files
from miles.report.document import Document
from miles.studies.config import StudyConfig
from miles.studies.runner import (
    Echo,
    PlannedRun,
    RunBatch,
    hardware_line,
    run_all,
    setting_line,
)
from miles.studies.summary import Summary, study_payload, summarize, write_study

__all__ = ["Study", "run_study"]

C = TypeVar("C", bound=StudyConfig)


class Study(Generic[C]):
    """One kind of study over a config ``C``; subclasses override what differs."""

    #: the ``kind`` written into the study's JSON (what ``miles report`` dispatches on)
    kind: ClassVar[str]
    #: the config class (a :class:`~miles.studies.config.StudyConfig`), to read a study's JSON
    config_type: ClassVar[type[Any]]
    #: the leading columns of ``<stem>_runs.csv`` and ``<stem>_table.csv``
    columns: ClassVar[tuple[tuple[str, ...], tuple[str, ...]]] = (
        ("fusion", "method", "label", "seed"),
        ("fusion", "method", "label", "uses_aux_losses"),
    )

    def __init__(self, config: C, data: Any, echo: Echo) -> None:
        self.config = config
        self.data = data
        self.echo = echo

    @property
    def out(self) -> Path:
        """Where the study writes its files."""
        return Path(self.config.out_dir)

    @property
    def stem(self) -> str:
        """The name of the study's files."""
        return self.kind

    def check(self) -> None:
        """Refuse an output folder whose study was started under other settings."""
        self.config.check_folder(f"{self.kind}_settings.json", f"{self.kind} in {self.out}")

    def plan(self) -> list[PlannedRun]:
        """Every run of the study, in the order they are run."""
        raise NotImplementedError

    def execute(self, runs: list[PlannedRun]) -> RunBatch:
        """Run (or resume) the plan: by default in order, in this process, on the study's
        dataset; a study whose runs use several datasets or processes overrides it."""
        return run_all(runs, self.data, echo=self.echo)

    def rows(self, batch: RunBatch) -> list[dict[str, Any]]:
        """The table rows of the runs (default: one per run)."""
        return batch.rows(self.out)

    @classmethod
    def aggregate(
        cls, rows: Sequence[Mapping[str, Any]], config: C, modalities: Sequence[str]
    ) -> Summary:
        """The aggregate step (default: :func:`miles.studies.summary.summarize`)."""
        return summarize(rows, modalities)

    def extra(self, batch: RunBatch) -> dict[str, Any]:
        """What else the study's JSON holds. Three entries are not stored as they are: ``meta``
        joins the meta line, ``figures`` (paths) join the list of files written, ``wall_s`` and
        ``trained`` replace the run loop's own (for work done outside it, e.g. sweep trials)."""
        return {}

    #: the document's title, formatted with ``config``
    title_format: ClassVar[str]

    @classmethod
    def write_up(
        cls, doc: Document, payload: Mapping[str, Any], config: C, summary: Summary
    ) -> None:
        """Add the study's text and tables to ``doc`` (the diverged runs and the ``meta`` line
        follow)."""
        raise NotImplementedError

    @classmethod
    def summary_of(cls, payload: Mapping[str, Any]) -> tuple[C, Summary]:
        """The config and the aggregate step of what the study's JSON holds."""
        config: C = cls.config_type.from_dict(dict(payload["config"]))
        return config, cls.aggregate(payload["rows"], config, payload["modalities"])

    @classmethod
    def document(cls, payload: Mapping[str, Any]) -> Document:
        """The study's document, from what its JSON holds (its ``.md``; ``miles report`` adds
        figures to it)."""
        config, summary = cls.summary_of(payload)
        doc = Document(cls.kind, cls.title_format.format(config=config))
        cls.write_up(doc, payload, config, summary)
        doc.intro += [summary.failure_note or "", payload.get("meta", "")]
        return doc

    def run(self, show: Echo) -> dict[str, Any]:
        """The loop: check, plan, run or resume, aggregate, write; returns the JSON written."""
        remove_stale_temp_files(self.out)  # what a killed invocation left half-written
        self.check()
        if self.data is None:
            from miles.data import build_dataset

            base = self.config.base
            self.data = build_dataset(base.dataset, **base.dataset_params)
        runs = self.plan()
        batch = self.execute(runs)
        summary = self.aggregate(self.rows(batch), self.config, self.data.modalities)
        extra = self.extra(batch)
        figures = extra.pop("figures", [])
        wall, trained = extra.pop("wall_s", batch.wall_s), extra.pop("trained", batch.trained)
        meta = " ".join(
            part
            for part in (
                setting_line(self.config.base),
                extra.pop("meta", ""),
                hardware_line(wall, trained, len(runs) - batch.trained),
            )
            if part
        )
        payload = study_payload(
            self.kind, self.config, self.data, summary, meta, wall_s=wall, trained=trained, **extra
        )
        write_study(
            self.out, self.stem, payload, self.document(payload), self.columns, show, figures
        )
        return payload


def run_study(
    kind: type[Study[C]],
    config: C,
    *,
    echo: Echo = print,
    show: Echo | None = None,
    data: Any = None,
) -> dict[str, Any]:
    """Run (or resume) a study of ``kind``; ``echo`` gets the progress lines, ``show`` the final
    report (default: ``echo``); ``data`` reuses an already-built dataset."""
    return kind(config, data, echo).run(show or echo)
