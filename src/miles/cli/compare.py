"""``miles compare``: every balancing method on the same data, model, budget and seeds."""

from __future__ import annotations

import argparse

from miles.cli.common import (
    data_options,
    engine_options,
    fusion_option,
    method_optimizer_option,
    methods,
    output_options,
    run_study_command,
    seeds_option,
    training_options,
    unimodal_sweep_options,
)
from miles.cli.registry import Command, register_command


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--methods", type=methods, default="all", help="comma-separated, or 'all' (every method)"
    )
    unimodal_sweep_options(p)
    method_optimizer_option(p)


def run(args: argparse.Namespace) -> int:
    from miles.studies.compare import Compare

    return run_study_command(
        args,
        Compare,
        copy=(
            "methods",
            "sweep_lrs",
            "sweep_epochs",
            "sweep_cache",
            "method_optimizers",
        ),
    )


COMMAND = register_command(
    Command(
        "compare",
        "every balancing method, same data, model, budget and seeds (resumable)",
        run,
        arguments,
        parents=(
            data_options,
            lambda: fusion_option("concat,sum", many=True),
            seeds_option,
            lambda: training_options(epochs=10),
            engine_options,
            lambda: output_options("compare-out"),
        ),
        needs=("torchmetrics", "numpy", "tqdm"),
        description="Train every method on the same data, encoders, budget and seeds and write "
        "the paper's Table II (compare.md, compare_table.csv, compare_runs.csv, compare.json). "
        "Re-run the same command to resume: finished runs are read, not trained again.",
    )
)
