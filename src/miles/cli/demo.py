"""``miles demo``: joint, joint+aux and MILES on FSDD-MNIST, both fusions, offline; or, with
``--regime NAME``, one cell of the regime map (``miles regime-map``) for one seed."""

from __future__ import annotations

import argparse

from miles.cli.common import (
    csv_list,
    engine_options,
    fusion_option,
    non_negative_int,
    output_options,
    run_study_command,
    training_options,
)
from miles.cli.registry import Command, register_command


def arguments(p: argparse.ArgumentParser) -> None:
    from miles.studies.demo import DEMO_METHODS

    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of every run")
    p.add_argument(
        "--methods", type=csv_list, default=",".join(DEMO_METHODS), help="comma-separated"
    )
    p.add_argument("--tau", type=float, default=0.2, help="MILES imbalance threshold")
    p.add_argument("--mu", type=float, default=0.5, help="MILES learning-rate factor")
    p.add_argument(
        "--regime",
        metavar="CELL",
        help="instead, reproduce one cell of the regime map for --seed (its own data, methods, "
        "epochs and settings; e.g. noise0.5-speed0.1): see `miles regime-map`",
    )
    p.set_defaults(progress_bars=True)  # one bar per run, unless --quiet


def _demo_epochs() -> int:
    from miles.studies.demo import DEMO_EPOCHS

    return DEMO_EPOCHS


def run_regime_cell(args: argparse.Namespace) -> int:
    """One map cell, one seed, with the map's own settings: the same runs as the map's."""
    from miles.cli.common import echo_for, show
    from miles.studies.regime import RegimeStudy, demo_config
    from miles.studies.study import run_study

    config = demo_config(args.regime, args.out, seed=args.seed)
    run_study(RegimeStudy, config, echo=echo_for(args), show=show)
    return 0


def run(args: argparse.Namespace) -> int:
    from miles.studies.demo import Demo

    if args.regime is not None:
        return run_regime_cell(args)
    args.dataset = "fsdd-mnist"
    miles_params = {"tau": args.tau, "mu": args.mu}
    return run_study_command(args, Demo, copy=("methods",), miles_params=miles_params)


COMMAND = register_command(
    Command(
        "demo",
        "joint, joint+aux and MILES on FSDD-MNIST, both fusions (offline, ~2 min on 2 cores)",
        run,
        arguments,
        parents=(
            lambda: fusion_option("concat,sum", many=True),
            lambda: training_options(epochs=_demo_epochs()),
            engine_options,
            lambda: output_options("demo-out"),
        ),
        needs=("torchmetrics", "numpy", "tqdm", "matplotlib"),
    )
)
