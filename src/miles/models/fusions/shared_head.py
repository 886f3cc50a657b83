"""A head every modality shares: the base of fusions that read one head on each latent."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from miles.models.fusions.base import PerModalityFusion


class SharedHeadFusion(PerModalityFusion):
    """One linear head ``g`` read on every modality's latent: modality ``m``'s logits are
    ``g(z_m)``; a subclass says how they combine (:meth:`combine`).

    Methods that train one classifier for all modalities (MLA's alternating unimodal updates,
    ReconBoost's boosted learners) use it: the head is ``self.head``, so it sits in the shared
    optimizer group, and every latent must have the same size.
    """

    def fused_features(self, latent_sizes: Mapping[str, int]) -> int:
        sizes = set(latent_sizes.values())
        if len(sizes) > 1:
            raise ValueError(
                f"fusion {self.name or type(self).__name__!r} reads one head on every latent, so "
                f"the latent sizes must be equal, got {dict(latent_sizes)}"
            )
        return sizes.pop()

    def unimodal_logits(self, latents: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {m: self.head(latents[m]) for m in self.modalities}
