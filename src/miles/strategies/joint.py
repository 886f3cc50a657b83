"""Reference strategies: vanilla joint training and joint training with auxiliary losses.

Most balancing methods are ``JointAux`` plus one mechanism (MILES, MSES, MSLR, G-Blend) or
``Joint`` plus one (OGM), and subclass the one they extend.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from miles.models.fusion import FusionOutput, JointFusionModel
from miles.models.losses import FUSED
from miles.strategies.base import Strategy
from miles.strategies.registry import register_strategy
from miles.validation import check_mapping, check_non_negative


def check_aux_weights(value: float | Mapping[str, float]) -> float | dict[str, float]:
    """Validate ``w_m`` of ``L = L_fused + sum_m w_m L_m``: one number, or one per modality."""
    if isinstance(value, Mapping):
        return check_mapping("aux_weights", value, check_non_negative, allow_empty=True)
    return check_non_negative("aux_weights", value)


def _fused_plus(losses: Mapping[str, Tensor], weight: Any = None) -> Tensor:
    """``L_fused + sum_m w_m L_m`` in the heads' order (``weight(m)``: ``w_m``; ``None``: all 1).

    A weight of exactly 1 adds the loss unscaled, so ``w = 1`` is bit-identical to no weighting.
    """
    total = losses[FUSED]
    for name, value in losses.items():
        if name != FUSED:
            w = 1.0 if weight is None else weight(name)
            total = total + (value if w == 1.0 else w * value)
    return total


@register_strategy("joint")
class Joint(Strategy):
    """Vanilla joint training: only the fused loss reaches the encoders.

    The unimodal heads still train, on detached latents (online probes), so their accuracy can be
    reported (it shows how much each encoder learned) without their losses touching the encoders:
    the loss is ``L_fused + sum_m L_m`` with every ``L_m`` computed on a detached latent.
    """

    name = "joint"
    uses_aux_losses = False

    def configure_model(self, model: JointFusionModel) -> None:
        model.detach_unimodal_heads = True

    def loss(
        self, losses: Mapping[str, Tensor], output: FusionOutput, batch: Mapping[str, Any]
    ) -> Tensor:
        """The fused loss, plus the probe losses (they reach the unimodal heads only)."""
        return _fused_plus(losses)


@register_strategy("joint+aux")
class JointAux(Strategy):
    """Fused loss plus every unimodal loss: ``L = L_fused + sum_m w_m L_m`` (MILES with ``mu = 1``).

    Args:
        aux_weights: ``w_m``: one number for all modalities, or ``{modality: weight}`` (missing
            modalities: 1). Default 1, as in the MILES paper.
    """

    name = "joint+aux"
    uses_aux_losses = True

    def __init__(self, aux_weights: float | Mapping[str, float] = 1.0) -> None:
        self.aux_weights = check_aux_weights(aux_weights)

    def configure_model(self, model: JointFusionModel) -> None:
        """The unimodal heads train the encoders."""
        model.detach_unimodal_heads = False

    def aux_weight(self, modality: str) -> float:
        """``w_m`` for one modality's auxiliary loss."""
        if isinstance(self.aux_weights, Mapping):
            return self.aux_weights.get(modality, 1.0)
        return self.aux_weights

    def loss(
        self, losses: Mapping[str, Tensor], output: FusionOutput, batch: Mapping[str, Any]
    ) -> Tensor:
        return _fused_plus(losses, self.aux_weight)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if self.aux_weights != 1.0:
            info["aux_weights"] = self.aux_weights
        return info
