"""The ``miles`` command line: demo, train, compare, ablate, sweep, report, prepare and list.

Each command is one module of this package that registers a
:class:`~miles.cli.registry.Command`; :func:`main` builds the parser from the registry and
dispatches to the command's ``run``. What every command shares:

- a mistake in what was asked (bad value, unknown name, missing file, missing optional package)
  is one line on stderr, ``miles <command>: error: <message>``, with exit status 2; ``--debug``
  shows the full traceback instead;
- Ctrl-C says how to resume and exits with status 130;
- the optional packages a command needs are checked before it starts, naming the extra that
  installs them;
- ``--plugin MODULE`` imports your module first, so the strategies and datasets it registers can
  be used by name.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from miles.cli.common import HelpFormatter, Parser, UserError, global_options
from miles.cli.registry import Command, commands, register_command
from miles.extras import MissingExtraError, require
from miles.fileio import DiskFullError, RunFolderBusyError

__all__ = ["Command", "build_parser", "main", "register_command"]

#: the command modules, in the order ``miles --help`` lists them
COMMAND_MODULES = (
    "demo",
    "train",
    "compare",
    "ablate",
    "sweep",
    "regime",
    "report",
    "prepare",
    "listing",
)
#: exceptions that mean "the user asked for something wrong" (one line, exit status 2)
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    ValueError,
    TypeError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    MissingExtraError,
)
#: failures of the machine or of another process, not of the request (one line, exit status 1)
RUN_ERRORS: tuple[type[BaseException], ...] = (DiskFullError, RunFolderBusyError)


def version() -> str:
    """The installed ``miles-lr`` version (the package's own when it is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("miles-lr")
    except PackageNotFoundError:
        from miles import __version__

        return __version__


def _load_commands() -> dict[str, Command]:
    for name in COMMAND_MODULES:
        importlib.import_module(f"miles.cli.{name}")
    return commands()


def build_parser(full: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``miles`` parser with one sub-parser per registered command.

    Only the commands in ``full`` (default: all) get their arguments: building a command's
    arguments may import what it needs, which :func:`main` checks first.
    """
    parser = Parser(
        prog="miles",
        description="miles: balanced multimodal learning with MILES, from the command line.",
        formatter_class=HelpFormatter,
        parents=[global_options(suppress=False)],
        epilog="Run `miles <command> --help` for a command's options and their defaults.",
    )
    parser.add_argument("--version", action="version", version=f"miles {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for command in _load_commands().values():
        complete = full is None or command.name in full
        parents = [global_options(suppress=True)]
        parents += [build() for build in command.parents] if complete else []
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=command.description or command.help,
            formatter_class=HelpFormatter,
            parents=parents,
        )
        if complete:
            command.arguments(p)
        p.set_defaults(_command=command)
    return parser


def load_plugin(name: str) -> None:
    """Import a plugin module by name (from the working directory too), or a ``.py`` file."""
    try:
        if name.endswith(".py"):
            path = Path(name)
            if not path.is_file():
                raise FileNotFoundError(f"no such file {path}")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[path.stem] = module
            spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            importlib.import_module(name)
    except Exception as exc:
        raise UserError(f"cannot import plugin {name!r}: {type(exc).__name__}: {exc}") from exc


def _command_name(argv: Sequence[str]) -> str | None:
    """The command named in ``argv``, found before parsing (the first registered name)."""
    names = set(_load_commands())
    return next((a for a in argv if a in names), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``miles`` console script and of ``python -m miles``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    early, _ = global_options(suppress=False).parse_known_args(argv)
    name = _command_name(argv)
    prog = f"miles {name}" if name else "miles"
    command: Command | None = None
    try:
        require("yaml", what="the miles command line")
        if name is not None:  # before anything of the command is imported
            require(*commands()[name].needs, what="this command")
        for plugin in early.plugin or []:
            load_plugin(plugin)
        args = build_parser([name] if name else []).parse_args(argv)
        command = args._command
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        return command.run(args)
    except KeyboardInterrupt:
        hint = command.interrupted if command else "nothing was started"
        print(f"{prog}: interrupted; {hint}", file=sys.stderr)
        return 130
    except RUN_ERRORS as exc:
        if early.debug:
            raise
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except USER_ERRORS as exc:
        if early.debug:
            raise
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # training diverged: not a usage error, still one line
        if early.debug:
            raise
        print(f"{prog}: error: training diverged: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return text
