"""``miles list``: what is registered (datasets, preparers, strategies, fusions, report kinds)."""

from __future__ import annotations

import argparse

from miles.cli.common import show
from miles.cli.registry import Command, register_command


def run(args: argparse.Namespace) -> int:
    from miles.data import available_datasets
    from miles.data.prepare import available_preparers
    from miles.report.page import available_kinds
    from miles.strategies import available_strategies
    from miles.studies.checks import available_fusions

    show("datasets:     " + ", ".join(available_datasets()))
    show("prepare:      " + (", ".join(available_preparers()) or "(none registered)"))
    show("strategies:   " + ", ".join(available_strategies()))
    show("fusions:      " + ", ".join(available_fusions()))
    show("report kinds: " + ", ".join(available_kinds()))
    return 0


COMMAND = register_command(
    Command(
        "list",
        "registered datasets, preparers, strategies, fusions and report kinds",
        run,
        needs=("torchmetrics", "numpy", "tqdm"),
    )
)
