"""``miles prepare``: decode a raw dataset copy into a memory-mapped cache."""

from __future__ import annotations

import argparse
from pathlib import Path

from miles.cli.common import key_values, positive_int, show
from miles.cli.registry import Command, register_command


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help="e.g. cremad, smnist, luma, mmimdb (see `miles list`)")
    p.add_argument("--raw", required=True, type=Path, help="the dataset's official raw folder")
    p.add_argument("--out", required=True, type=Path, help="cache folder to write")
    key_values(p, "--option", "a preprocessing option", "frame=middle")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip unreadable samples (listed in the manifest) instead of stopping",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="decode in N processes (default 1: in this one); the cache is the same for any N",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import miles.data  # noqa: F401  (registers the preparers)
    from miles.data.prepare import build_preparer, prepare

    preparer = build_preparer(args.dataset, **dict(args.option))
    manifest = prepare(
        preparer,
        args.raw,
        args.out,
        skip_bad=args.skip_bad,
        progress=not args.quiet,
        workers=args.workers,
    )
    show(
        f"{args.dataset}: {manifest['sizes']} samples per split, "
        f"{len(manifest['skipped'])} skipped; cache in {args.out} "
        f"(checksums in {args.out / 'manifest.json'})"
    )
    return 0


COMMAND = register_command(
    Command(
        "prepare",
        "decode a raw dataset copy into a memory-mapped cache",
        run,
        arguments,
        needs=("numpy", "tqdm"),
        interrupted="re-run the same command to resume (finished samples are kept)",
    )
)
