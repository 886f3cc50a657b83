"""The unimodal reference row: one modality's encoder and head trained alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from miles.models.fusion import FusionOutput, JointFusionModel
from miles.strategies.base import EvalResult, Strategy
from miles.strategies.registry import register_strategy
from miles.validation import check_str


@register_strategy("unimodal")
class Unimodal(Strategy):
    """Train only modality ``m``: its encoder and its head, on its own loss ``L_m``.

    This is the "unimodal models trained alone" reference of the MILES paper (Guerra-Manzanares
    and Shamout, arXiv 2510.17394, results section), which shows how good each encoder can get
    without a competing modality. It reuses the joint-fusion model so every method is trained by
    the same code: the other encoders (and their heads) are frozen from the start with
    ``model.freeze`` (no gradients, BatchNorm statistics fixed), and the loss is ``L_m`` alone,
    so the fused head receives no gradient (Adam and SGD skip parameters without one) and stays at
    its initialisation. The fused metric the trainer still logs is therefore meaningless; the best
    epoch is chosen on ``m``'s head (``selection_score``).

    Args:
        modality: the modality to train; checked against the model in ``configure_model``.

    ``uses_aux_losses`` is ``False``: the only loss is the unimodal one. Limitation: the frozen
    encoders still run in every forward pass (the model always computes all latents), which costs
    time but changes no number.
    """

    name = "unimodal"
    uses_aux_losses = False

    def __init__(self, modality: str) -> None:
        self.modality = check_str("modality", modality)

    def configure_model(self, model: JointFusionModel) -> None:
        if self.modality not in model.modalities:
            raise ValueError(
                f"unimodal: unknown modality {self.modality!r}; the model has "
                f"{list(model.modalities)}"
            )
        # The head must see the encoder's gradient path: L_m trains encoder m through head m.
        model.detach_unimodal_heads = False
        for other in model.modalities:
            if other != self.modality:
                model.freeze(other)
        # L_m never reaches the fusion layer: freezing it changes no number, and lets
        # DistributedDataParallel leave out parameters that would never get a gradient
        model.fusion.requires_grad_(False)

    def loss(
        self, losses: Mapping[str, Tensor], output: FusionOutput, batch: Mapping[str, Any]
    ) -> Tensor:
        """``L_m`` only: neither the fused loss nor the other heads' losses are optimised."""
        return losses[self.modality]

    def selection_score(self, val: EvalResult) -> float:
        """The best epoch is the one where ``m``'s own head is best on validation."""
        return val.unimodal[self.modality]

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "modality": self.modality,
            "note": "unimodal reference: only this modality's encoder and head are trained",
        }
