"""MSLR-Smooth: unimodal rates pulled towards a common rate (method: ``mslr_base``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from miles.strategies.mslr_base import MEANS, _MSLRBase, smooth_lrs
from miles.strategies.registry import register_strategy
from miles.validation import check_choice, check_fraction, check_positive

#: what the rates are pulled toward: the mean of the modality rates, or the best joint rate
TARGETS = ("mean", "joint")


@register_strategy("mslr-s")
class MSLRSmooth(_MSLRBase):
    """MSLR-Smooth (Yao and Mihalcea, Findings of ACL 2022, Sec. 3.3): unimodal rates moved
    toward a common rate, then fixed for the run.

    The paper: "shifting the learning rate for different modalities to be closer to the average
    learning rate of all modalities, resulting in smaller margins"; no formula, three examples
    (best unimodal rates -> the rates used; best joint rate ``j``)::

        MuSE     text 2e-5, audio 5e-3, j 3e-4  ->  1e-4   / 1e-3      (Table 2, Sec. 5.2)
        MELD     text 1e-4, audio 1e-3, j 5e-4  ->  2.5e-4 / 7.5e-4    (Table 3, Sec. 5.3)
        MM-IMDb  text 1e-2, image 1e-4, j 1e-3  ->  3e-3   / 3e-4      (Table 4, Sec. 5.4)

    Our rules, ``s = smoothing = 0.5``, and what they give on those examples (largest error over
    the six rates, in decades, ``|log10(ours / paper)|``):

    | `target`, `mean` | MuSE | MELD | MM-IMDb | error |
    |---|---|---|---|---|
    | joint, geometric (`sqrt(lr j)`) | 7.8e-5 1.2e-3 | 2.2e-4 7.1e-4 | 3.2e-3 3.2e-4 | 0.11 |
    | mean, geometric (default) | 8.0e-5 1.3e-3 | 1.8e-4 5.6e-4 | 3.2e-3 3.2e-4 | 0.15 |
    | joint, arithmetic | 1.6e-4 2.7e-3 | 3.0e-4 7.5e-4 | 5.5e-3 5.5e-4 | 0.42 |
    | mean, arithmetic (literal text) | 1.3e-3 3.8e-3 | 3.3e-4 7.8e-4 | 7.5e-3 2.6e-3 | 1.10 |

    No closed form gives all six numbers (the authors rounded to round values); the geometric
    midpoint toward the best joint rate fits best (within a factor 1.3), the geometric midpoint
    toward the modalities' geometric mean next (within 1.4), without needing ``j``. The literal
    "average learning rate" (arithmetic mean) misses MuSE tenfold, since the rates differ by
    orders of magnitude. Default: ``target="mean"``, ``mean="geometric"`` (the paper's wording,
    read on a log scale); ``target="joint"`` is the best fit when the joint rate is tuned.

    ``lr_m = lr*_m^(1 - s) * T^s`` (geometric) or ``(1 - s) lr*_m + s T`` (arithmetic), ``T`` the
    target. ``s = 0`` is Keep; with every rate already equal to ``T`` the rates are returned
    unchanged (Keep bit for bit).

    Args:
        unimodal_lrs: as for :class:`~miles.strategies.mslr_k.MSLRKeep`.
        smoothing: ``s`` in ``[0, 1]``; default 0.5 (the examples above).
        mean: ``"geometric"`` (default) or ``"arithmetic"``: how to average and interpolate.
        target: ``"mean"`` (default) or ``"joint"``.
        joint_lr: the best joint rate for ``target="joint"``; ``None``: the trainer's base rate
            (the joint rate a tuned comparison runs at).
        head_follows_encoder, aux_losses, aux_weights: as for
            :class:`~miles.strategies.mslr_k.MSLRKeep`.
    """

    name = "mslr-s"

    def __init__(
        self,
        unimodal_lrs: Mapping[str, float] | None = None,
        smoothing: float = 0.5,
        mean: str = "geometric",
        target: str = "mean",
        joint_lr: float | None = None,
        head_follows_encoder: bool = True,
        aux_losses: bool = False,
        aux_weights: float | dict[str, float] = 1.0,
    ) -> None:
        super().__init__(unimodal_lrs, head_follows_encoder, aux_losses, aux_weights)
        check_fraction("smoothing", smoothing, one=True)
        check_choice("mean", mean, MEANS)
        self.target = check_choice("target", target, TARGETS)
        if joint_lr is not None:
            check_positive("joint_lr", joint_lr)
            if target != "joint":
                raise ValueError("joint_lr is the target of target='joint'; it is unused here")
        self.smoothing = float(smoothing)
        self.mean = mean
        self.joint_lr = joint_lr

    def initial_lrs(
        self, modalities: Sequence[str], base_lr: float | None
    ) -> dict[str, float] | None:
        lrs = {m: self.unimodal_lrs[m] for m in modalities}
        if self.target == "mean":
            return smooth_lrs(lrs, self.smoothing, self.mean)
        joint = self.joint_lr if self.joint_lr is not None else base_lr
        if joint is None:
            return None  # the base rate is not known yet
        return smooth_lrs(lrs, self.smoothing, self.mean, target=joint)

    def describe(self) -> dict[str, Any]:
        info = {**super().describe(), "smoothing": self.smoothing, "mean": self.mean}
        info["target"] = self.target
        if self.target == "joint":
            info["joint_lr"] = "base" if self.joint_lr is None else self.joint_lr
        return info
