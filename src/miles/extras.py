"""Optional dependencies, checked before any work starts, with the extra that installs them.

``import miles`` needs torch alone; the trainer, plots, sweeps and the command line need more.
:func:`require` checks for a module without importing it and raises :class:`MissingExtraError`
naming the ``pip install 'miles-lr[extra]'`` command, so a missing package stops a command
before it trains anything, not after.
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRA_OF", "MissingExtraError", "require"]

#: the extra of ``miles-lr`` that installs each optional module
EXTRA_OF = {
    "matplotlib": "plot",
    "optuna": "sweep",
    "filelock": "sweep",
    "psycopg2": "sweep-pg",
    "yaml": "cli",
    "torchmetrics": "train",
    "numpy": "train",
    "tqdm": "train",
    "tensorboard": "log",
}


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(*modules: str, what: str) -> None:
    """Raise :class:`MissingExtraError` unless every module is importable.

    ``what`` says what needs them (``"miles demo's plot"``); the message names the missing
    modules and the ``pip install 'miles-lr[...]'`` command that installs them.
    """
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        extras = sorted({EXTRA_OF.get(m, "cli") for m in missing})
        raise MissingExtraError(
            f"{what} needs {', '.join(missing)}, which is not installed: "
            f"pip install 'miles-lr[{','.join(extras)}]'"
        )
