"""``miles regime-map``: where MILES matters, over a grid of imbalance regimes (resumable)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from miles.cli.common import (
    base_config,
    echo_for,
    engine_options,
    output_options,
    positive_int,
    refuse_torchrun,
    seeds_option,
    show,
    training_options,
)
from miles.cli.registry import Command, register_command

if TYPE_CHECKING:
    from miles.training.experiment import ExperimentConfig


def arguments(p: argparse.ArgumentParser) -> None:
    from miles.studies.regime_parts import PARTS

    p.add_argument(
        "--part",
        choices=list(PARTS),
        default="map",
        help="which preset: the map, or one open question (remedies and fusions read the "
        "map's results from --out, so run the map first)",
    )
    p.add_argument(
        "--workers", type=positive_int, default=2, help="processes, one torch thread each"
    )


def regime_base(args: argparse.Namespace) -> ExperimentConfig:
    """The base experiment: the shared training options on the regime dataset."""
    from miles.studies.regime_parts import DATASET, IMAGE

    return base_config(args, dataset=DATASET, dataset_params=dict(IMAGE))


def run(args: argparse.Namespace) -> int:
    from miles.studies.regime import RegimeStudy, part_config
    from miles.studies.study import run_study

    refuse_torchrun("regime-map")
    config = part_config(
        args.part,
        args.out,
        base=regime_base(args),
        seeds=list(range(args.seeds)),
        workers=args.workers,
    )
    run_study(RegimeStudy, config, echo=echo_for(args), show=show)
    return 0


def _epochs() -> int:
    from miles.studies.regime_parts import EPOCHS

    return EPOCHS


COMMAND = register_command(
    Command(
        "regime-map",
        "where MILES matters: a grid of imbalance regimes x methods x seeds (resumable)",
        run,
        arguments,
        parents=(
            lambda: seeds_option(5),
            lambda: training_options(epochs=_epochs()),
            engine_options,
            lambda: output_options("regime-out"),
        ),
        needs=("torchmetrics", "numpy", "tqdm", "matplotlib"),
        description="Train joint, joint+aux and MILES (tau 0.2 and 0.1) in every cell of a grid "
        "of imbalance regimes on fsdd-mnist-regime (unimodal gap x relative learning speed), with "
        "each cell's unimodal references, and write regime_<part>.md/.json/_runs.csv/_table.csv "
        "and the heat map of MILES minus joint+aux on the weak head with paired tests over seeds. "
        "--part picks the map or one of the open questions (estimators, init, remedies, "
        "fusions). Re-run the same command to resume.",
    )
)
