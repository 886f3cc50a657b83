"""``miles demo``: joint, joint+aux and MILES on FSDD-MNIST, both fusions, offline.

It shows the imbalance (how far each head is from the other under vanilla joint training), what the
auxiliary losses already do, and what MILES adds on top; it says so plainly when MILES never acted.
The runs go through the shared run loop, so re-running the demo into the same folder reads the
finished runs instead of training them again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from miles.extras import require
from miles.report.document import Document
from miles.report.tables import Column
from miles.results import acted_epochs, factors_in_force, idle_reasons, max_delta
from miles.studies.checks import check_fusions, check_methods
from miles.studies.config import StudyConfig
from miles.studies.runner import PlannedRun, RunBatch
from miles.studies.study import Study, run_study
from miles.studies.summary import Summary, display_name, summary_table
from miles.training.experiment import ExperimentConfig
from miles.training.trainer import TrainerConfig

__all__ = [
    "DEMO_EPOCHS",
    "DEMO_METHODS",
    "KIND",
    "Demo",
    "DemoConfig",
    "never_acted_warning",
    "plan_runs",
    "run_demo",
]

KIND = "demo"
DEMO_METHODS = ("joint", "joint+aux", "miles")
DEMO_EPOCHS = 15
#: the table the demo prints: per run, the numbers the README quotes
DEMO_COLUMNS = ("fused", "heads", "gap", "probe", "slice", "chosen", "acted")


def _demo_base() -> ExperimentConfig:
    return ExperimentConfig(dataset="fsdd-mnist", trainer=TrainerConfig(epochs=DEMO_EPOCHS))


@dataclass
class DemoConfig(StudyConfig):
    """Every method x fusion from ``base`` (its seed included); ``miles_params`` (e.g.
    ``{"tau": 0.1}``) go to MILES only. Every method shares the seed, hence the same initial
    weights and batch order."""

    base: ExperimentConfig = field(default_factory=_demo_base)
    methods: list[str] = field(default_factory=lambda: list(DEMO_METHODS))
    fusions: list[str] = field(default_factory=lambda: ["concat", "sum"])
    miles_params: dict[str, Any] = field(default_factory=dict)
    out_dir: str = "demo-out"

    EXTENDABLE: ClassVar[tuple[str, ...]] = ("methods", "fusions", "out_dir")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.methods = check_methods(self.methods)
        self.fusions = check_fusions(self.fusions)
        if "miles" in self.methods:  # bad tau/mu fail here, before any training
            from miles.strategies import build_strategy

            build_strategy("miles", **self.miles_params)


def plan_runs(config: DemoConfig) -> list[PlannedRun]:
    """One run per fusion and method, fusion-major (the order of the printed table)."""
    root = Path(config.out_dir) / "runs"
    return [
        PlannedRun(
            config.run_config(
                fusion=fusion,
                strategy=method,
                strategy_params=dict(config.miles_params) if method == "miles" else {},
                out_dir=str(root / f"{fusion}-{method.replace('+', '_')}"),
            ),
            {"method": method, "label": "", "fusion": fusion, "seed": config.base.trainer.seed},
            f"{fusion:6s} {method}",
        )
        for fusion in config.fusions
        for method in config.methods
    ]


def never_acted_warning(key: str, result: Mapping[str, Any]) -> str:
    """Say that a MILES run trained exactly like joint+aux, and why (from its decisions)."""
    reasons = idle_reasons(result)
    why = ", ".join(f"{reason}: {n}" for reason, n in reasons.items()) or "a single epoch"
    md = max_delta(result)
    largest = (
        f"; largest delta {md:.3f}, tau {result['strategy'].get('tau')}" if md is not None else ""
    )
    return (
        f"warning: MILES never acted in {key} ({why}{largest}): it trained exactly like joint+aux"
    )


class Demo(Study[DemoConfig]):
    """The demo: every method x fusion; warns about MILES runs that never acted; draws the
    learning dynamics of the runs MILES decided in."""

    kind = KIND
    config_type = DemoConfig
    title_format = "miles demo: {config.base.dataset}"
    columns = (("fusion", "method", "seed"), ("fusion", "method"))

    @property
    def stem(self) -> str:
        return "results"

    def check(self) -> None:
        require("matplotlib", what="miles demo's learning-dynamics plot")  # before any training
        super().check()

    def plan(self) -> list[PlannedRun]:
        base, info = self.config.base, self.data.info
        self.echo(
            f"{base.dataset}: {info.get('sizes', {})} pairs, modalities "
            f"{list(self.data.modalities)}; {base.trainer.epochs} epochs, seed {base.trainer.seed}"
        )
        return plan_runs(self.config)

    def extra(self, batch: RunBatch) -> dict[str, Any]:
        from miles.report.plots import plot_learning_dynamics

        runs = {
            f"{o.run.ident['fusion']}/{o.run.ident['method']}": o.result
            for o in batch.outcomes
            if o.result is not None
        }
        warnings = [  # MILES runs that never trained at a lowered rate
            never_acted_warning(key, result)
            for key, result in runs.items()
            if acted_epochs(result) == []
        ]
        decided = {k: r for k, r in runs.items() if factors_in_force(r) is not None}
        plot = plot_learning_dynamics(decided or runs, self.out / "learning_dynamics.png")
        return {
            "dataset_info": self.data.info,
            "warnings": warnings,
            "runs": runs,
            "figures": [plot],
        }

    @classmethod
    def write_up(
        cls, doc: Document, payload: Mapping[str, Any], config: DemoConfig, summary: Summary
    ) -> None:
        """The demo's table (one row per fusion and method), its caption and warnings."""
        sizes = payload.get("dataset_info", {}).get("sizes")
        t = config.base.trainer
        doc.intro += [
            f"{config.base.dataset}"
            + (f" ({sizes} pairs)" if sizes else "")
            + f", modalities {list(payload['modalities'])}: {t.epochs} epochs, seed {t.seed}, "
            f"lr {t.lr:g}; MILES settings: {config.miles_params or 'default'}.",
            f"Test {payload['metric']} (%) at the chosen epoch (one seed). "
            + summary.explain(DEMO_COLUMNS),
            *payload.get("warnings", []),
        ]
        first = [Column("fusion", lambda r: str(r["fusion"])), Column("method", display_name)]
        doc.section("Results").blocks.append(
            summary_table(
                f"test {payload['metric']} (%)",
                summary.aggregate,
                summary.order,
                first=first,
                groups=DEMO_COLUMNS,
            )
        )


def run_demo(config: DemoConfig, **options: Any) -> dict[str, Any]:
    """Run every method x fusion and write ``results.json`` (``kind: demo``), ``results.md``,
    the CSVs and ``learning_dynamics.png`` (matplotlib is checked before any training);
    ``options`` as :func:`~miles.studies.study.run_study`. Returns what ``results.json``
    holds."""
    return run_study(Demo, config, **options)
