"""Checkpoints that resume a run exactly: model, optimizer, strategy, history and RNG states.

Everything saved is tensors or builtins, so ``torch.load(weights_only=True)`` reads it back.
Saving is all or nothing (:func:`miles.fileio.atomic_write`: unique temporary file, ``fsync``,
rename, folder ``fsync``); loading names the file when it is damaged or lacks a key, and says how
to start over.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from miles.fileio import DamagedFileError, atomic_write

__all__ = ["BEST", "LAST", "LAST_KEYS", "START_OVER", "load_checkpoint", "save_checkpoint"]

LAST = "last.pt"
BEST = "best.pt"
#: what ``last.pt`` must hold for a resume
LAST_KEYS = (
    "epoch",
    "model",
    "optimizer",
    "strategy",
    "history",
    "best_epoch",
    "best_score",
    "rng",
    "loader_rng",
)
#: what to do about a damaged checkpoint of a run folder
START_OVER = (
    "start the run over with --overwrite (Trainer.fit(overwrite=True)), or train into another "
    "output folder"
)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Save ``payload`` all or nothing, durably (see the module docstring).

    Raises:
        miles.fileio.DiskFullError: the disk filled up; the previous checkpoint is intact.
    """
    atomic_write(path, lambda fh: torch.save(payload, fh))


def load_checkpoint(
    path: Path, *, required: Sequence[str] = (), advice: str = START_OVER
) -> dict[str, Any]:
    """The checkpoint at ``path``, a dict holding every key in ``required``.

    Raises:
        FileNotFoundError: no such file.
        miles.fileio.DamagedFileError: unreadable (truncated, overwritten, not a checkpoint) or a
            required key is missing; the message names the file and gives ``advice``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged files
        raise DamagedFileError(
            path,
            f"not a readable checkpoint ({type(exc).__name__}: truncated, overwritten, or not "
            "written by miles)",
            advice,
        ) from None
    if not isinstance(payload, dict):
        raise DamagedFileError(
            path, f"a checkpoint holds a dict, this one a {type(payload).__name__}", advice
        )
    missing = [key for key in required if key not in payload]
    if missing:
        raise DamagedFileError(path, f"the checkpoint lacks {missing}", advice)
    return payload
