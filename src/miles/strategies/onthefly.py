"""What OPM and the TPAMI version of OGM share: unimodal scores and the discrepancy ratio.

Reference: Y. Wei, D. Hu, H. Du, J.-R. Wen, "On-the-fly Modulation for Balanced Multimodal
Learning", IEEE TPAMI 2024 (arXiv 2410.11582; Sec. 3.2, Eq. 6-8 and 11), and the authors' code
(github.com/GeWu-Lab/BML_TPAMI2024, ``code/models/Classifier.py`` and ``code/main.py``, read at
commit 8db168f). The strategies are :mod:`miles.strategies.opm` and
:mod:`miles.strategies.ogm_tpami`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from miles.models.fusion import JointFusionModel
from miles.strategies.base import StrategyContext
from miles.strategies.joint import Joint
from miles.strategies.ogm import modality_logit_shares

__all__ = ["OnTheFly", "check_additive", "discrepancy", "mean_ratios", "unimodal_scores"]


def unimodal_scores(
    model: JointFusionModel, latents: Mapping[str, Tensor], target: Tensor
) -> dict[str, float]:
    """Eq. 6 summed over the batch: ``s_m = sum_i softmax(W_m z_m,i + b / M)[y_i]``.

    The share is the fusion's ``modality_logits`` (the head's block for ``z_m`` plus the bias split
    evenly), computed without gradient, as the authors do with the head's weight detached.
    """
    if target.dim() != 1 or target.dtype.is_floating_point:
        raise ValueError(
            "the on-the-fly scores need class-index targets of shape (batch,), got dtype "
            f"{target.dtype} and shape {tuple(target.shape)}"
        )
    idx = target.long().unsqueeze(1)
    shares = modality_logit_shares(model, latents)
    return {m: float(torch.softmax(out, dim=1).gather(1, idx).sum()) for m, out in shares.items()}


def mean_ratios(scores: Mapping[str, float]) -> dict[str, float]:
    """Eq. 7: ``rho_m = 1/(M-1) sum_{j != m} s_m / s_j`` (for two modalities ``s_a / s_b``).

    A zero ``s_j`` makes the term infinite when ``s_m > 0`` and 1 when both are zero (no lead).
    """
    names = list(scores)
    if len(names) < 2:
        raise ValueError(f"the discrepancy ratio needs at least 2 modalities, got {names}")
    out: dict[str, float] = {}
    for m in names:
        terms = []
        for j in names:
            if j == m:
                continue
            if scores[j] > 0:
                terms.append(scores[m] / scores[j])
            else:
                terms.append(math.inf if scores[m] > 0 else 1.0)
        out[m] = sum(terms) / len(terms)
    return out


def discrepancy(ratio: float) -> float:
    """``z(rho) = tanh(rho - 1)``, the monotone map the paper uses in Eq. 8 and Eq. 11."""
    return math.tanh(ratio - 1.0)


def check_additive(model: JointFusionModel, who: str) -> None:
    """Fail before training when the fusion has no per-modality share (Eq. 6 needs one)."""
    if len(model.modalities) < 2:
        raise ValueError(f"{who} needs at least 2 modalities, got {list(model.modalities)}")
    like = model.fused_head.weight
    probe = {m: like.new_zeros(1, size) for m, size in model.latent_sizes.items()}
    try:
        modality_logit_shares(model, probe)
    except NotImplementedError as exc:
        raise NotImplementedError(f"{who}: {exc}") from None


class OnTheFly(Joint):
    """Joint training (fused loss; unimodal heads as detached probes) with what both on-the-fly
    methods need checked before training: an additive fusion and single-label targets (Eq. 6
    reads each modality's share of the fused logits at the true class)."""

    uses_aux_losses = False

    def configure_model(self, model: JointFusionModel) -> None:
        check_additive(model, type(self).__name__)
        super().configure_model(model)

    def on_fit_start(self, ctx: StrategyContext) -> None:
        if ctx.multilabel:
            raise ValueError(
                f"{self.name} does not support multilabel tasks: its score (Eq. 6) needs one class"
            )
