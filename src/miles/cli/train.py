"""``miles train``: one run from a YAML config, one line per epoch with MILES's decision."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from miles.cli.common import (
    UserError,
    engine_options,
    engine_settings,
    key_values,
    non_negative_int,
    show,
)
from miles.cli.registry import Command, register_command

__all__ = ["epoch_line"]


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=Path, help="the run's YAML config")
    key_values(p, "--set", "override one config value (KEY.SUB=VALUE)", "trainer.lr=1e-3")
    p.add_argument("--out", help="output folder (overrides the config's out_dir)")
    p.add_argument("--seed", type=non_negative_int, help="overrides trainer.seed")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in OUT from its last.pt (its recorded settings must match)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="OUT holds a run: delete that run's files and start a new one",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --resume: resume although the settings differ from the run's (rarely what "
        "you want; result.json then records the change)",
    )
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines, only the result")


def epoch_line(row: Mapping[str, Any], epochs: int) -> str:
    """One epoch in one line: validation of every head, and MILES's decision when it decided.

    ``epoch 3/15: val fused 97.1, audio 90.2, image 93.3; MILES u audio +0.050, image -0.020,
    delta 0.070 -> balanced`` (or ``-> slowed audio: next epoch lr audio 0.0005, ...``).
    """
    from miles.report.tables import pct
    from miles.results import EpochRecord

    record = EpochRecord.from_dict(row)
    heads = ", ".join(f"{m} {pct(v)}" for m, v in record.val.items())
    line = f"epoch {record.epoch}/{epochs}: val fused {pct(record.val_fused)}, {heads}"
    if "decision" not in record.strategy:
        return line
    decision = record.decision
    if decision is None:
        return f"{line}; MILES: no decision (fused metric 0)"
    u = ", ".join(f"{m} {v:+.3f}" for m, v in decision["u"].items())
    line = f"{line}; MILES u {u}, delta {decision['delta']:.3f} -> "
    factors = decision["factors"]
    slowed = [m for m, f in factors.items() if f < 1.0]
    if not slowed:
        return line + str(decision["reason"])
    names = decision.get("lr_names") or list(record.lrs)  # param groups, optimizer order
    lrs = ", ".join(f"{group} {lr:.3g}" for group, lr in zip(names, decision["lrs"], strict=False))
    return line + f"slowed {', '.join(slowed)}: next epoch lr {lrs}"


def _printer(epochs: int) -> Callable[[dict[str, Any]], None]:
    return lambda row: print(epoch_line(row, epochs), flush=True)


def run(args: argparse.Namespace) -> int:
    from miles.cli.yamlio import apply_overrides, load_config_file
    from miles.report.document import markdown_table
    from miles.report.tables import column_notes
    from miles.results import run_row
    from miles.studies.summary import summarize, summary_table
    from miles.training.distributed import is_main_process
    from miles.training.experiment import ExperimentConfig, run_experiment
    from miles.training.trainer import TrainerConfig

    raw = apply_overrides(load_config_file(args.config), args.set)
    config = ExperimentConfig.from_dict(raw)
    if args.out:
        config.out_dir = args.out
    overrides = engine_settings(args)
    if args.seed is not None:
        overrides["seed"] = args.seed
    # the per-epoch lines replace the progress bar
    trainer = {**asdict(config.trainer), **overrides, "progress": False}
    config.trainer = TrainerConfig(**trainer)
    for flag in ("resume", "overwrite"):
        if getattr(args, flag) and not config.out_dir:
            raise UserError(f"--{flag} needs an output folder (--out or out_dir in the config)")
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in OUT, --overwrite replaces it: pick one")
    if args.force and not args.resume:
        raise UserError("--force only applies to --resume (a new run has nothing to match)")
    # under torchrun every rank trains; rank 0 alone prints (and writes the files)
    main = is_main_process()
    on_epoch = None if args.quiet or not main else _printer(config.trainer.epochs)
    result = run_experiment(
        config,
        resume=args.resume,
        overwrite=args.overwrite,
        force=args.force,
        on_epoch_end=on_epoch,
    ).to_dict()
    if not main:
        return 0
    row = run_row(result) | {"label": ""}
    summary = summarize([row], result["extra"]["modalities"])
    table = summary_table(
        f"{result['config']['metric']} (%)",
        summary.aggregate,
        summary.order,
        groups=TRAIN_COLUMNS,
    )
    show(markdown_table(table, caption=False))
    show(f"Modalities ranked by {summary.rule}; {summary.gap_rule}.")
    show(column_notes(("heads", "probe", "slice"), summary.order))
    if config.out_dir:
        show(f"wrote {config.out_dir}/result.json, history.json, history.csv")
    return 0


#: the columns of the table ``miles train`` prints
TRAIN_COLUMNS = ("fused", "heads", "gap", "probe", "slice", "chosen", "acted", "slowed")

COMMAND = register_command(
    Command(
        "train",
        "one run from a YAML config (resumable with --resume)",
        run,
        arguments,
        parents=(lambda: engine_options(device=None, distributed=True),),
        needs=("torchmetrics", "numpy", "tqdm"),
        description="Train one run described by a YAML config (dataset, fusion, strategy and "
        "its parameters, trainer settings, out_dir; see the README). Each epoch prints the "
        "validation metric of every head and, for MILES, its decision. The engine options "
        "override the config's trainer settings. Under torchrun (e.g. torchrun "
        "--nproc_per_node=4 -m miles train ...) the run trains data-parallel on every process; "
        "rank 0 alone prints and writes the files.\n\n"
        "OUT records the run's settings: --resume continues it only under the same settings "
        "(the device, loader and logging settings may differ), a new run refuses a folder that "
        "holds one (--overwrite replaces it), and a second process training in OUT is refused "
        "while the first runs.",
        interrupted="re-run the same command with --resume to continue from the last epoch",
    )
)
