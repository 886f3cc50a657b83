"""Sum fusion: the fused head reads the element-wise sum of the latents."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from miles.models.fusions.base import Fusion, register_fusion


@register_fusion("sum")
class SumFusion(Fusion):
    """``logits = W (z_1 + ... + z_N) + b``; every latent must have the same size.

    Additive: modality ``m``'s share is ``W z_m + b / N``.
    """

    def fused_features(self, latent_sizes: Mapping[str, int]) -> int:
        sizes = set(latent_sizes.values())
        if len(sizes) > 1:
            raise ValueError(f"sum fusion needs equal latent sizes, got {dict(latent_sizes)}")
        return sizes.pop()

    def fuse(self, latents: Mapping[str, Tensor]) -> Tensor:
        return torch.stack([latents[m] for m in self.modalities], dim=0).sum(dim=0)

    def modality_logits(self, latents: Mapping[str, Tensor], modality: str) -> Tensor:
        weight = self.modality_weight(modality)  # checks the name first
        return self._linear_share(latents[modality], weight)

    def modality_weight(self, modality: str) -> Tensor:
        self._check_modality(modality)
        return self.head.weight
