"""ReconBoost's ensemble: a shared head's per-modality logits, summed, times a learned rate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from miles.models.fusions.base import register_fusion
from miles.models.fusions.shared_head import SharedHeadFusion
from miles.validation import check_finite


@register_fusion("boosted-sum")
class BoostedSumFusion(SharedHeadFusion):
    """``y = boost_rate * sum_{m in ensemble} g(z_m)``, ``g`` a head the modalities share
    (ReconBoost: Hua et al., ICML 2024; the authors' ``DynamicNet.forward_grad``).

    Args:
        boost_rate: initial value of the learnable scale (the authors' ``--boost_rate`` 1.0).

    ``members`` (a boolean buffer, all modalities by default) marks which modalities' learners are
    in the ensemble yet: ReconBoost adds a modality's learner after its first boosting phase, and
    the ensemble predicts 0 (every class alike) before any is added.
    """

    members: Tensor

    def __init__(
        self, latent_sizes: Mapping[str, int], num_classes: int, *, boost_rate: float = 1.0
    ) -> None:
        super().__init__(latent_sizes, num_classes)
        self.boost_rate = nn.Parameter(torch.tensor(float(check_finite("boost_rate", boost_rate))))
        self.register_buffer("members", torch.ones(len(self.latent_sizes), dtype=torch.bool))

    def set_members(self, members: Sequence[str]) -> None:
        """Put exactly ``members`` (modality names) in the ensemble."""
        unknown = [m for m in members if m not in self.latent_sizes]
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; fusion reads {list(self.modalities)}")
        with torch.no_grad():
            for i, m in enumerate(self.modalities):
                self.members[i] = m in members

    def member_names(self) -> list[str]:
        """The modalities whose learners are in the ensemble."""
        flags = self.members.tolist()
        return [m for m, flag in zip(self.modalities, flags, strict=True) if flag]

    def combine(self, logits: Mapping[str, Tensor]) -> Tensor:
        first = logits[self.modalities[0]]
        total = torch.zeros_like(first)
        for m in self.member_names():
            total = total + logits[m]
        return self.boost_rate * total

    def modality_logits(self, latents: Mapping[str, Tensor], modality: str) -> Tensor:
        """``boost_rate * g(z_m)`` for an ensemble member, zeros otherwise (they add up to the
        fused logits)."""
        self._check_modality(modality)
        share = self.boost_rate * self.head(latents[modality])
        return share if modality in self.member_names() else torch.zeros_like(share)
