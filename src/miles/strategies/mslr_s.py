"""MSLR-Smooth: unimodal rates pulled towards their mean (method: ``mslr_base``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from miles.strategies.mslr_base import MEANS, _MSLRBase
from miles.strategies.registry import register_strategy
from miles.validation import check_choice, check_fraction


@register_strategy("mslr-s")
class MSLRSmooth(_MSLRBase):
    """MSLR-Smooth (Yao and Mihalcea, Findings of ACL 2022): unimodal rates pulled to their mean.

    ``lr_m = exp((1 - s) ln lr*_m + s ln G)`` with ``G`` the geometric mean of the ``lr*`` (default,
    ``mean="geometric"``: rates differ by orders of magnitude, so this interpolates on a log
    scale), or ``lr_m = (1 - s) lr*_m + s A`` with ``A`` their arithmetic mean
    (``mean="arithmetic"``). ``s = 0`` is Keep, ``s = 1`` gives every modality the same rate. The
    rates are fixed for the run. When all unimodal rates are equal they are returned unchanged
    (so Smooth is Keep bit for bit, without floating-point noise from ``exp(log(.))``).

    Args:
        unimodal_lrs: as for :class:`MSLRKeep`.
        smoothing: ``s`` in ``[0, 1]``; default 0.5. The paper's value is not in our copy (see the
            module docstring), so treat it as a hyper-parameter to tune.
        mean: ``"geometric"`` (default) or ``"arithmetic"``.
        head_follows_encoder, aux_weights: as for :class:`MSLRKeep`.

    Loss and groups as for :class:`MSLRKeep` (``uses_aux_losses = True``).
    """

    name = "mslr-s"

    def __init__(
        self,
        unimodal_lrs: Mapping[str, float] | None = None,
        smoothing: float = 0.5,
        mean: str = "geometric",
        head_follows_encoder: bool = True,
        aux_weights: float | dict[str, float] = 1.0,
    ) -> None:
        super().__init__(unimodal_lrs, head_follows_encoder, aux_weights)
        check_fraction("smoothing", smoothing, one=True)
        check_choice("mean", mean, MEANS)
        self.smoothing = float(smoothing)
        self.mean = mean

    def initial_lrs(self, modalities: Sequence[str], base_lr: float) -> dict[str, float]:
        return smooth_lrs({m: self.unimodal_lrs[m] for m in modalities}, self.smoothing, self.mean)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "smoothing": self.smoothing, "mean": self.mean}


def smooth_lrs(
    lrs: Mapping[str, float], smoothing: float, mean: str = "geometric"
) -> dict[str, float]:
    """MSLR-Smooth's rule, exposed for inspection: interpolate each rate towards the mean."""
    values = list(lrs.values())
    if smoothing == 0 or len(set(values)) <= 1:
        return dict(lrs)
    s = smoothing
    if mean == "geometric":
        log_g = sum(math.log(v) for v in values) / len(values)
        return {m: math.exp((1 - s) * math.log(v) + s * log_g) for m, v in lrs.items()}
    if mean == "arithmetic":
        a = sum(values) / len(values)
        return {m: (1 - s) * v + s * a for m, v in lrs.items()}
    raise ValueError(f"mean must be one of {MEANS}, got {mean!r}")
