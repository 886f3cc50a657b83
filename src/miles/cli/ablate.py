"""``miles ablate``: MILES over a sweep of tau or mu, next to unimodal/joint/joint+aux."""

from __future__ import annotations

import argparse

from miles.cli.common import (
    data_options,
    engine_options,
    fusion_option,
    output_options,
    run_study_command,
    seeds_option,
    training_options,
)
from miles.cli.registry import Command, register_command


def arguments(p: argparse.ArgumentParser) -> None:
    from miles.studies.ablate import PARAMS

    p.add_argument("--param", required=True, choices=list(PARAMS), help="the swept parameter")
    p.add_argument("--values", required=True, help="comma-separated, e.g. 0.5,0.3,0.2,0.1,0.0")
    p.add_argument(
        "--fixed",
        default="tau=0.2,mu=0.5",
        help="the other parameter (the swept one is replaced)",
    )


def run(args: argparse.Namespace) -> int:
    from miles.studies.ablate import Ablation, parse_fixed

    return run_study_command(
        args, Ablation, copy=("param", "values"), fixed=parse_fixed(args.fixed)
    )


COMMAND = register_command(
    Command(
        "ablate",
        "MILES over a sweep of tau or mu, next to unimodal/joint/joint+aux (resumable)",
        run,
        arguments,
        parents=(
            lambda: data_options("mfeat-pix-fou"),
            lambda: fusion_option("concat", many=False),
            seeds_option,
            lambda: training_options(epochs=15),
            engine_options,
            lambda: output_options("ablate-out"),
        ),
        needs=("torchmetrics", "numpy", "tqdm"),
    )
)
