"""Gated fusion: a gated multimodal unit that learns, per sample and feature, whom to listen to."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from miles.models.fusions.base import Fusion, register_fusion


@register_fusion("gated")
class GatedFusion(Fusion):
    """``h = sum_m g_m * tanh(W_m z_m)``, ``g = softmax_m(V [z_1; ...; z_N])`` per feature.

    The gated multimodal unit of Arevalo et al., "Gated Multimodal Units for Information Fusion"
    (ICLR workshop 2017), written for N modalities: with two, the softmax over modalities is the
    paper's sigmoid gate ``z`` and ``1 - z``. Every latent is projected to the width of the
    widest one; the gate reads all latents concatenated. The fused head reads ``h``.

    Additive given the gates: modality ``m``'s share is ``W (g_m * tanh(W_m z_m)) + b / N`` and the
    shares add up to the fused logits exactly. The gate itself reads every modality, so one
    modality's share also depends on the others' latents through ``g_m``.
    """

    def __init__(self, latent_sizes: Mapping[str, int], num_classes: int) -> None:
        super().__init__(latent_sizes, num_classes)
        width = self.head.in_features
        self.project = nn.ModuleDict({m: nn.Linear(d, width) for m, d in self.latent_sizes.items()})
        self.gate = nn.Linear(sum(self.latent_sizes.values()), width * len(self.latent_sizes))

    def fused_features(self, latent_sizes: Mapping[str, int]) -> int:
        return max(latent_sizes.values())

    def gated_terms(self, latents: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{m: g_m * tanh(W_m z_m)}``, the terms whose sum the head reads."""
        modalities = self.modalities
        stacked = torch.cat([latents[m] for m in modalities], dim=-1)
        gates = self.gate(stacked).view(stacked.shape[0], len(modalities), -1).softmax(dim=1)
        return {
            m: gates[:, i] * torch.tanh(self.project[m](latents[m]))
            for i, m in enumerate(modalities)
        }

    def fuse(self, latents: Mapping[str, Tensor]) -> Tensor:
        terms = self.gated_terms(latents)
        return torch.stack([terms[m] for m in self.modalities], dim=0).sum(dim=0)

    def modality_logits(self, latents: Mapping[str, Tensor], modality: str) -> Tensor:
        self._check_modality(modality)
        return self._linear_share(self.gated_terms(latents)[modality], self.head.weight)
