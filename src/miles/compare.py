"""``miles compare``: every balancing method on the same data, model, budget and seeds.

Each method gets the same encoders, epochs, optimizer, base learning rate, batch size and seeds;
only the strategy differs. A method says itself how many runs it needs (``comparison_runs``: one
per modality for the unimodal references, the swept unimodal LRs for MSLR), so this module knows no
method by name. Runs whose result does not depend on the fusion (the unimodal references) are
made once and shown under both fusions.

Every finished run leaves ``done.json`` next to its ``result.json``; a re-started compare skips
those and resumes an interrupted run from its ``last.pt``. The table follows the paper's Table II:
per method the fused metric, the dominant and the weaker modality's head (dominant = the modality
whose unimodal reference scores higher), and their gap, as mean ± std over seeds.
"""

from __future__ import annotations

import csv
import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from miles.report.tables import aggregate, pm, summarize_run
from miles.strategies.base import ComparisonSetup
from miles.strategies.registry import available_strategies, strategy_class
from miles.training.experiment import ExperimentConfig, run_experiment
from miles.training.history import write_json
from miles.training.trainer import TrainerConfig

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
DONE = "done.json"


@dataclass
class CompareConfig:
    """One comparison: dataset x methods x fusions x seeds under one training budget."""

    dataset: str = "fsdd-mnist"
    dataset_params: dict[str, Any] = field(default_factory=dict)
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    fusions: list[str] = field(default_factory=lambda: ["concat", "sum"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: str = "adam"
    latent_dim: int = 64
    sweep_lrs: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])
    sweep_epochs: int = 5
    out_dir: str = "compare-out"

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("methods must not be empty")
        unknown = [m for m in self.methods if m not in available_strategies()]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; available: {available_strategies()}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods has duplicates: {self.methods}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and non-empty, got {self.seeds}")
        if not self.fusions:
            raise ValueError("fusions must not be empty")
        # TrainerConfig and ExperimentConfig validate the rest; build one now to fail early.
        self.trainer_config(self.seeds[0])
        for fusion in self.fusions:
            ExperimentConfig(dataset=self.dataset, fusion=fusion, latent_dim=self.latent_dim)

    def trainer_config(self, seed: int) -> TrainerConfig:
        return TrainerConfig(
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            seed=seed,
            progress=False,
        )


@dataclass
class PlannedRun:
    """One training run of the comparison and where it lives on disk."""

    method: str
    label: str
    params: dict[str, Any]
    fusion: str
    seed: int
    fusion_independent: bool
    out_dir: Path

    @property
    def display(self) -> str:
        return f"{self.method} {self.label}".strip()


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def plan_runs(config: CompareConfig, setup: ComparisonSetup) -> list[PlannedRun]:
    """Every run, seed-major so a partial compare already has complete seeds."""
    out = Path(config.out_dir) / "runs"
    runs: list[PlannedRun] = []
    per_method = {m: strategy_class(m).comparison_runs(setup) for m in config.methods}
    for seed in config.seeds:
        for fusion in config.fusions:
            for method in config.methods:
                cls = strategy_class(method)
                if cls.fusion_independent and fusion != config.fusions[0]:
                    continue  # shown under every fusion from the single run
                for label, params in per_method[method]:
                    name = _slug(f"{method}-{label}" if label else method)
                    where = "any-fusion" if cls.fusion_independent else fusion
                    runs.append(
                        PlannedRun(
                            method,
                            label,
                            params,
                            fusion,
                            seed,
                            cls.fusion_independent,
                            out / where / name / f"seed{seed}",
                        )
                    )
    return runs


def _run_one(run: PlannedRun, config: CompareConfig, data: Any) -> dict[str, Any]:
    """Train (or resume) one run; return its result dict. Finished runs are only read."""
    done = run.out_dir / DONE
    if done.is_file():
        return json.loads((run.out_dir / "result.json").read_text(encoding="utf-8"))
    exp = ExperimentConfig(
        dataset=config.dataset,
        dataset_params=dict(config.dataset_params),
        fusion=run.fusion,
        latent_dim=config.latent_dim,
        strategy=run.method,
        strategy_params=dict(run.params),
        trainer=config.trainer_config(run.seed),
        out_dir=str(run.out_dir),
    )
    result = run_experiment(exp, data=data, resume=True).to_dict()
    write_json(done, {"finished": True, "wall_time_s": result["wall_time_s"]})
    return result


def _mean_head(
    rows: Sequence[dict[str, Any]], method: str, modality: str, *, own_run: bool
) -> float | None:
    """Mean test metric of ``modality``'s head over ``method``'s runs (unimodal: its own run)."""
    vals = [
        r[modality]
        for r in rows
        if r["method"] == method and (not own_run or r["label"] == modality)
    ]
    return sum(vals) / len(vals) if vals else None


def dominant_order(
    rows: Sequence[dict[str, Any]], modalities: Sequence[str]
) -> tuple[list[str], str]:
    """Modalities from dominant to weakest, and the rule used to decide.

    Dominant = higher mean test metric of its unimodal reference; without references, higher mean
    head metric under joint training (said in the table's caption).
    """
    for method, own_run, rule in (
        ("unimodal", True, "unimodal reference (test)"),
        ("joint", False, "head under joint training (test)"),
    ):
        means = {m: _mean_head(rows, method, m, own_run=own_run) for m in modalities}
        if all(v is not None for v in means.values()):
            return sorted(modalities, key=lambda m: -(means[m] or 0.0)), rule
    return list(modalities), "modality order (no unimodal or joint runs)"


def _table_rows(
    rows: list[dict[str, Any]], config: CompareConfig, order: list[str]
) -> list[dict[str, Any]]:
    """Aggregate per (fusion, method), with heads renamed by rank (dominant, weaker, ...)."""
    ranked = []
    for r in rows:
        base = {
            "fusion": r["fusion"],
            "method": r["method"],
            "label": r["label"],
            "seed": r["seed"],
        }
        if r["method"] == "unimodal":
            # the reference row: each modality's own model in its column, no fused prediction
            continue
        ranked.append(
            base
            | {"fused": r["fused"], "best_epoch": r["best_epoch"], "acted": r["acted"]}
            | {f"head{i}": r[m] for i, m in enumerate(order)}
            | {"gap": r[order[0]] - r[order[-1]]}
        )
    for fusion in config.fusions:
        for seed in config.seeds:
            refs = {
                r["label"]: r[r["label"]]
                for r in rows
                if r["method"] == "unimodal" and r["seed"] == seed
            }
            if len(refs) == len(order):
                ranked.append(
                    {
                        "fusion": fusion,
                        "method": "unimodal",
                        "label": "",
                        "seed": seed,
                        "fused": None,
                        "best_epoch": None,
                        "acted": None,
                    }
                    | {f"head{i}": refs[m] for i, m in enumerate(order)}
                    | {"gap": refs[order[0]] - refs[order[-1]]}
                )
    values = ["fused", *(f"head{i}" for i in range(len(order))), "gap", "best_epoch", "acted"]
    agg = aggregate(ranked, ["fusion", "method"], values)
    rank = {m: i for i, m in enumerate(config.methods)}
    agg.sort(key=lambda a: (config.fusions.index(a["fusion"]), rank.get(a["method"], 99)))
    return agg


def markdown_report(
    agg: list[dict[str, Any]],
    config: CompareConfig,
    order: list[str],
    rule: str,
    metric: str,
    meta: str,
) -> str:
    """The Table II-shaped markdown: one table per fusion."""
    head_cols = [f"{m} head" + (" (dominant)" if i == 0 else "") for i, m in enumerate(order)]
    lines = [
        f"# miles compare: {config.dataset}",
        "",
        f"Test {metric} (%) at the epoch chosen on validation, mean ± std over seeds "
        f"{config.seeds}. Dominant modality by {rule}: {order[0]}. "
        "gap = dominant head - weakest head. The unimodal row holds each modality's own model "
        "(its encoder and head trained alone). aux = trained with the auxiliary unimodal losses.",
        "",
    ]
    for fusion in config.fusions:
        lines += [
            f"## {fusion} fusion",
            "",
            "| method | aux | fused | "
            + " | ".join(head_cols)
            + " | gap | chosen epoch | MILES acted |",
            "|---|---|---|" + "---|" * len(head_cols) + "---|---|---|",
        ]
        for a in agg:
            if a["fusion"] != fusion:
                continue
            cls = strategy_class(a["method"])
            aux = "-" if a["method"] == "unimodal" else ("yes" if cls.uses_aux_losses else "no")
            heads = " | ".join(pm(a, f"head{i}") for i in range(len(order)))
            acted = pm(a, "acted", pct=False) if a["method"] == "miles" else "-"
            lines.append(
                f"| {a['method']} | {aux} | {pm(a, 'fused')} | {heads} | {pm(a, 'gap')} | "
                f"{pm(a, 'best_epoch', pct=False)} | {acted} |"
            )
        lines.append("")
    lines.append(meta)
    return "\n".join(lines) + "\n"


def run_compare(config: CompareConfig, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the comparison; write ``compare.md``, ``compare.csv``, ``compare.json``."""
    from miles.data import build_dataset
    from miles.training.lr_sweep import sweep_unimodal_lrs

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare_config.json", asdict(config))
    data = build_dataset(config.dataset, **config.dataset_params)
    sweep: dict[str, float] = {}

    def unimodal_lrs() -> dict[str, float]:
        if not sweep:
            echo(
                f"unimodal LR sweep {config.sweep_lrs} x {list(data.modalities)}, "
                f"{config.sweep_epochs} epochs (cached in {out / 'sweep'})"
            )
            sweep.update(
                sweep_unimodal_lrs(
                    config.dataset,
                    data,
                    lrs=config.sweep_lrs,
                    epochs=config.sweep_epochs,
                    seed=config.seeds[0],
                    latent_dim=config.latent_dim,
                    cache_dir=out / "sweep",
                    progress=True,
                    trainer_overrides={
                        "batch_size": config.batch_size,
                        "optimizer": config.optimizer,
                    },
                    dataset_params=config.dataset_params,
                )
            )
            echo(f"unimodal LRs: {sweep}")
        return dict(sweep)

    setup = ComparisonSetup(tuple(data.modalities), config.lr, unimodal_lrs)
    runs = plan_runs(config, setup)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    trained = 0
    for index, run in enumerate(runs, 1):
        was_done = (run.out_dir / DONE).is_file()
        t0 = time.perf_counter()
        result = _run_one(run, config, data)
        fusions = config.fusions if run.fusion_independent else [run.fusion]
        for fusion in fusions:
            row = summarize_run(result) | {
                "fusion": fusion,
                "method": run.method,
                "label": run.label,
            }
            rows.append(row)
        if was_done:
            echo(
                f"[{index}/{len(runs)}] seed {run.seed} {run.fusion:6s} {run.display}: done earlier"
            )
            continue
        trained += 1
        elapsed = time.perf_counter() - start
        eta = elapsed / trained * (len(runs) - index)
        echo(
            f"[{index}/{len(runs)}] seed {run.seed} {run.fusion:6s} {run.display}: fused "
            f"{100 * result['test']['fused']:.1f} ({time.perf_counter() - t0:.0f} s; "
            f"elapsed {elapsed:.0f} s, ~{eta:.0f} s left)"
        )
    order, rule = dominant_order(rows, data.modalities)
    agg = _table_rows(rows, config, order)
    wall = time.perf_counter() - start
    meta = (
        f"Setting: {config.epochs} epochs, {config.optimizer} lr {config.lr}, batch "
        f"{config.batch_size}, latent {config.latent_dim}; MSLR LRs from a "
        f"{config.sweep_epochs}-epoch "
        f"unimodal sweep over {config.sweep_lrs}: {sweep or 'not run'}. Hardware: "
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}. "
        f"Wall time of this invocation: {wall:.0f} s ({trained} runs trained, "
        f"{len(runs) - trained} read from disk)."
    )
    report = markdown_report(agg, config, order, rule, data.metric, meta)
    (out / "compare.md").write_text(report, encoding="utf-8")
    columns = sorted(
        {k for r in rows for k in r},
        key=lambda c: (c not in ("fusion", "method", "label", "seed"), c),
    )
    with (out / "compare.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    payload = {
        "config": asdict(config),
        "dominant_order": order,
        "dominant_rule": rule,
        "unimodal_lrs": sweep,
        "rows": rows,
        "aggregate": agg,
        "meta": meta,
    }
    write_json(out / "compare.json", payload)
    echo("")
    echo(report)
    echo(f"wrote {out / 'compare.md'}, compare.csv, compare.json")
    return payload
