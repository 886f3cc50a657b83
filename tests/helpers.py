"""Helpers shared by the training tests (one place, so every test compares runs the same way)."""

from __future__ import annotations

from typing import Any

import torch

from miles.models import JointFusionModel


def same_weights(a: JointFusionModel, b: JointFusionModel) -> bool:
    """Bit-for-bit equal tensors (parameters and buffers) and the same state keys."""
    pa, pb = a.state_dict(), b.state_dict()
    return pa.keys() == pb.keys() and all(
        torch.equal(pa[k], pb[k]) for k in pa if isinstance(pa[k], torch.Tensor)
    )


def strip_times(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History rows without wall-clock fields, which legitimately differ between runs."""
    return [{k: v for k, v in row.items() if k != "time_s"} for row in history]
