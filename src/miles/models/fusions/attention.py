"""Attention fusion: a small transformer over one token per modality."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from miles.models.fusions.base import Fusion, register_fusion
from miles.validation import check_positive_int


@register_fusion("attention")
class AttentionFusion(Fusion):
    """Each latent becomes a token (a linear map plus a learned modality embedding); one pre-norm
    transformer encoder layer lets every token attend to every modality's token; the fused head
    reads the mean of the tokens.

    A small cross-modal attention fusion in the spirit of the multimodal transformers the MILES
    paper names as learnable fusion (Guerra-Manzanares and Shamout, arXiv 2510.17394, conclusion),
    sized for the small tasks here: token width = the widest latent (rounded up to a multiple of
    ``heads``), ``heads`` attention heads, feed-forward width twice the token width, no dropout
    (so a seeded run stays deterministic). Each modality's token is updated from the others'
    (cross-modal attention) and from its own: with one token per modality, masking the token's
    own key would leave two modalities nothing to weigh.

    Args:
        heads: attention heads.

    Not additive (softmax attention and layer norm mix the modalities), so
    :meth:`modality_logits` raises; use the ablation estimator (``estimator="ablation"``) to
    measure "the model without ``m``" on the fused head.
    """

    def __init__(self, latent_sizes: Mapping[str, int], num_classes: int, heads: int = 4) -> None:
        self.heads = check_positive_int("heads", heads)
        super().__init__(latent_sizes, num_classes)
        width = self.head.in_features
        self.tokens = nn.ModuleDict({m: nn.Linear(d, width) for m, d in self.latent_sizes.items()})
        self.modality_embedding = nn.Parameter(torch.zeros(len(self.latent_sizes), width))
        nn.init.normal_(self.modality_embedding, std=0.02)
        self.layer = nn.TransformerEncoderLayer(
            width,
            self.heads,
            dim_feedforward=2 * width,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )

    def fused_features(self, latent_sizes: Mapping[str, int]) -> int:
        widest = max(latent_sizes.values())
        return -(-widest // self.heads) * self.heads

    def fuse(self, latents: Mapping[str, Tensor]) -> Tensor:
        tokens = torch.stack([self.tokens[m](latents[m]) for m in self.modalities], dim=1)
        out: Tensor = self.layer(tokens + self.modality_embedding).mean(dim=1)
        return out
