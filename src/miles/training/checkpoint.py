"""Checkpoints that resume a run exactly: model, optimizer, strategy, history and RNG states.

Everything saved is tensors or builtins, so ``torch.load(weights_only=True)`` reads it back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

LAST = "last.pt"
BEST = "best.pt"


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Save atomically (temporary file, then rename) so a crash never truncates a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged files
        raise RuntimeError(
            f"checkpoint {path} cannot be read ({exc}); delete it to start over"
        ) from exc
    if not isinstance(payload, dict):
        raise RuntimeError(f"checkpoint {path} does not hold a dict")
    return payload
