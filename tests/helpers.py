"""Helpers shared by the training tests (one place, so every test compares runs the same way)."""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator
from typing import Any
from unittest import mock

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


@contextlib.contextmanager
def interrupted_after(epoch: int) -> Iterator[None]:
    """Every ``Trainer.fit`` in the block stops once ``epoch`` is finished and saved, as a Ctrl-C
    or a kill then would: the first half of a resume test. (Training fewer epochs and resuming
    with more is refused: the run folder records the settings, ``trainer.epochs`` among them.)"""
    from miles.training.trainer import Trainer

    original = Trainer._run_epoch

    def run_epoch(self: Trainer, run: Any, current: int) -> bool:
        if current == epoch + 1:
            raise KeyboardInterrupt
        return original(self, run, current)

    with mock.patch.object(Trainer, "_run_epoch", run_epoch):
        try:
            yield
        except KeyboardInterrupt:
            return
    raise AssertionError(f"the fit was not interrupted after epoch {epoch}")
