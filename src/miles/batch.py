"""Moving a collated batch to a device: one place, shared by the trainer and the strategies."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["move_batch"]


def move_batch(
    batch: Mapping[str, Any], device: torch.device, *, channels_last: bool = False
) -> dict[str, Any]:
    """Send inputs and target to ``device``; lengths stay on the CPU (packed RNNs want them).

    The copies are ``non_blocking`` (asynchronous from pinned memory to a GPU). With
    ``channels_last``, 4-D inputs (images) are laid out channels-last, as the model is. A training
    plan's batches (:mod:`miles.strategies.data`) also carry ``"index"`` (row positions, kept on
    the CPU) and ``"keep"`` (modality keep masks, sent to ``device``).
    """

    def move(x: torch.Tensor) -> torch.Tensor:
        if channels_last and x.dim() == 4:
            return x.to(device, non_blocking=True, memory_format=torch.channels_last)
        return x.to(device, non_blocking=True)

    moved = {
        "inputs": {m: move(x) for m, x in batch["inputs"].items()},
        "lengths": dict(batch.get("lengths", {})),
        "target": batch["target"].to(device, non_blocking=True),
    }
    if "index" in batch:
        moved["index"] = batch["index"]
    if "keep" in batch:
        moved["keep"] = batch["keep"].to(device, non_blocking=True)
    return moved
