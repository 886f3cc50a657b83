"""LFM: learning the modality gap with a dynamic mix of classification and contrastive matching
(Yang, Wan, Jiang, Xu, NeurIPS 2024), the paper's heuristic variant ("Ours-H").

Reference: Y. Yang, F. Wan, Q.-Y. Jiang, Y. Xu, "Facilitating Multimodal Classification via
Dynamically Learning Modality Gap", NeurIPS 2024 (Sec. 3.2-3.3, Eq. 1, Alg. 1). The authors' code
(github.com/njustkmg/NeurIPS24-LFM, read through the research note at commit ad44fa0) trains a
different objective, see the class docstring.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from miles.models.fusion import FusionOutput
from miles.models.losses import FUSED
from miles.strategies.base import EvalResult, StrategyContext
from miles.strategies.joint import Joint
from miles.strategies.registry import register_strategy
from miles.validation import check_fraction, check_positive

__all__ = ["LFM", "heuristic_alpha", "matching_loss"]


def heuristic_alpha(epoch: int) -> float:
    """``alpha_t = omega(t) = 1 - exp(-1/t)`` (Sec. 3.3), ``t`` the epoch counted from 1."""
    if epoch < 1:
        raise ValueError(f"epoch counts from 1, got {epoch}")
    return 1.0 - math.exp(-1.0 / epoch)


def matching_loss(first: Tensor, second: Tensor, temperature: float) -> Tensor:
    """``L_MM`` of Sec. 3.2: the symmetric InfoNCE of paired latents under cosine similarity.

    ``-1/(2n) sum_i [log softmax_k(s(i, k) / tau)_i + log softmax_k(s(k, i) / tau)_i]`` with
    ``s(i, k) = cos(first_i, second_k)``: each sample's two latents should be more alike than any
    other pairing in the batch.
    """
    sim = F.normalize(first, dim=1) @ F.normalize(second, dim=1).T / temperature
    labels = torch.arange(sim.shape[0], device=sim.device)
    return 0.5 * (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels))


@register_strategy("lfm")
class LFM(Joint):
    """``L = (1 - alpha_t) L_CLS + alpha_t L_MM``: classification mixed with modality matching.

    ``L_CLS`` is the fused head's loss (the paper's ``softmax(W z + b)`` on the fused latents) and
    ``L_MM`` the symmetric InfoNCE between the modalities' latents (:func:`matching_loss`, the mean
    over modality pairs when there are more than two). The weight follows the paper's heuristic
    ``alpha_t = 1 - exp(-1/t)`` (:func:`heuristic_alpha`): matching dominates the first epoch
    (0.632) and fades (0.095 at epoch 10). The unimodal heads train on detached latents as
    probes, as in :class:`~miles.strategies.joint.Joint` (``uses_aux_losses = False``).
    Readouts: the fused head; the unimodal columns are the probe heads.

    Args:
        temperature: ``tau`` of ``L_MM``. The paper gives no value; default 0.4, the only
            temperature in the authors' material (``temperature1`` in their CREMA-D config,
            which their code does not use). Unverified.
        alpha: a constant ``alpha`` instead of the schedule (the paper's ``h(c)`` ablation);
            ``None`` (default) is the heuristic schedule. ``alpha = 0`` is exactly ``joint``.

    What this is not: the learning-based variant ("Ours-LB", bi-level optimisation of ``alpha``
    with the implicit-gradient approximation of Eq. 3) is not implemented. The authors' released
    code trains something else: two unimodal heads whose averaged logits predict, with
    ``k1 CE + k2 A`` where ``A`` is a prediction-level divergence (``0.5 (KL(m||p) + KL(m||q))``
    with ``m`` the mean of the two softmaxes), no contrastive term, and ``k1`` a fitted
    degree-5 polynomial of the epoch (``Crema_epoch.py``) or an HVP update (the learnable
    script); BalanceBenchmark follows that code with the initial weights swapped. We follow the
    paper. The paper's optimiser (SGD 1e-2, momentum 0.9, weight decay 0.1, plateau decay, batch
    256) is replaced by the run's.
    """

    name = "lfm"
    uses_aux_losses = False

    def __init__(self, temperature: float = 0.4, alpha: float | None = None) -> None:
        self.temperature = check_positive("temperature", temperature)
        self.alpha = None if alpha is None else check_fraction("alpha", alpha, one=True)
        self._weight = 0.0

    def weight(self, epoch: int) -> float:
        """``alpha`` used during ``epoch``."""
        return heuristic_alpha(epoch) if self.alpha is None else self.alpha

    def on_epoch_start(self, ctx: StrategyContext, epoch: int) -> None:
        self._weight = self.weight(epoch)

    def matching(self, latents: Mapping[str, Tensor]) -> Tensor:
        """``L_MM`` over every pair of modalities (their mean)."""
        pairs = list(itertools.combinations(sorted(latents), 2))
        if not pairs:
            raise ValueError("LFM needs at least 2 modalities")
        terms = [matching_loss(latents[a], latents[b], self.temperature) for a, b in pairs]
        return torch.stack(terms).mean()

    def loss(
        self, losses: Mapping[str, Tensor], output: FusionOutput, batch: Mapping[str, Any]
    ) -> Tensor:
        alpha = self._weight
        if alpha == 0:
            return super().loss(losses, output, batch)
        weighted = dict(losses)
        weighted[FUSED] = (1.0 - alpha) * losses[FUSED]
        return super().loss(weighted, output, batch) + alpha * self.matching(output.latents)

    def on_epoch_end(
        self, ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None
    ) -> dict[str, Any]:
        return {"alpha": self._weight}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "temperature": self.temperature, "alpha": self.alpha}
