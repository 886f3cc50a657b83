"""The ``miles`` command line: demo, train, compare, sweep, ablate, report, prepare and list."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from miles.cli_args import key_value, positive_int


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _methods(text: str) -> list[str]:
    """``all`` or a comma-separated list of registered strategy names."""
    from miles.compare import ALL_METHODS
    from miles.strategies import available_strategies

    items = _csv(text)
    if items == ["all"]:
        return list(ALL_METHODS)
    unknown = [m for m in items if m not in available_strategies()]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown methods {unknown}; choose 'all' or from {available_strategies()}"
        )
    return items


def _fusions(text: str) -> list[str]:
    from miles.models import FUSIONS

    items = _csv(text)
    bad = [f for f in items if f not in FUSIONS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown fusions {bad}; choose from {list(FUSIONS)}")
    return items


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    from miles.demo import DEMO_EPOCHS, DEMO_METHODS

    parser = argparse.ArgumentParser(prog="miles", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="joint, joint+aux and MILES on FSDD-MNIST, both fusions")
    demo.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    demo.add_argument("--epochs", type=positive_int, default=DEMO_EPOCHS)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--fusion", type=_fusions, default=["concat", "sum"], help="e.g. concat,sum")
    demo.add_argument("--methods", type=_csv, default=list(DEMO_METHODS))
    demo.add_argument("--tau", type=float, default=0.2, help="MILES threshold (default 0.2)")
    demo.add_argument("--mu", type=float, default=0.5, help="MILES LR factor (default 0.5)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")

    train = sub.add_parser("train", help="one run from a YAML config")
    train.add_argument("--config", required=True, type=Path)
    train.add_argument("--out", help="override the config's out_dir")
    train.add_argument("--seed", type=int, help="override trainer.seed")
    train.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    train.add_argument("--quiet", action="store_true")

    cmp_ = sub.add_parser("compare", help="every balancing method, same data, model and budget")
    cmp_.add_argument("--dataset", default="fsdd-mnist")
    cmp_.add_argument(
        "--dataset-option",
        action="append",
        type=key_value,
        default=[],
        metavar="KEY=VALUE",
        help="a dataset builder parameter (repeatable), e.g. max_samples=6000",
    )
    cmp_.add_argument(
        "--methods", type=_methods, default="all", help="comma-separated, or 'all' (default)"
    )
    cmp_.add_argument("--fusion", type=_fusions, default=["concat", "sum"])
    cmp_.add_argument("--seeds", type=positive_int, default=3, help="seeds 0..N-1 (default 3)")
    cmp_.add_argument("--epochs", type=positive_int, default=10)
    cmp_.add_argument("--lr", type=float, default=1e-3)
    cmp_.add_argument("--batch-size", type=positive_int, default=64)
    cmp_.add_argument("--latent-dim", type=positive_int, default=64)
    cmp_.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    cmp_.add_argument(
        "--sweep-lrs",
        type=_floats,
        default=[3e-4, 1e-3, 3e-3],
        help="unimodal LR candidates for MSLR (default 3e-4,1e-3,3e-3)",
    )
    cmp_.add_argument("--sweep-epochs", type=positive_int, default=5)
    cmp_.add_argument("--sweep-cache", help="folder for the cached sweep (default OUT/sweep)")
    cmp_.add_argument("--out", default="compare-out")

    prep = sub.add_parser("prepare", help="decode a raw dataset copy into a memory-mapped cache")
    prep.add_argument("dataset", help="e.g. cremad, smnist, luma, mmimdb (see `miles list`)")
    prep.add_argument("--raw", required=True, type=Path, help="the dataset's official raw folder")
    prep.add_argument("--out", required=True, type=Path, help="cache folder to write")
    prep.add_argument(
        "--option",
        action="append",
        type=key_value,
        default=[],
        metavar="KEY=VALUE",
        help="a preprocessing option (repeatable), e.g. --option frame=middle",
    )
    prep.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip unreadable samples (listed in the manifest) instead of stopping",
    )
    prep.add_argument("--quiet", action="store_true")

    from miles.ablate import add_parser as add_ablate_parser
    from miles.report.page import add_parser as add_report_parser
    from miles.sweep import add_parser as add_sweep_parser

    add_sweep_parser(sub)
    add_ablate_parser(sub)
    add_report_parser(sub)

    sub.add_parser("list", help="registered datasets and strategies")
    return parser


def _cmd_train(args: argparse.Namespace) -> int:
    import yaml

    from miles.report.tables import markdown_table, summarize_run
    from miles.training.experiment import ExperimentConfig, run_experiment

    if not args.config.is_file():
        raise SystemExit(f"miles train: config file {args.config} not found")
    raw = yaml.safe_load(args.config.read_text(encoding="utf-8")) or {}
    config = ExperimentConfig.from_dict(raw)
    if args.out:
        config.out_dir = args.out
    if args.seed is not None:
        config.trainer.seed = args.seed
    if args.quiet:
        config.trainer.progress = False
    if args.resume and not config.out_dir:
        raise SystemExit("miles train: --resume needs an output folder (--out or out_dir)")
    result = run_experiment(config, resume=args.resume).to_dict()
    row = summarize_run(result)
    modalities = result["extra"]["modalities"]
    print(
        markdown_table(
            [row],
            ["method", "fusion", "fused", *modalities, "gap", "best_epoch", "acted"],
            percent=["fused", *modalities, "gap"],
        )
    )
    if config.out_dir:
        print(f"wrote {config.out_dir}/result.json, history.json, history.csv")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from miles.compare import CompareConfig, run_compare

    methods = args.methods if isinstance(args.methods, list) else _methods(args.methods)
    config = CompareConfig(
        dataset=args.dataset,
        dataset_params=dict(args.dataset_option),
        methods=methods,
        fusions=args.fusion,
        seeds=list(range(args.seeds)),
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        latent_dim=args.latent_dim,
        optimizer=args.optimizer,
        sweep_lrs=args.sweep_lrs,
        sweep_epochs=args.sweep_epochs,
        sweep_cache=args.sweep_cache,
        out_dir=args.out,
    )
    run_compare(config)
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    import miles.data  # noqa: F401  (registers the preparers)
    from miles.data.prepare import build_preparer, prepare

    preparer = build_preparer(args.dataset, **dict(args.option))
    manifest = prepare(
        preparer, args.raw, args.out, skip_bad=args.skip_bad, progress=not args.quiet
    )
    print(
        f"{args.dataset}: {manifest['sizes']} samples per split, "
        f"{len(manifest['skipped'])} skipped; cache in {args.out} "
        f"(checksums in {args.out / 'manifest.json'})"
    )
    return 0


def _cmd_list() -> int:
    from miles.data import available_datasets
    from miles.data.prepare import available_preparers
    from miles.strategies import available_strategies

    print("datasets:   " + ", ".join(available_datasets()))
    print("prepare:    " + (", ".join(available_preparers()) or "(none registered)"))
    print("strategies: " + ", ".join(available_strategies()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``miles`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from miles.demo import run_demo

        run_demo(
            args.out,
            epochs=args.epochs,
            seed=args.seed,
            fusions=args.fusion,
            methods=args.methods,
            miles_params={"tau": args.tau, "mu": args.mu},
            progress=not args.quiet,
        )
        return 0
    if args.command == "train":
        return _cmd_train(args)
    if args.command == "compare":
        return _cmd_compare(args)
    if args.command == "prepare":
        return _cmd_prepare(args)
    if args.command == "report":
        from miles.report.page import run_cli as run_report_cli

        return run_report_cli(args)
    if args.command == "ablate":
        from miles.ablate import run_cli as run_ablate_cli

        return run_ablate_cli(args)
    if args.command == "sweep":
        from miles.sweep import run_cli as run_sweep_cli

        return run_sweep_cli(args)
    return _cmd_list()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
