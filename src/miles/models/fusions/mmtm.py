"""MMTM (multimodal transfer module) on the latents, with one branch head per modality.

The model of Greedy (Wu et al., ICML 2022; ``nyukat/greedy_multimodal_learning``,
``src/balanced_mmtm.py`` and ``src/model.py``): every branch is rescaled channel-wise by a gate
computed from all modalities (squeeze-and-excitation across modalities), then classified by its
own head; the prediction is the mean of the branch logits.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from miles.models.fusions.base import PerModalityFusion, register_fusion
from miles.validation import check_positive


@register_fusion("mmtm")
class MMTMFusion(PerModalityFusion):
    """``z'_m = z_m * sigmoid(W_m relu(W_s [z_1; ...; z_M] + b_s) + b_m)``; branch ``m`` predicts
    ``h_m(z'_m)``, the fusion the mean of the branches.

    Args:
        ratio: squeeze ratio; the shared squeeze layer has ``int(2 * sum_m d_m / ratio)`` outputs,
            the authors' ``dim_out = int(2 * (dim_visual + dim_skeleton) / ratio)`` with ratio 4.

    The authors place an MMTM after ResNet-18 stages 2, 3 and 4; the one after stage 4 is followed
    by global average pooling, and since both its squeeze (a spatial mean) and its channel gate
    commute with that pooling, it is exactly this module applied to the pooled features. Our
    encoders are opaque modules, so only that last MMTM exists here: the earlier ones, inside the
    encoders, are not reproduced.

    Greedy's re-balancing needs two more things, both here: the running mean of every gate over
    the training forwards (``running_gate_<modality>`` buffers), and a *curation* switch
    (:attr:`caring`) that replaces the caring modality's gate by that running mean, a constant,
    so the branch no longer receives the other modality's information and has to learn from its
    own features. Both act in training mode only: evaluation always uses the gates as computed.
    """

    has_fused_head = False

    def __init__(
        self, latent_sizes: Mapping[str, int], num_classes: int, *, ratio: float = 4.0
    ) -> None:
        super().__init__(latent_sizes, num_classes)
        self.ratio = check_positive("ratio", ratio)
        total = sum(self.latent_sizes.values())
        hidden = int(2 * total / self.ratio)
        if hidden < 1:
            raise ValueError(
                f"ratio {ratio} leaves no squeeze unit for latents of total size {total}"
            )
        self.squeeze = nn.Linear(total, hidden)
        self.excite = nn.ModuleDict({m: nn.Linear(hidden, d) for m, d in self.latent_sizes.items()})
        self.branches = nn.ModuleDict(
            {m: nn.Linear(d, num_classes) for m, d in self.latent_sizes.items()}
        )
        for m, d in self.latent_sizes.items():
            self.register_buffer(f"running_gate_{m}", torch.zeros(d))
        self.gate_steps: Tensor
        self.register_buffer("gate_steps", torch.zeros((), dtype=torch.long))
        #: the modality whose gate is replaced by its running mean in training forwards (None:
        #: no curation); set by the training method before each step
        self.caring: str | None = None

    def running_gate(self, modality: str) -> Tensor:
        """The mean gate of ``modality`` over every training forward so far."""
        self._check_modality(modality)
        out: Tensor = getattr(self, f"running_gate_{modality}")
        return out

    def gates(self, latents: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each modality's channel gate, ``(batch, d_m)``, computed from every latent."""
        squeezed = torch.cat([latents[m] for m in self.modalities], dim=-1)
        excitation = torch.relu(self.squeeze(squeezed))
        return {m: torch.sigmoid(self.excite[m](excitation)) for m in self.modalities}

    def _branch_logits(self, latents: Mapping[str, Tensor], *, record: bool) -> dict[str, Tensor]:
        gates = self.gates(latents)
        if record and self.training:
            self._record(gates)
            if self.caring is not None:
                mean = self.running_gate(self.caring)
                gates[self.caring] = mean.expand_as(gates[self.caring])
        return {m: self.branches[m](latents[m] * gates[m]) for m in self.modalities}

    @torch.no_grad()
    def _record(self, gates: Mapping[str, Tensor]) -> None:
        """Running mean over training forwards: ``avg <- (batch mean + avg * n) / (n + 1)``."""
        n = int(self.gate_steps)
        for m in self.modalities:
            avg = self.running_gate(m)
            avg.copy_((gates[m].mean(dim=0) + avg * n) / (n + 1))
        self.gate_steps.add_(1)

    def unimodal_logits(self, latents: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each branch head on its gated latent (not unimodal: the gate reads every modality)."""
        return self._branch_logits(latents, record=True)

    def combine(self, logits: Mapping[str, Tensor]) -> Tensor:
        return torch.stack([logits[m] for m in self.modalities], dim=0).mean(dim=0)

    def modality_logits(self, latents: Mapping[str, Tensor], modality: str) -> Tensor:
        """Branch ``m``'s logits over ``M`` (they add up to the fused logits); reading them does
        not touch the running gates."""
        self._check_modality(modality)
        return self._branch_logits(latents, record=False)[modality] / len(self.modalities)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ratio={self.ratio}"
