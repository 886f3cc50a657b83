"""``miles sweep``: the paper's hyper-parameter search for one method (Optuna, resumable)."""

from __future__ import annotations

import argparse

from miles.cli.common import (
    data_options,
    engine_options,
    fusion_option,
    method_optimizer_option,
    non_negative_int,
    output_options,
    positive_int,
    run_study_command,
    training_options,
    unimodal_sweep_options,
)
from miles.cli.registry import Command, register_command


def arguments(p: argparse.ArgumentParser) -> None:
    from miles.studies.optuna_study import SAMPLERS
    from miles.studies.search_space import SEARCH_SPACES

    p.add_argument("--method", required=True, help=f"one of {sorted(SEARCH_SPACES)}")
    p.add_argument("--trials", type=positive_int, default=10, help="trials (the paper: 80)")
    p.add_argument("--sampler", choices=SAMPLERS, default="random", help="Optuna sampler")
    p.add_argument(
        "--seed", type=non_negative_int, default=0, help="seeds the sampler and every trial"
    )
    p.add_argument(
        "--rerun-seeds",
        type=non_negative_int,
        default=3,
        help="re-run the best trial over seeds 0..K-1 (0: no re-runs)",
    )
    p.add_argument("--storage", help="Optuna RDB URL (default sqlite:///OUT/sweep.db)")
    p.add_argument("--study-name", help="default DATASET-METHOD-FUSION")
    p.add_argument(
        "--stale-after",
        type=positive_int,
        default=120,
        help="seconds without heartbeat after which a running trial counts as killed",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="when no trial is left to start, wait for the trials running elsewhere (re-running "
        "those whose worker died) instead of stopping",
    )
    unimodal_sweep_options(p)
    method_optimizer_option(p)


def run(args: argparse.Namespace) -> int:
    import optuna

    from miles.studies.sweep import Sweep

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # we print our own progress lines
    copied = (
        "method",
        "trials",
        "sampler",
        "rerun_seeds",
        "storage",
        "study_name",
        "stale_after",
        "wait",
        "sweep_lrs",
        "sweep_epochs",
        "sweep_cache",
        "method_optimizers",
    )
    return run_study_command(args, Sweep, copy=copied)


COMMAND = register_command(
    Command(
        "sweep",
        "the paper's hyper-parameter search for one method (Optuna, resumable)",
        run,
        arguments,
        parents=(
            data_options,
            lambda: fusion_option("concat", many=False),
            lambda: training_options(epochs=10, lr=None),
            engine_options,
            lambda: output_options("sweep-out"),
        ),
        needs=("torchmetrics", "numpy", "tqdm", "optuna", "filelock"),
        description="Sample a method's hyper-parameters, keep the best trial on validation, "
        "report its test result and re-run it over seeds. Trials live in an Optuna storage: "
        "re-run the same command to resume, or start it on several machines sharing one "
        "database to spread the trials. Each study writes into OUT/<study name>/.",
        interrupted="re-run the same command to resume (finished trials are kept)",
    )
)
