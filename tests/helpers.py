"""Helpers shared by the training tests (one place, so every test compares runs the same way)."""

from __future__ import annotations

from collections.abc import Collection
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


def assert_table_covers_library(
    kind: str, modules: dict[str, str], table: Collection[str], where: str
) -> None:
    """A contract test's table names every component the library registers (``modules``: name ->
    defining module); components a test or plugin registers (outside ``miles.``) are not asked."""
    library = {name for name, module in modules.items() if module.startswith("miles.")}
    missing = sorted(library - set(table))
    assert not missing, f"add an entry for {kind} {missing} to the table in {where}"
    unknown = sorted(set(table) - library)
    assert not unknown, f"the table in {where} names {kind} that are not registered: {unknown}"
