"""MLA's test-time fusion: a shared head's per-modality logits weighted by their certainty."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from miles.models.fusions.base import register_fusion
from miles.models.fusions.shared_head import SharedHeadFusion
from miles.validation import check_bool


def entropy_weights(logits: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per example, ``lambda_m = exp(max_k e_k - e_m) / sum_v exp(max_k e_k - e_v)`` (Zhang et
    al., CVPR 2024, Eq. 6-7), ``e_m`` the entropy of ``softmax(logits_m)``: a softmax over the
    modalities of ``-e_m``, so the most certain modality weighs most. Each weight is ``(batch, 1)``.
    """
    names = list(logits)
    entropy = []
    for m in names:
        logp = torch.log_softmax(logits[m], dim=-1)
        entropy.append(-(logp.exp() * logp).sum(dim=-1))
    weights = torch.softmax(-torch.stack(entropy, dim=0), dim=0)
    return {m: weights[i].unsqueeze(-1) for i, m in enumerate(names)}


@register_fusion("uncertainty")
class UncertaintyFusion(SharedHeadFusion):
    """``y = sum_m lambda_m g(z_m)`` with one head ``g`` shared by the modalities (MLA).

    Args:
        dynamic: weight each modality per example by its certainty (:func:`entropy_weights`, the
            paper's Eq. 6-8, the authors' ``--dynamic`` run); ``False``: equal weights ``1/M``.

    The authors' code normalises the entropy weights over the whole evaluation batch (``softmax``
    on dimension 0 of the logits), so its predictions depend on the batch size and on the other
    examples in the batch; here they are per example, as Eq. 7 writes them.
    """

    def __init__(
        self, latent_sizes: Mapping[str, int], num_classes: int, *, dynamic: bool = True
    ) -> None:
        super().__init__(latent_sizes, num_classes)
        self.dynamic = check_bool("dynamic", dynamic)

    def weights(self, logits: Mapping[str, Tensor]) -> dict[str, Tensor | float]:
        """``lambda_m`` for every modality (a ``(batch, 1)`` tensor, or ``1/M`` when fixed)."""
        if self.dynamic:
            return dict(entropy_weights(logits))
        return dict.fromkeys(logits, 1.0 / len(logits))

    def combine(self, logits: Mapping[str, Tensor]) -> Tensor:
        weights = self.weights(logits)
        shares = [weights[m] * logits[m] for m in self.modalities]
        return torch.stack(shares, dim=0).sum(dim=0)

    def modality_logits(self, latents: Mapping[str, Tensor], modality: str) -> Tensor:
        """``lambda_m g(z_m)``: the shares add up to the fused logits (each weight depends on
        every modality's certainty)."""
        self._check_modality(modality)
        logits = self.unimodal_logits(latents)
        return self.weights(logits)[modality] * logits[modality]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dynamic={self.dynamic}"
