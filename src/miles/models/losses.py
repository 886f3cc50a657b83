"""Per-head losses. Strategies combine them (``L = L_fused + sum_m w_m L_m`` by default)."""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

from miles.models.fusion import FusionOutput

FUSED = "fused"


def task_loss(logits: Tensor, target: Tensor, *, multilabel: bool = False) -> Tensor:
    """Cross-entropy for single-label targets, BCE-with-logits for multilabel (0/1) targets."""
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))
    return F.cross_entropy(logits, target)


def head_losses(
    output: FusionOutput, target: Tensor, *, multilabel: bool = False
) -> dict[str, Tensor]:
    """``{"fused": L_fused, modality: L_m, ...}``; every strategy weights these the way it wants."""
    losses = {FUSED: task_loss(output.fused, target, multilabel=multilabel)}
    for name, logits in output.unimodal.items():
        losses[name] = task_loss(logits, target, multilabel=multilabel)
    return losses
