"""FiLM fusion: one modality's latent, feature-wise modulated by the others."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from miles.models.fusions.base import Fusion, register_fusion


@register_fusion("film")
class FiLMFusion(Fusion):
    """``h = gamma * z_target + beta`` with ``(gamma, beta) = Linear([z_k for k != target])``.

    Feature-wise linear modulation, Perez et al., "FiLM: Visual Reasoning with a General
    Conditioning Layer" (AAAI 2018), as used for multimodal fusion by OGM-GE (Peng et al., CVPR
    2022): the *target* modality's latent is scaled and shifted feature by feature by a linear map
    of the other modalities' latents (concatenated), and the fused head reads the result. As in
    the paper, ``gamma`` is predicted directly (not as ``1 + delta``).

    Args:
        target: the modulated modality (default: the first one; the others condition it).

    Not additive: the fused logits contain the product ``gamma(z_others) * z_target``, so they do
    not split into one share per modality and :meth:`modality_logits` raises. MILES needs no such
    split (its heads estimator reads the auxiliary heads); to measure "the model without ``m``" on
    the fused head itself, use the ablation estimator (``estimator="ablation"``).
    """

    def __init__(
        self, latent_sizes: Mapping[str, int], num_classes: int, target: str | None = None
    ) -> None:
        self.target = next(iter(latent_sizes)) if target is None else target
        if self.target not in latent_sizes:
            raise ValueError(f"target {self.target!r} is not a modality of {list(latent_sizes)}")
        if len(latent_sizes) < 2:
            raise ValueError("FiLM fusion needs at least two modalities: one is modulated")
        super().__init__(latent_sizes, num_classes)
        conditioning = sum(d for m, d in self.latent_sizes.items() if m != self.target)
        self.film = nn.Linear(conditioning, 2 * self.latent_sizes[self.target])

    def fused_features(self, latent_sizes: Mapping[str, int]) -> int:
        return latent_sizes[self.target]

    def fuse(self, latents: Mapping[str, Tensor]) -> Tensor:
        others = torch.cat([latents[m] for m in self.modalities if m != self.target], dim=-1)
        gamma, beta = self.film(others).chunk(2, dim=-1)
        out: Tensor = gamma * latents[self.target] + beta
        return out
