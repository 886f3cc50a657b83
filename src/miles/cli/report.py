"""``miles report PATH``: the self-contained HTML (and markdown) page of a run or study."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from miles.cli.common import show
from miles.cli.registry import Command, register_command


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path",
        type=Path,
        help="a run or study folder (compare, ablate, sweep study, demo), or a study's JSON file",
    )
    p.add_argument("--out", type=Path, help="output folder (default: <folder>/report)")


def run(args: argparse.Namespace) -> int:
    from miles.report.page import build_report

    report = build_report(args.path, args.out)
    paragraphs = report.intro + [p for s in report.sections for p in s.paragraphs]
    for text in paragraphs:
        if text.startswith("warning"):  # e.g. run folders gone: said here too, not only inside
            print(f"miles report: {text}", file=sys.stderr)
    show(
        f"{report.kind} report: {len(report.tables)} tables, {len(report.figures)} figures; "
        f"wrote {report.html_path} and {report.md_path}"
    )
    return 0


COMMAND = register_command(
    Command(
        "report",
        "self-contained HTML (and markdown) report of a run, demo, compare, ablate or sweep",
        run,
        arguments,
        needs=("torchmetrics", "numpy", "tqdm", "matplotlib"),
        description="Write report.html (plots embedded, opens with no server) and report.md "
        "(plots in report_files/) for a `miles train` run folder or the output of `miles demo`, "
        "`compare`, `ablate` or `sweep` (its study folder OUT/<study name>). The study is "
        "recognised by the 'kind' its JSON file records.",
        interrupted="re-run the same command",
    )
)
