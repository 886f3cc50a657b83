"""Concatenation fusion: the fused head reads every latent side by side."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from miles.models.fusions.base import Fusion, register_fusion


@register_fusion("concat")
class ConcatFusion(Fusion):
    """``logits = W [z_1; ...; z_N] + b``, latents concatenated in modality order.

    Additive: modality ``m``'s share is ``W[:, slice_m] z_m + b / N``, ``slice_m`` being the
    columns of ``W`` that read ``z_m``. Latent sizes may differ.
    """

    def __init__(self, latent_sizes: Mapping[str, int], num_classes: int) -> None:
        super().__init__(latent_sizes, num_classes)
        self._columns: dict[str, slice] = {}
        start = 0
        for m, size in self.latent_sizes.items():
            self._columns[m] = slice(start, start + size)
            start += size

    def fused_features(self, latent_sizes: Mapping[str, int]) -> int:
        return sum(latent_sizes.values())

    def fuse(self, latents: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([latents[m] for m in self.modalities], dim=-1)

    def modality_logits(self, latents: Mapping[str, Tensor], modality: str) -> Tensor:
        weight = self.modality_weight(modality)  # checks the name first
        return self._linear_share(latents[modality], weight)

    def modality_weight(self, modality: str) -> Tensor:
        self._check_modality(modality)
        return self.head.weight[:, self._columns[modality]]

    def columns(self, modality: str) -> slice:
        """The columns of ``head.weight`` that read ``modality``'s latent."""
        self._check_modality(modality)
        return self._columns[modality]
