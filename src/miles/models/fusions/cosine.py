"""MMCosine's fused head: per-modality cosine logits with a scaling factor.

Reference: R. Xu et al. (Xu, Feng, Zhang, Hu), "MMCosine: Multi-Modal Cosine Loss Towards Balanced
Audio-Visual Fine-Grained Learning", ICASSP 2023 (arXiv 2303.05338); the authors' code
(github.com/GeWu-Lab/MMCosine_ICASSP23, ``main_CD.py``, ``train_epoch`` and ``valid``).

For modality ``m`` with latent ``z_m`` and head block ``W_m`` (the columns of the fused linear head
that read ``z_m``), the training logits are ``s * sum_m cos(z_m, W_m[c])``: each latent and each
class row of ``W_m`` is L2-normalised, the bias is not used, and ``s`` (``scaling``) sets the
logits' range. The normalisation takes each modality's feature and weight norms out of the fused
prediction, which is how the method keeps one modality from dominating the fused logits.

The variants here are the built-in linear additive fusions (``concat``, ``sum``) with that forward
in training mode. They are not in the fusion registry: the MMCosine strategy
(:mod:`miles.strategies.mmcosine`) builds one from the model's fusion with :func:`cosine_fusion`,
holding the same weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from miles.models.fusions.base import Fusion
from miles.models.fusions.concat import ConcatFusion
from miles.models.fusions.sum import SumFusion
from miles.validation import check_choice, check_positive

__all__ = ["READOUTS", "CosineConcatFusion", "CosineFusion", "CosineSumFusion", "cosine_fusion"]

#: what the fused head predicts in eval mode: the plain linear head (the authors' test
#: prediction) or the cosine logits (BalanceBenchmark's)
READOUTS = ("linear", "cosine")


class CosineFusion(Fusion):
    """A linear additive fusion whose training logits are ``s * sum_m cos(z_m, W_m[c])``.

    Args:
        latent_sizes: as for every fusion.
        num_classes: as for every fusion.
        scaling: ``s``, the scale of the cosine logits (the authors' default 10).
        readout: the fused prediction in eval mode: ``"linear"`` (the ordinary linear head with
            its bias, as the authors' ``valid`` predicts) or ``"cosine"`` (the scaled cosine sum,
            as BalanceBenchmark predicts). In training mode the logits are always the cosine sum.

    :meth:`modality_logits` is ``s * cos(z_m, W_m[c])``, the authors' "approximate uni-modal
    evaluation"; the shares add up to the training logits (and to the fused prediction with
    ``readout="cosine"``).
    """

    def __init__(
        self,
        latent_sizes: Mapping[str, int],
        num_classes: int,
        *,
        scaling: float = 10.0,
        readout: str = "linear",
    ) -> None:
        super().__init__(latent_sizes, num_classes)
        self.scaling = float(check_positive("scaling", scaling))
        self.readout = check_choice("readout", readout, READOUTS)

    def modality_logits(self, latents: Mapping[str, Tensor], modality: str) -> Tensor:
        weight = F.normalize(self.modality_weight(modality), dim=1)  # each class row
        return self.scaling * (F.normalize(latents[modality], dim=1) @ weight.T)

    def cosine_logits(self, latents: Mapping[str, Tensor]) -> Tensor:
        """``s * sum_m cos(z_m, W_m[c])``: the logits MMCosine trains on."""
        missing = [m for m in self.modalities if m not in latents]
        if missing:
            raise ValueError(
                f"latents lack modalities {missing}; fusion reads {list(self.modalities)}"
            )
        shares = [self.modality_logits(latents, m) for m in self.modalities]
        return torch.stack(shares).sum(dim=0)

    def forward(self, latents: Mapping[str, Tensor]) -> Tensor:
        if self.training or self.readout == "cosine":
            return self.cosine_logits(latents)
        return super().forward(latents)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scaling={self.scaling:g}, readout={self.readout!r}"


class CosineConcatFusion(CosineFusion, ConcatFusion):
    """MMCosine on concatenated latents: ``W_m`` is the head's columns that read ``z_m``."""


class CosineSumFusion(CosineFusion, SumFusion):
    """MMCosine on summed latents: every modality reads the whole (shared) head weight."""


#: the cosine variant of each supported fusion (a variant maps to itself: re-configuring an
#: MMCosine model sets the new scaling and readout on the same weights)
_VARIANTS: dict[type[Fusion], type[CosineFusion]] = {
    ConcatFusion: CosineConcatFusion,
    SumFusion: CosineSumFusion,
    CosineConcatFusion: CosineConcatFusion,
    CosineSumFusion: CosineSumFusion,
}


def cosine_fusion(fusion: Fusion, *, scaling: float, readout: str = "linear") -> CosineFusion:
    """The MMCosine variant of a built ``concat`` or ``sum`` fusion, with a copy of its weights.

    Building it does not draw from the global random stream (its own initial head is replaced by
    ``fusion``'s weights at once), so swapping the fusion leaves a seeded run's stream as it was.
    """
    variant = _VARIANTS.get(type(fusion))
    if variant is None:
        raise NotImplementedError(
            f"MMCosine needs a linear additive fusion ('concat' or 'sum'), "
            f"got {type(fusion).__name__}"
        )
    with torch.random.fork_rng(devices=[]):
        built = variant(fusion.latent_sizes, fusion.num_classes, scaling=scaling, readout=readout)
    built.load_state_dict(fusion.state_dict())
    return built.to(fusion.head.weight.device, fusion.head.weight.dtype)
