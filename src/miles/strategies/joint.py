"""Reference strategies: vanilla joint training and joint training with auxiliary losses."""

from __future__ import annotations

from miles.models.fusion import JointFusionModel
from miles.strategies.base import Strategy, check_aux_weights
from miles.strategies.registry import register_strategy


@register_strategy("joint")
class Joint(Strategy):
    """Vanilla joint training: only the fused loss reaches the encoders.

    The unimodal heads still train, on detached latents, so their accuracy can be reported (it
    shows how much each encoder learned) without their losses touching the encoders.
    """

    name = "joint"
    uses_aux_losses = False

    def configure_model(self, model: JointFusionModel) -> None:
        model.detach_unimodal_heads = True


@register_strategy("joint+aux")
class JointAux(Strategy):
    """Fused loss plus every unimodal loss (weights 1): MILES with ``mu = 1``."""

    name = "joint+aux"

    def __init__(self, aux_weights: float | dict[str, float] = 1.0) -> None:
        self.aux_weights = check_aux_weights(aux_weights)
