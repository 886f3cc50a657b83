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
RUN_CONFIG = "run_config.json"
#: settings that may differ between invocations sharing an output folder (they add runs)
_EXTENDABLE = ("methods", "fusions", "seeds", "out_dir")


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
    sweep_cache: str | None = None
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


def run_or_resume(
    exp: ExperimentConfig,
    data: Any,
    *,
    runner: Callable[..., Any] = run_experiment,
    ignore_trainer_keys: Sequence[str] = (),
    label: str = "run",
) -> dict[str, Any]:
    """Train (or resume) the run in ``exp.out_dir`` and return its result; finished runs are read.

    A finished run leaves ``done.json``. A run whose training diverges (``FloatingPointError``) is
    recorded as failed, with the reason, instead of aborting the caller's loop: re-running it would
    diverge the same way. A run folder started under other settings is refused before anything in
    it is read or trained (``ignore_trainer_keys``, e.g. ``device``, may differ). Shared by
    ``miles compare``, ``miles ablate`` and ``miles sweep``.
    """
    run_dir = Path(str(exp.out_dir))
    check_run_settings(run_dir, exp, ignore_trainer_keys=ignore_trainer_keys, label=label)
    done = run_dir / DONE
    result_path = run_dir / "result.json"
    if done.is_file():
        status = json.loads(done.read_text(encoding="utf-8"))
        if status.get("failed"):
            return {"failed": status["failed"]}
        if result_path.is_file():
            loaded: dict[str, Any] = json.loads(result_path.read_text(encoding="utf-8"))
            return loaded
    try:
        result: dict[str, Any] = runner(exp, data=data, resume=True).to_dict()
    except FloatingPointError as exc:
        write_json(done, {"failed": str(exc)})
        return {"failed": str(exc)}
    write_json(done, {"finished": True, "wall_time_s": result["wall_time_s"]})
    return result


def check_run_settings(
    run_dir: Path,
    exp: ExperimentConfig,
    *,
    ignore_trainer_keys: Sequence[str] = (),
    label: str = "run",
) -> None:
    """Refuse a run folder made under other settings; the first call records them."""
    settings = exp.to_dict()
    for key in ignore_trainer_keys:
        settings["trainer"].pop(key, None)
    _check_same_settings(run_dir / RUN_CONFIG, settings, what=f"{label} {run_dir}")


def _run_one(run: PlannedRun, config: CompareConfig, data: Any) -> dict[str, Any]:
    """One planned run of the comparison (see :func:`run_or_resume`)."""
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
    return run_or_resume(exp, data, runner=run_experiment)


def _check_same_settings(path: Path, settings: dict[str, Any], *, what: str) -> None:
    """Refuse to mix results made under different settings in one output folder."""
    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored != json.loads(json.dumps(settings)):
            diff = sorted(
                k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k)
            )
            raise ValueError(
                f"{what} was started with different settings (differs in {diff}); use a new "
                "--out folder, or delete the old one, to compare under new settings"
            )
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, settings)


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
    """Aggregate per (fusion, method); the unimodal row holds each modality's own model."""
    table = [r for r in rows if r["method"] != "unimodal" and not r.get("failed")]
    for fusion in config.fusions:
        for seed in config.seeds:
            refs = {
                r["label"]: r[r["label"]]
                for r in rows
                if r["method"] == "unimodal" and r["seed"] == seed and not r.get("failed")
            }
            if len(refs) == len(order):
                table.append(
                    {"fusion": fusion, "method": "unimodal", "seed": seed}
                    | refs
                    | {"gap": refs[order[0]] - refs[order[-1]]}
                )
    last = [f"{m}_last" for m in order]
    values = ["fused", *order, "gap", "best_epoch", "acted", *last]
    agg = aggregate(table, ["fusion", "method"], values)
    # the imbalance diagnostic: each head against its own modality's unimodal model
    refs_mean = {
        (a["fusion"], m): a[f"{m}_mean"] for a in agg if a["method"] == "unimodal" for m in order
    }
    for a in agg:
        for m in order:
            ref = refs_mean.get((a["fusion"], m))
            a[f"{m}_vs_unimodal"] = (
                a[f"{m}_mean"] - ref if ref is not None and a["method"] != "unimodal" else None
            )
    rank = {m: i for i, m in enumerate(config.methods)}
    agg.sort(key=lambda a: (config.fusions.index(a["fusion"]), rank.get(a["method"], 99)))
    for a in agg:
        a["uses_aux_losses"] = (
            None if a["method"] == "unimodal" else strategy_class(a["method"]).uses_aux_losses
        )
    return agg


def _failures(rows: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
    """How many runs diverged, per (fusion, method)."""
    counts: dict[tuple[str, str], int] = {}
    for r in rows:
        if r.get("failed"):
            counts[(r["fusion"], r["method"])] = counts.get((r["fusion"], r["method"]), 0) + 1
    return counts


def markdown_report(
    agg: list[dict[str, Any]],
    config: CompareConfig,
    order: list[str],
    rule: str,
    metric: str,
    meta: str,
    failures: dict[tuple[str, str], int] | None = None,
) -> str:
    """The Table II-shaped markdown: one table per fusion."""
    head_cols = [f"{m} head" + (" (dominant)" if i == 0 else "") for i, m in enumerate(order)]
    lines = [
        f"# miles compare: {config.dataset}",
        "",
        f"Test {metric} (%) at the epoch chosen on validation, mean ± std over seeds "
        f"{config.seeds}. Dominant modality by {rule}: {order[0]}. "
        f"gap = {order[0]} head - {order[-1]} head (negative: the dominant modality's head ended "
        "below the other's). The unimodal row holds each modality's own model (its encoder and "
        "head trained alone). aux = trained with the auxiliary unimodal losses. heads vs "
        "unimodal = each head minus its own modality's unimodal model, in points (the imbalance "
        "diagnostic). heads at last epoch = the same runs scored with the last epoch's weights "
        "(best-on-validation selection alone can hide or create a gap).",
        "",
    ]
    for fusion in config.fusions:
        lines += [
            f"## {fusion} fusion",
            "",
            "| method | aux | fused | "
            + " | ".join(head_cols)
            + " | gap | heads vs unimodal (pp) | chosen epoch | heads at last epoch "
            + "| MILES acted |",
            "|---|---|---|" + "---|" * len(head_cols) + "---|---|---|---|---|",
        ]
        for a in agg:
            if a["fusion"] != fusion:
                continue
            aux = {None: "-", True: "yes", False: "no"}[a["uses_aux_losses"]]
            heads = " | ".join(pm(a, m) for m in order)
            acted = pm(a, "acted", pct=False) if a["method"] == "miles" else "-"
            deltas = [a.get(f"{m}_vs_unimodal") for m in order]
            vs_uni = (
                " / ".join(f"{100 * d:+.1f}" for d in deltas if d is not None)
                if all(d is not None for d in deltas)
                else "-"
            )
            last_heads = " / ".join(pm(a, f"{m}_last") for m in order)
            lines.append(
                f"| {a['method']} | {aux} | {pm(a, 'fused')} | {heads} | {pm(a, 'gap')} | "
                f"{vs_uni} | {pm(a, 'best_epoch', pct=False)} | {last_heads} | {acted} |"
            )
        lines.append("")
    if failures:
        notes = [f"{f}/{m}: {n} run(s) diverged" for (f, m), n in failures.items()]
        lines += ["Diverged runs (left out of the means): " + "; ".join(notes) + ".", ""]
    lines.append(meta)
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict[str, Any]], first: Sequence[str]) -> None:
    columns = list(first) + sorted({k for r in rows for k in r} - set(first))
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def run_compare(config: CompareConfig, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the comparison.

    Writes ``compare.md`` (the tables), ``compare_table.csv`` (the aggregated table),
    ``compare_runs.csv`` (one row per run and seed) and ``compare.json`` (everything).
    """
    from miles.data import build_dataset
    from miles.training.lr_sweep import sweep_unimodal_lrs

    out = Path(config.out_dir)
    settings = {k: v for k, v in asdict(config).items() if k not in _EXTENDABLE}
    _check_same_settings(out / "compare_settings.json", settings, what=f"compare in {out}")
    write_json(out / "compare_config.json", asdict(config))
    data = build_dataset(config.dataset, **config.dataset_params)
    sweep: dict[str, float] = {}
    sweep_dir = Path(config.sweep_cache) if config.sweep_cache else out / "sweep"

    def unimodal_lrs() -> dict[str, float]:
        if not sweep:
            echo(
                f"unimodal LR sweep {config.sweep_lrs} x {list(data.modalities)}, "
                f"{config.sweep_epochs} epochs (cached in {sweep_dir})"
            )
            sweep.update(
                sweep_unimodal_lrs(
                    config.dataset,
                    data,
                    lrs=config.sweep_lrs,
                    epochs=config.sweep_epochs,
                    seed=config.seeds[0],
                    latent_dim=config.latent_dim,
                    cache_dir=sweep_dir,
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
    to_train = sum(1 for r in runs if not (r.out_dir / DONE).is_file())
    echo(f"{len(runs)} runs planned, {len(runs) - to_train} already done, {to_train} to train")
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    trained = 0
    for index, run in enumerate(runs, 1):
        tag = f"[{index}/{len(runs)}] seed {run.seed} {run.fusion:6s} {run.display}"
        was_done = (run.out_dir / DONE).is_file()
        if not was_done:
            echo(f"{tag}: training ...")
        t0 = time.perf_counter()
        result = _run_one(run, config, data)
        cls = strategy_class(run.method)
        for fusion in config.fusions if run.fusion_independent else [run.fusion]:
            ident = {"fusion": fusion, "method": run.method, "label": run.label, "seed": run.seed}
            if "failed" in result:
                rows.append(ident | {"failed": result["failed"]})
            else:
                rows.append(
                    summarize_run(result) | ident | {"uses_aux_losses": cls.uses_aux_losses}
                )
        if was_done:
            echo(f"{tag}: done earlier")
            continue
        trained += 1
        elapsed = time.perf_counter() - start
        eta = elapsed / trained * (to_train - trained)
        outcome = (
            f"DIVERGED ({result['failed']})"
            if "failed" in result
            else f"fused {100 * result['test']['fused']:.1f}"
        )
        echo(
            f"{tag}: {outcome} ({time.perf_counter() - t0:.0f} s; "
            f"elapsed {elapsed:.0f} s, ~{eta:.0f} s left)"
        )
    order, rule = dominant_order([r for r in rows if not r.get("failed")], data.modalities)
    for row in rows:  # one signed gap everywhere: dominant head minus weakest head
        if not row.get("failed"):
            row["gap"] = row[order[0]] - row[order[-1]]
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
    failures = _failures(rows)
    report = markdown_report(agg, config, order, rule, data.metric, meta, failures)
    (out / "compare.md").write_text(report, encoding="utf-8")
    _write_csv(out / "compare_runs.csv", rows, ["fusion", "method", "label", "seed"])
    _write_csv(out / "compare_table.csv", agg, ["fusion", "method", "uses_aux_losses", "n"])
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
    echo(f"wrote {out / 'compare.md'}, compare_table.csv, compare_runs.csv, compare.json")
    return payload
