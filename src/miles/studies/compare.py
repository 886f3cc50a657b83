"""``miles compare``: every balancing method on the same data, model, budget and seeds.

Each method gets the base experiment (encoders, epochs, optimizer, base learning rate, batch size)
and the same seeds; only the strategy differs, unless ``method_optimizers`` gives a method its own
optimizer settings (e.g. OGM with its authors' SGD; :mod:`miles.studies.optimizers`). How many
runs a method needs comes from :mod:`miles.studies.planning` (one per modality for the unimodal
references, made once for every fusion; the swept unimodal learning rates for MSLR; MILES with
both ``reset_other`` readings), so this module knows no method by name.

The runs go through the shared run loop (:func:`miles.studies.runner.run_all`: resumable, with
divergence recorded). The table follows the paper's Table II: per method the fused metric, every
head (the dominant one first), the signed gap, the probe and slice readouts measured the same way
for every method, and the imbalance diagnostic, as mean ± std over seeds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from miles.report.document import Document
from miles.report.tables import Column
from miles.strategies.registry import strategy_class
from miles.studies.checks import check_fusions, check_methods, check_seeds
from miles.studies.config import StudyConfig, quiet_base
from miles.studies.optimizers import check_method_optimizers, describe_method_optimizers
from miles.studies.planning import PlanContext, comparison_runs, method_plan
from miles.studies.runner import Echo, PlannedRun, RunBatch
from miles.studies.study import Study, run_study
from miles.studies.summary import Summary, summarize, summary_table
from miles.training.experiment import ExperimentConfig

__all__ = [
    "ALL_METHODS",
    "KIND",
    "Compare",
    "CompareConfig",
    "method_name",
    "plan_runs",
    "run_compare",
    "run_folder",
]

KIND = "compare"
#: every method (table order): the paper's references and seven baselines, the newer methods
#: (issue 13), MILES last
ALL_METHODS = (
    "joint",
    "joint+aux",
    "unimodal",
    "mses",
    "mslr-k",
    "mslr-s",
    "mslr-d",
    "ogm",
    "ogm-ge",
    "gblend",
    "agm",
    "pmr",
    "mla",
    "mmpareto",
    "reconboost",
    "greedy",
    # newer methods (issue 13)
    "mmcosine",
    "umt",
    "ume",
    "relearning",
    "opm",
    "ogm-tpami",
    "valuation-sample",
    "valuation-modality",
    "lfm",
    "cml",
    "miles",
)


def _compare_base() -> ExperimentConfig:
    return quiet_base(epochs=10)


@dataclass
class CompareConfig(StudyConfig):
    """One comparison: ``base`` x methods x fusions x seeds.

    ``base`` is what every run shares; its strategy, fusion, seed and ``out_dir`` are set per run.
    ``sweep_lrs``/``sweep_epochs`` configure the unimodal LR sweep MSLR needs (cached in
    ``sweep_cache``, default ``OUT/sweep``). ``method_optimizers``: ``{method: trainer settings}``
    for methods trained with other optimizer settings than ``base`` (specs such as ``"authors"``
    or ``"sgd:weight_decay=1e-4"`` are resolved, see :mod:`miles.studies.optimizers`).
    """

    base: ExperimentConfig = field(default_factory=_compare_base)
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    fusions: list[str] = field(default_factory=lambda: ["concat", "sum"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    sweep_lrs: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])
    sweep_epochs: int = 5
    sweep_cache: str | None = None
    method_optimizers: dict[str, dict[str, Any]] = field(default_factory=dict)
    out_dir: str = "compare-out"

    EXTENDABLE: ClassVar[tuple[str, ...]] = ("methods", "fusions", "seeds", "out_dir")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.methods = check_methods(self.methods)
        self.fusions = check_fusions(self.fusions)
        self.seeds = check_seeds(self.seeds)
        self.method_optimizers = check_method_optimizers(self.method_optimizers, self.methods)


def plan_runs(config: CompareConfig, ctx: PlanContext) -> list[PlannedRun]:
    """Every run, seed-major so a partial compare already has complete seeds."""
    variants = {m: comparison_runs(m, ctx) for m in config.methods}
    runs: list[PlannedRun] = []
    for seed in config.seeds:
        for fusion in config.fusions:
            for method in config.methods:
                independent = method_plan(method).fusion_independent
                if independent and fusion != config.fusions[0]:
                    continue  # shown under every fusion from the single run
                for label, params in variants[method]:
                    where = run_folder(method, label, fusion, seed)
                    runs.append(
                        PlannedRun(
                            config.run_config(
                                fusion=fusion,
                                strategy=method,
                                strategy_params=dict(params),
                                seed=seed,
                                out_dir=str(Path(config.out_dir) / where),
                                **config.method_optimizers.get(method, {}),
                            ),
                            {
                                "method": method,
                                "label": label,
                                "name": method_name({"method": method, "label": label}),
                                "fusion": fusion,
                                "seed": seed,
                            },
                            f"seed {seed} {where.split('/')[1]} {method} {label}".rstrip(),
                        )
                    )
    return runs


def run_folder(method: str, label: str, fusion: str, seed: int) -> str:
    """Where a compare run lives, relative to the output folder:
    ``runs/<fusion, or any-fusion for a fusion-independent method>/<method[-label]>/seed<k>``."""
    where = "any-fusion" if method_plan(method).fusion_independent else fusion
    name = f"{method}-{label}" if label else method
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return f"runs/{where}/{slug}/seed{seed}"


class Compare(Study[CompareConfig]):
    """The comparison: planned through :mod:`miles.studies.planning`; the unimodal references
    shown under every fusion; MSLR's unimodal LR sweep run on demand."""

    kind = KIND
    config_type = CompareConfig
    title_format = "miles compare: {config.base.dataset}"

    def __init__(self, config: CompareConfig, data: Any, echo: Echo) -> None:
        super().__init__(config, data, echo)
        self.unimodal_lrs: dict[str, float] = {}

    def _sweep(self) -> dict[str, float]:
        from miles.studies.lr_sweep import sweep_unimodal_lrs

        if not self.unimodal_lrs:
            cfg = self.config
            self.unimodal_lrs = sweep_unimodal_lrs(
                cfg.run_config(seed=cfg.seeds[0]),
                self.data,
                lrs=cfg.sweep_lrs,
                epochs=cfg.sweep_epochs,
                cache_dir=cfg.sweep_cache or self.out / "sweep",
                echo=self.echo,
            )
        return dict(self.unimodal_lrs)

    def plan(self) -> list[PlannedRun]:
        ctx = PlanContext(tuple(self.data.modalities), self._sweep, self.config.base.dataset)
        return plan_runs(self._applicable(), ctx)

    def _applicable(self) -> CompareConfig:
        """The config without the methods the task has too many modalities for: left out of
        ``--methods all`` with a note, refused (before any training) when named."""
        cfg, count = self.config, len(self.data.modalities)
        unfit = {}
        for method in cfg.methods:
            limit = strategy_class(method).max_modalities
            if limit is not None and count > limit:
                unfit[method] = limit
        if not unfit:
            return cfg
        why = ", ".join(f"{m} (at most {k})" for m, k in unfit.items())
        what = f"{cfg.base.dataset} has {count} modalities; {why} cannot run on it"
        if list(cfg.methods) != list(ALL_METHODS):
            raise ValueError(f"{what}: leave them out of --methods")
        self.echo(f"note: {what}, so 'all' leaves them out")
        return dataclasses.replace(cfg, methods=[m for m in cfg.methods if m not in unfit])

    def rows(self, batch: RunBatch) -> list[dict[str, Any]]:
        rows = []
        for outcome in batch.outcomes:
            independent = method_plan(outcome.run.ident["method"]).fusion_independent
            shown = self.config.fusions if independent else [outcome.run.ident["fusion"]]
            rows += [outcome.row(self.out) | {"fusion": fusion} for fusion in shown]
        return rows

    @classmethod
    def aggregate(
        cls, rows: Sequence[Mapping[str, Any]], config: CompareConfig, modalities: Sequence[str]
    ) -> Summary:
        """Per fusion and method, in the configured order."""
        rank = {m: i for i, m in enumerate(config.methods)}
        return summarize(
            rows,
            modalities,
            rank=lambda a: (config.fusions.index(a["fusion"]), rank.get(a["method"], len(rank))),
        )

    def extra(self, batch: RunBatch) -> dict[str, Any]:
        cfg = self.config
        optimizers = describe_method_optimizers(cfg.method_optimizers)
        return {
            "unimodal_lrs": self.unimodal_lrs,
            "meta": f"MSLR LRs from a {cfg.sweep_epochs}-epoch unimodal sweep over "
            f"{cfg.sweep_lrs}: {self.unimodal_lrs or 'not run'}."
            + (f" Per-method optimizer settings: {optimizers}." if optimizers else ""),
        }

    @classmethod
    def write_up(
        cls, doc: Document, payload: Mapping[str, Any], config: CompareConfig, summary: Summary
    ) -> None:
        """One Table II-shaped table per fusion."""
        first = [Column("method", method_name)]
        for fusion in config.fusions:
            cells = [a for a in summary.aggregate if a["fusion"] == fusion]
            caption = f"{fusion} fusion: test {payload['metric']} (%), mean ± std over seeds"
            doc.section(f"{fusion} fusion").blocks.append(
                summary_table(caption, cells, summary.order, first=first)
            )
        doc.intro.append(
            f"Test {payload['metric']} (%) at the chosen epoch, mean ± std over seeds "
            f"{config.seeds}. {summary.explain()}"
        )


def method_name(row: Mapping[str, Any]) -> str:
    """A compare row's name: its method, and the variant label of a method planned more than once
    (``miles (reset_other)``); the unimodal references are one row."""
    label = row.get("label") or ""
    return f"{row['method']} ({label})" if label and row["method"] != "unimodal" else row["method"]


def run_compare(config: CompareConfig, **options: Any) -> dict[str, Any]:
    """Run (or resume) the comparison and write ``compare.md`` (the tables),
    ``compare_table.csv`` (aggregated), ``compare_runs.csv`` (one row per run and seed) and
    ``compare.json`` (everything, ``kind: compare``); ``options`` as
    :func:`~miles.studies.study.run_study`. Returns what ``compare.json`` holds."""
    return run_study(Compare, config, **options)
