"""MSLR-Dynamic: rates rescaled by recent unimodal progress (method: ``mslr_base``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from miles.strategies.base import EvalResult
from miles.strategies.mslr_base import _MSLRBase
from miles.strategies.registry import register_strategy
from miles.validation import check_non_negative, check_positive_int


@register_strategy("mslr-d")
class MSLRDynamic(_MSLRBase):
    """MSLR-Dynamic (Yao and Mihalcea, Findings of ACL 2022): rates follow unimodal validation.

    After every validation the unimodal metric of each head, ``M_m(t)``, joins a window of the last
    ``window`` values. Every ``update_every`` epochs (``t % update_every == 0``)::

        lr_m <- lr_m * (M_m(t) / mean(M_m(t - window + 1 .. t))) ** strength

    A modality still improving (current metric above its recent mean) speeds up; one that
    stagnates or degrades slows down. Updates compound; the new rates apply from the next epoch.
    A modality whose current metric or window mean is 0 (or not finite) is left unchanged that
    time (the ratio would zero or blow up its rate), which the epoch record notes.

    Args:
        unimodal_lrs: starting rates (as for :class:`MSLRKeep`); ``None`` starts every modality at
            the trainer's base rate.
        window: how many recent validation metrics form the mean; default 5 (the public
            re-implementation's ``history_length``).
        update_every: epochs between updates; default ``None`` = ``window`` (as in that
            re-implementation; ``1`` updates after every epoch).
        strength: exponent on the ratio; 1 (default) is the plain ratio, 0 disables updates (then
            this is Keep bit for bit).
        head_follows_encoder, aux_weights: as for :class:`MSLRKeep`.

    Uses the auxiliary losses (``uses_aux_losses = True``): the unimodal heads it reads must be
    trained. Its window and current rates are in ``state_dict``, so a resumed run matches an
    uninterrupted one.
    """

    name = "mslr-d"
    _lrs_required = False

    def __init__(
        self,
        unimodal_lrs: Mapping[str, float] | None = None,
        window: int = 5,
        update_every: int | None = None,
        strength: float = 1.0,
        head_follows_encoder: bool = True,
        aux_weights: float | dict[str, float] = 1.0,
    ) -> None:
        super().__init__(unimodal_lrs, head_follows_encoder, aux_weights)
        check_positive_int("window", window)
        if update_every is not None:
            check_positive_int("update_every", update_every)
        check_non_negative("strength", strength)
        self.window = window
        self.update_every = update_every if update_every is not None else window
        self.strength = float(strength)
        self.history: dict[str, list[float]] = {}

    def _reset(self) -> None:
        self.history = {}

    def initial_lrs(self, modalities: Sequence[str], base_lr: float) -> dict[str, float]:
        if self.unimodal_lrs:
            return {m: self.unimodal_lrs[m] for m in modalities}
        return {m: base_lr for m in modalities}

    def _update(self, epoch: int, val: EvalResult) -> dict[str, Any]:
        assert self.lrs is not None
        for m in self.lrs:
            window = self.history.setdefault(m, [])
            window.append(float(val.unimodal[m]))
            del window[: -self.window]
        if epoch % self.update_every != 0:
            return {"updated": False}
        ratios: dict[str, float | None] = {}
        for m, window in self.history.items():
            current, mean = window[-1], sum(window) / len(window)
            if not (current > 0 and mean > 0 and math.isfinite(current) and math.isfinite(mean)):
                ratios[m] = None
                continue
            ratios[m] = current / mean
            if self.strength != 0:
                self.lrs[m] = self.lrs[m] * ratios[m] ** self.strength  # type: ignore[operator]
        return {"updated": True, "ratio": ratios}

    def state_dict(self) -> dict[str, Any]:
        if self.lrs is None:
            return {}
        return {"lrs": dict(self.lrs), "history": {m: list(v) for m, v in self.history.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        unknown = sorted(set(state) - {"lrs", "history"})
        if unknown:
            raise ValueError(f"mslr-d: unexpected state keys {unknown}")
        self.lrs = {str(m): float(v) for m, v in state["lrs"].items()}
        self.history = {str(m): [float(x) for x in v] for m, v in state["history"].items()}
        self._restored = True  # on_fit_start applies these rates instead of starting over

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "window": self.window,
            "update_every": self.update_every,
            "strength": self.strength,
        }
