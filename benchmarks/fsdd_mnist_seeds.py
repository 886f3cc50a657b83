"""Multi-seed FSDD-MNIST table for the README: joint, joint+aux and MILES, both fusions.

Runs the ``miles demo`` setting for several seeds and prints a markdown table of test metrics
(mean ± sample std over seeds) plus, for MILES, in how many epochs it acted. Every run of every
seed is summarized together (one dominant order, one signed gap), through the same aggregate step
and columns as ``miles compare``. Writes every run's row to ``--out/rows.json`` and the table to
``--out/table.md``.

    python benchmarks/fsdd_mnist_seeds.py --seeds 0 1 2 --out benchmarks/results/fsdd_mnist
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time
from pathlib import Path

import torch

from miles.report.document import markdown_table, write_json
from miles.report.tables import Column
from miles.studies.demo import DEMO_EPOCHS, DEMO_METHODS, DemoConfig, run_demo
from miles.studies.summary import display_name, summarize, summary_table
from miles.training.experiment import ExperimentConfig
from miles.training.trainer import TrainerConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=DEMO_EPOCHS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fsdd_mnist"))
    parser.add_argument(
        "--extra-tau",
        type=float,
        nargs="*",
        default=[0.1, 0.05],
        help="also run MILES with these thresholds (sensitivity rows)",
    )
    args = parser.parse_args()

    start = time.perf_counter()
    rows = []
    quiet = {"echo": lambda _msg: None}
    for seed in args.seeds:
        base = ExperimentConfig(
            dataset="fsdd-mnist",
            trainer=TrainerConfig(epochs=args.epochs, seed=seed, progress=False),
        )
        demo = DemoConfig(base=base, out_dir=str(args.out / f"seed{seed}"))
        rows.extend(run_demo(demo, **quiet)["rows"])
        for tau in args.extra_tau:
            extra = dataclasses.replace(
                demo,
                methods=["miles"],
                miles_params={"tau": tau},
                out_dir=str(args.out / f"seed{seed}-tau{tau}"),
            )
            rows.extend(
                {**r, "label": f"miles tau={tau}"} for r in run_demo(extra, **quiet)["rows"]
            )
        print(f"seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
    names = [*DEMO_METHODS, *(f"miles tau={t}" for t in args.extra_tau)]
    summary = summarize(
        rows,
        ["audio", "image"],
        rank=lambda a: (a["fusion"], names.index(display_name(a))),
    )
    table = summary_table(
        "FSDD-MNIST, mean ± std over seeds",
        summary.aggregate,
        summary.order,
        first=[Column("fusion", lambda r: str(r["fusion"])), Column("method", display_name)],
        groups=("fused", "heads", "gap", "chosen", "acted"),
    )
    wall = time.perf_counter() - start
    meta = (
        f"seeds {args.seeds}, {args.epochs} epochs, Adam lr 1e-3, batch 64; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; wall time {wall:.0f} s. Dominant modality by "
        f"{summary.rule}; {summary.gap_rule}."
    )
    text = markdown_table(table, caption=False)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "rows.json", {"meta": meta, "rows": rows, "aggregate": summary.aggregate})
    (args.out / "table.md").write_text(text + "\n\n" + meta + "\n", encoding="utf-8")
    print(text)
    print(meta)


if __name__ == "__main__":
    main()
