"""``miles compare``: every balancing method on the same data, model, budget and seeds.

Each method gets the base experiment (encoders, epochs, optimizer, base learning rate, batch size)
and the same seeds; only the strategy differs. How many runs a method needs comes from
:mod:`miles.studies.planning` (one per modality for the unimodal references, made once for every
fusion; the swept unimodal learning rates for MSLR), so this module knows no method by name.

The runs go through the shared run loop (:func:`miles.studies.runner.run_all`: resumable, with
divergence recorded). The table follows the paper's Table II: per method the fused metric, every
head (the dominant one first), the signed gap and the imbalance diagnostic, as mean ± std over
seeds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from miles.report.document import Document
from miles.studies.checks import check_fusions, check_methods, check_seeds
from miles.studies.config import StudyConfig, quiet_base
from miles.studies.planning import PlanContext, comparison_runs, method_plan
from miles.studies.runner import Echo, PlannedRun, hardware_line, run_all, setting_line
from miles.studies.summary import Summary, study_payload, summarize, summary_table, write_study
from miles.training.experiment import ExperimentConfig

__all__ = ["ALL_METHODS", "KIND", "CompareConfig", "compare_document", "plan_runs", "run_compare"]

KIND = "compare"
#: the paper's comparison: references, the seven baselines, MILES (in table order)
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
    "miles",
)


def _compare_base() -> ExperimentConfig:
    return quiet_base(epochs=10)


@dataclass
class CompareConfig(StudyConfig):
    """One comparison: ``base`` x methods x fusions x seeds.

    ``base`` is what every run shares; its strategy, fusion, seed and ``out_dir`` are set per run.
    ``sweep_lrs``/``sweep_epochs`` configure the unimodal LR sweep MSLR needs (cached in
    ``sweep_cache``, default ``OUT/sweep``).
    """

    base: ExperimentConfig = field(default_factory=_compare_base)
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    fusions: list[str] = field(default_factory=lambda: ["concat", "sum"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    sweep_lrs: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])
    sweep_epochs: int = 5
    sweep_cache: str | None = None
    out_dir: str = "compare-out"

    EXTENDABLE: ClassVar[tuple[str, ...]] = ("methods", "fusions", "seeds", "out_dir")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.methods = check_methods(self.methods)
        self.fusions = check_fusions(self.fusions)
        self.seeds = check_seeds(self.seeds)


def plan_runs(config: CompareConfig, ctx: PlanContext) -> list[PlannedRun]:
    """Every run, seed-major so a partial compare already has complete seeds."""
    root = Path(config.out_dir) / "runs"
    variants = {m: comparison_runs(m, ctx) for m in config.methods}
    runs: list[PlannedRun] = []
    for seed in config.seeds:
        for fusion in config.fusions:
            for method in config.methods:
                independent = method_plan(method).fusion_independent
                if independent and fusion != config.fusions[0]:
                    continue  # shown under every fusion from the single run
                where = "any-fusion" if independent else fusion
                for label, params in variants[method]:
                    name = _slug(f"{method}-{label}" if label else method)
                    runs.append(
                        PlannedRun(
                            config.run_config(
                                fusion=fusion,
                                strategy=method,
                                strategy_params=dict(params),
                                seed=seed,
                                out_dir=str(root / where / name / f"seed{seed}"),
                            ),
                            {"method": method, "label": label, "fusion": fusion, "seed": seed},
                            f"seed {seed} {where} {method} {label}".rstrip(),
                        )
                    )
    return runs


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def summarize_compare(
    rows: Sequence[Mapping[str, Any]], config: CompareConfig, modalities: Sequence[str]
) -> Summary:
    """Compare's aggregate step: per fusion and method, in the configured order."""
    rank = {m: i for i, m in enumerate(config.methods)}
    return summarize(
        rows,
        modalities,
        rank=lambda a: (config.fusions.index(a["fusion"]), rank.get(a["method"], len(rank))),
    )


def compare_document(payload: Mapping[str, Any]) -> Document:
    """``compare.md``: one Table II-shaped table per fusion (also the start of its report)."""
    config = CompareConfig.from_dict(dict(payload["config"]))
    summary = summarize_compare(payload["rows"], config, payload["modalities"])
    order = summary.order
    doc = Document(
        KIND,
        f"miles compare: {config.base.dataset}",
        [
            f"Test {payload['metric']} (%) at the epoch chosen on validation, mean ± std over "
            f"seeds {config.seeds}. Dominant modality by {summary.rule}: {order[0]}. "
            f"{summary.gap_rule}. The unimodal row holds each modality's own model (its encoder "
            "and head trained alone). aux = trained with the auxiliary unimodal losses. heads vs "
            "unimodal = each head minus its own modality's unimodal model, in points (the "
            "imbalance diagnostic). MILES acted = epochs trained with a lowered learning rate "
            "(a factor below 1); slowed = such epochs per modality. heads at last epoch = the "
            "same runs scored with the last epoch's weights (selection on validation alone can "
            "hide or create a gap).",
        ],
    )
    for fusion in config.fusions:
        cells = [a for a in summary.aggregate if a["fusion"] == fusion]
        doc.section(f"{fusion} fusion").blocks.append(
            summary_table(
                f"{fusion} fusion: test {payload['metric']} (%), mean ± std over seeds",
                cells,
                order,
            )
        )
    if summary.failure_note:
        doc.intro.append(summary.failure_note)
    doc.intro.append(payload.get("meta", ""))
    return doc


def run_compare(
    config: CompareConfig,
    *,
    echo: Echo = print,
    show: Echo | None = None,
    data: Any = None,
) -> dict[str, Any]:
    """Run (or resume) the comparison and write its files.

    Writes ``compare.md`` (the tables), ``compare_table.csv`` (the aggregated table),
    ``compare_runs.csv`` (one row per run and seed) and ``compare.json`` (everything, with
    ``kind: compare`` for ``miles report``). Returns what ``compare.json`` holds.

    ``echo`` gets the progress lines, ``show`` the final report (default: ``echo``).
    """
    from miles.studies.lr_sweep import sweep_unimodal_lrs

    out = Path(config.out_dir)
    config.check_folder("compare_settings.json", f"compare in {out}")
    if data is None:
        from miles.data import build_dataset

        data = build_dataset(config.base.dataset, **config.base.dataset_params)
    sweep: dict[str, float] = {}

    def unimodal_lrs() -> dict[str, float]:
        if not sweep:
            sweep.update(
                sweep_unimodal_lrs(
                    config.run_config(seed=config.seeds[0]),
                    data,
                    lrs=config.sweep_lrs,
                    epochs=config.sweep_epochs,
                    cache_dir=config.sweep_cache or out / "sweep",
                    echo=echo,
                )
            )
        return dict(sweep)

    runs = plan_runs(config, PlanContext(tuple(data.modalities), unimodal_lrs))
    batch = run_all(runs, data, echo=echo)
    rows = []
    for outcome in batch.outcomes:
        independent = method_plan(outcome.run.ident["method"]).fusion_independent
        for fusion in config.fusions if independent else [outcome.run.ident["fusion"]]:
            rows.append(outcome.row(out) | {"fusion": fusion})
    summary = summarize_compare(rows, config, data.modalities)
    meta = (
        f"{setting_line(config.base)} MSLR LRs from a {config.sweep_epochs}-epoch unimodal sweep "
        f"over {config.sweep_lrs}: {sweep or 'not run'}. "
        + hardware_line(batch.wall_s, batch.trained, len(runs) - batch.trained)
    )
    payload = study_payload(
        KIND,
        config,
        data,
        summary,
        meta,
        wall_s=batch.wall_s,
        trained=batch.trained,
        unimodal_lrs=sweep,
    )
    write_study(
        out,
        KIND,
        payload,
        compare_document(payload),
        (["fusion", "method", "label", "seed"], ["fusion", "method", "label", "uses_aux_losses"]),
        show or echo,
    )
    return payload
