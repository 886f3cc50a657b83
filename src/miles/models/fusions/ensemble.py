"""A fused prediction that is an ensemble of the model's unimodal heads (UME's prediction).

Reference: C. Du et al., "On Uni-Modal Feature Learning in Supervised Multi-Modal Learning", ICML
2023 (arXiv 2305.01233): the Uni-Modal Ensemble (UME) trains one model per modality and predicts
with their ensemble.

Not in the fusion registry: the UME strategy (:mod:`miles.strategies.ume`) installs it with
:func:`unimodal_ensemble`. It reads the model's own unimodal heads (``JointFusionModel.heads``), so
the ensemble members are exactly what the tables report as the unimodal heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from miles.models.fusions.base import Fusion
from miles.validation import check_choice

__all__ = ["RULES", "UnimodalEnsembleFusion", "unimodal_ensemble"]

#: ``"logits"``: the mean of the members' logits; ``"probs"``: the log of the mean of their
#: softmax probabilities (so the fused cross-entropy is the averaged prediction's)
RULES = ("logits", "probs")

MemberLogits = Callable[[Mapping[str, Tensor]], dict[str, Tensor]]


class UnimodalEnsembleFusion(Fusion):
    """Fused logits = a combination of every modality's own head on its own latent.

    Args:
        latent_sizes: as for every fusion.
        num_classes: as for every fusion.
        members: ``latents -> {modality: logits}``, the model's unimodal heads
            (``JointFusionModel.unimodal_logits``); held as a plain reference, not a submodule,
            since the heads belong to the model (their parameters appear once in its state).
        rule: ``"logits"`` (mean of logits) or ``"probs"`` (log of the mean probability).

    Every fusion owns a linear head (``self.head``); this one is never used, so it receives no
    gradient and stays at its initial value. With ``rule="logits"`` the fusion is additive:
    :meth:`modality_logits` is ``head_m(z_m) / M``.
    """

    def __init__(
        self,
        latent_sizes: Mapping[str, int],
        num_classes: int,
        members: MemberLogits,
        *,
        rule: str = "logits",
    ) -> None:
        super().__init__(latent_sizes, num_classes)
        if not callable(members):
            raise TypeError(f"members must be callable, got {type(members).__name__}")
        self.members = members
        self.rule = check_choice("rule", rule, RULES)

    def fused_features(self, latent_sizes: Mapping[str, int]) -> int:
        return sum(latent_sizes.values())  # the unused head: as wide as concatenation's

    def fuse(self, latents: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([latents[m] for m in self.modalities], dim=-1)

    def forward(self, latents: Mapping[str, Tensor]) -> Tensor:
        missing = [m for m in self.modalities if m not in latents]
        if missing:
            raise ValueError(
                f"latents lack modalities {missing}; fusion reads {list(self.modalities)}"
            )
        logits = self.members(latents)
        stacked = torch.stack([logits[m] for m in self.modalities])
        if self.rule == "logits":
            return stacked.mean(dim=0)
        return torch.logsumexp(torch.log_softmax(stacked, dim=-1), dim=0) - math.log(len(stacked))

    def modality_logits(self, latents: Mapping[str, Tensor], modality: str) -> Tensor:
        self._check_modality(modality)
        if self.rule != "logits":
            return super().modality_logits(latents, modality)  # not additive: raises
        return self.members(latents)[modality] / len(self.modalities)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rule={self.rule!r}"


def unimodal_ensemble(
    fusion: Fusion, members: MemberLogits, *, rule: str = "logits"
) -> UnimodalEnsembleFusion:
    """The ensemble fusion for the latents ``fusion`` reads, without drawing from the global
    random stream (its unused head is initialised inside a forked stream)."""
    with torch.random.fork_rng(devices=[]):
        built = UnimodalEnsembleFusion(fusion.latent_sizes, fusion.num_classes, members, rule=rule)
    return built.to(fusion.head.weight.device, fusion.head.weight.dtype)
