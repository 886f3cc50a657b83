"""The registry of ``miles`` commands: each command module registers one :class:`Command`."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from miles.cli.common import Parser
from miles.registry import Registry

__all__ = ["Command", "commands", "register_command"]


@dataclass(frozen=True)
class Command:
    """One ``miles`` command.

    Args:
        name: what the user types (``miles <name>``).
        help: one line for ``miles --help``.
        run: ``run(args) -> exit status``.
        arguments: adds the command's own arguments to its parser.
        parents: builders of the parent parsers it shares with other commands.
        needs: optional modules it imports, checked before anything runs.
        description: the longer text of ``miles <name> --help``.
        interrupted: what to tell the user after Ctrl-C (how to resume).
    """

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None] = lambda _p: None
    parents: Sequence[Callable[[], Parser]] = field(default_factory=tuple)
    needs: tuple[str, ...] = ()
    description: str | None = None
    interrupted: str = "re-run the same command to resume (finished runs are kept)"


_COMMANDS: Registry[Command] = Registry("command")


def register_command(command: Command) -> Command:
    """Add ``command`` to ``miles``; a second command of the same name is an error."""
    return _COMMANDS.register(command.name)(command)


def commands() -> dict[str, Command]:
    """The registered commands, by name."""
    return {name: _COMMANDS.get(name) for name in _COMMANDS.names()}
