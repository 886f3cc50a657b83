"""A strategy's own random stream, so its draws never move the run's streams.

Methods that draw at random during training (OPM's drops, CML's removal orders) draw from a
generator of their own: seeded from the run's seed when the fit starts, saved with the strategy's
state and restored when resuming. The run's global stream (dropout, noise) and its shuffling are
then the same whether or not the method acts, so a setting that never acts trains exactly like
its parent method, and a resumed run continues every stream where it stopped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["OwnStream"]


class OwnStream:
    """A ``torch.Generator`` seeded with ``run seed + offset`` at :meth:`start`.

    Args:
        offset: added to the run's seed, so different methods' streams differ.
    """

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self._generator: torch.Generator | None = None
        self._pending: Tensor | None = None

    def start(self, seed: int) -> None:
        """Seed the stream (called from ``on_fit_start``); a state loaded before takes over."""
        self._generator = torch.Generator().manual_seed(seed + self.offset)
        if self._pending is not None:
            self._generator.set_state(self._pending)
            self._pending = None

    @property
    def generator(self) -> torch.Generator:
        if self._generator is None:
            raise RuntimeError("the strategy's random stream is not started (on_fit_start)")
        return self._generator

    def state_dict(self) -> dict[str, Any]:
        """``{"generator": state}`` (empty before the stream was started or loaded)."""
        if self._generator is not None:
            return {"generator": self._generator.get_state()}
        return {} if self._pending is None else {"generator": self._pending}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back :meth:`state_dict`; applied at the next :meth:`start`."""
        if state:
            self._pending = state["generator"]
