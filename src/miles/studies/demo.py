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
from miles.report.document import Document, markdown_table
from miles.report.tables import Column
from miles.results import factors_in_force, idle_reasons, max_delta
from miles.studies.checks import check_fusions, check_methods
from miles.studies.config import StudyConfig
from miles.studies.runner import Echo, PlannedRun, hardware_line, run_all, setting_line
from miles.studies.summary import study_payload, summarize, summary_table, write_study
from miles.training.experiment import ExperimentConfig
from miles.training.trainer import TrainerConfig

__all__ = [
    "DEMO_EPOCHS",
    "DEMO_METHODS",
    "KIND",
    "DemoConfig",
    "demo_document",
    "never_acted_warning",
    "plan_runs",
    "run_demo",
]

KIND = "demo"
DEMO_METHODS = ("joint", "joint+aux", "miles")
DEMO_EPOCHS = 15
#: the table the demo prints: per run, the numbers the README quotes
DEMO_COLUMNS = ("fused", "heads", "gap", "chosen", "acted")


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


def demo_document(payload: Mapping[str, Any]) -> Document:
    """The demo's table (one row per fusion and method) with its caption and warnings."""
    config = DemoConfig.from_dict(dict(payload["config"]))
    summary = summarize(payload["rows"], payload["modalities"])
    sizes = payload.get("dataset_info", {}).get("sizes")
    t = config.base.trainer
    doc = Document(
        KIND,
        f"miles demo: {config.base.dataset}",
        [
            f"{config.base.dataset}"
            + (f" ({sizes} pairs)" if sizes else "")
            + f", modalities {list(payload['modalities'])}: {t.epochs} epochs, seed {t.seed}, "
            f"lr {t.lr:g}; MILES settings: {config.miles_params or 'default'}.",
            f"Test {payload['metric']} (%) at the epoch chosen on validation (one seed). Dominant "
            f"modality by {summary.rule}: {summary.order[0]}. {summary.gap_rule}. MILES acted = "
            "epochs trained with a lowered learning rate for some modality (a factor below 1).",
            *payload.get("warnings", []),
        ],
    )
    doc.section("Results").blocks.append(
        summary_table(
            f"test {payload['metric']} (%)",
            summary.aggregate,
            summary.order,
            first=[
                Column("fusion", lambda r: str(r["fusion"])),
                Column("method", lambda r: str(r["method"])),
            ],
            groups=DEMO_COLUMNS,
        )
    )
    doc.intro.append(payload.get("meta", ""))
    return doc


def run_demo(
    config: DemoConfig,
    *,
    echo: Echo = print,
    show: Echo | None = None,
    data: Any = None,
) -> dict[str, Any]:
    """Run every method x fusion; write ``results.json`` (``kind: demo``), ``results.md``, the
    CSVs and ``learning_dynamics.png``. matplotlib is checked before any training.

    ``echo`` gets the progress lines, ``show`` the final report (default: ``echo``).
    """
    require("matplotlib", what="miles demo's learning-dynamics plot")
    from miles.report.plots import plot_learning_dynamics

    out = Path(config.out_dir)
    config.check_folder("demo_settings.json", f"demo in {out}")
    if data is None:
        from miles.data import build_dataset

        data = build_dataset(config.base.dataset, **config.base.dataset_params)
    echo(
        f"{config.base.dataset}: {data.info.get('sizes', {})} pairs, modalities "
        f"{list(data.modalities)}; {config.base.trainer.epochs} epochs, seed "
        f"{config.base.trainer.seed}"
    )
    batch = run_all(plan_runs(config), data, echo=echo)
    rows = batch.rows(out)
    summary = summarize(rows, data.modalities)
    runs = {
        f"{o.run.ident['fusion']}/{o.run.ident['method']}": o.result
        for o in batch.outcomes
        if o.result is not None
    }
    warnings = [
        never_acted_warning(f"{r['fusion']}/{r['method']}", runs[f"{r['fusion']}/{r['method']}"])
        for r in summary.rows
        if r.get("acted") == 0
    ]
    # the dynamics of the runs MILES decided in (of every run when there are none)
    decided = {k: r for k, r in runs.items() if factors_in_force(r) is not None}
    plot_path = plot_learning_dynamics(decided or runs, out / "learning_dynamics.png")
    meta = (
        setting_line(config.base)
        + " "
        + hardware_line(batch.wall_s, batch.trained, len(batch.outcomes) - batch.trained)
    )
    payload = study_payload(
        KIND,
        config,
        data,
        summary,
        meta,
        wall_s=batch.wall_s,
        trained=batch.trained,
        dataset_info=data.info,
        warnings=warnings,
    )
    doc = demo_document(payload)
    payload["table_markdown"] = markdown_table(doc.tables[0], caption=False)
    payload["runs"] = runs
    write_study(
        out,
        "results",
        payload,
        doc,
        (["fusion", "method", "seed"], ["fusion", "method"]),
        show or echo,
    )
    (show or echo)(f"and {plot_path}")
    return payload
