"""``miles demo``: joint, joint+aux and MILES on FSDD-MNIST, both fusions, offline.

It shows the imbalance (how far each head is from the other under vanilla joint training), what the
auxiliary losses already do, and what MILES adds on top; it says so plainly when MILES never acted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from miles.report.tables import idle_reasons, markdown_table, max_delta, summarize_run
from miles.strategies.registry import build_strategy
from miles.training.experiment import ExperimentConfig, run_experiment
from miles.training.history import write_json
from miles.training.trainer import TrainerConfig

DEMO_METHODS = ("joint", "joint+aux", "miles")
DEMO_EPOCHS = 15


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


def run_demo(
    out_dir: str | Path,
    *,
    epochs: int = DEMO_EPOCHS,
    seed: int = 0,
    fusions: Sequence[str] = ("concat", "sum"),
    methods: Sequence[str] = DEMO_METHODS,
    lr: float = 1e-3,
    miles_params: Mapping[str, Any] | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every method x fusion on FSDD-MNIST; write ``results.json`` and the dynamics PNG.

    ``miles_params`` (e.g. ``{"tau": 0.1}``) go to the MILES strategy only; every method shares
    the seed, hence the same initial weights and batch order.
    """
    from miles.data import build_dataset
    from miles.report.plots import plot_learning_dynamics

    if "miles" in methods:  # fail on bad tau/mu before any training, not after four runs
        build_strategy("miles", **dict(miles_params or {}))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = build_dataset("fsdd-mnist")
    sizes = data.info.get("sizes", {})
    echo(
        f"FSDD-MNIST: {sizes} pairs, modalities {list(data.modalities)}; "
        f"{epochs} epochs, seed {seed}"
    )
    runs: dict[str, dict[str, Any]] = {}
    rows = []
    total = len(fusions) * len(methods)
    start = time.perf_counter()
    for fusion in fusions:
        for method in methods:
            key = f"{fusion}/{method}"
            cfg = ExperimentConfig(
                dataset="fsdd-mnist",
                fusion=fusion,
                strategy=method,
                strategy_params=dict(miles_params or {}) if method == "miles" else {},
                trainer=TrainerConfig(epochs=epochs, lr=lr, seed=seed, progress=progress),
                out_dir=str(out / "runs" / f"{fusion}-{method.replace('+', '_')}"),
            )
            result = run_experiment(cfg, data=data).to_dict()
            runs[key] = result
            row = summarize_run(result)
            rows.append(row)
            heads = ", ".join(f"{m} {100 * row[m]:.1f}" for m in data.modalities)
            echo(
                f"[{len(rows)}/{total}] {fusion:6s} {method:9s} "
                f"test fused {100 * row['fused']:.1f}, "
                f"{heads} (best epoch {row['best_epoch']}, {result['wall_time_s']:.1f} s)"
            )
    columns = ["fusion", "method", "fused", *data.modalities, "gap", "best_epoch", "acted"]
    table = markdown_table(rows, columns, percent=["fused", *data.modalities, "gap"])
    warnings = [
        never_acted_warning(key, result)
        for row, (key, result) in zip(rows, runs.items(), strict=True)
        if row["acted"] == 0
    ]
    plot_path = plot_learning_dynamics(
        {k: r for k, r in runs.items() if r["strategy"]["name"] == "miles"} or runs,
        out / "learning_dynamics.png",
    )
    payload = {
        "dataset": "fsdd-mnist",
        "dataset_info": data.info,
        "epochs": epochs,
        "seed": seed,
        "lr": lr,
        "miles_params": dict(miles_params or {}),
        "rows": rows,
        "table_markdown": table,
        "warnings": warnings,
        "wall_time_s": time.perf_counter() - start,
        "runs": runs,
    }
    write_json(out / "results.json", payload)
    echo("")
    echo("Test metrics (%) at the best-validation epoch; gap = |audio head - image head|;")
    echo("acted = epochs in which MILES slowed a modality.")
    echo(table)
    for w in warnings:
        echo(w)
    echo(f"\nwrote {out / 'results.json'} and {plot_path} ({payload['wall_time_s']:.0f} s)")
    return payload
