"""UME: the Uni-Modal Ensemble (Du et al., ICML 2023).

Reference: C. Du et al., "On Uni-Modal Feature Learning in Supervised Multi-Modal Learning", ICML
2023 (arXiv 2305.01233). No code by the authors was found, and BalanceBenchmark does not implement
UME; this follows the paper's abstract (the body could not be read), see the class docstring.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from miles.models.fusion import FusionOutput, JointFusionModel
from miles.models.fusions.ensemble import RULES, unimodal_ensemble
from miles.models.losses import FUSED
from miles.strategies.base import Strategy
from miles.strategies.registry import register_strategy
from miles.validation import check_choice

__all__ = ["UME"]


@register_strategy("ume")
class UME(Strategy):
    """Train every modality's encoder and head alone, predict with their ensemble.

    The loss is ``sum_m L_m``, each unimodal head's loss on its own encoder: the encoders share no
    parameter and the fused head is not trained, so one run trains the ``M`` unimodal models
    independently (for Adam and SGD the updates of one modality's parameters do not depend on
    the others'). The fused prediction, used for validation, model selection and test, is the
    ensemble of the unimodal heads (:class:`~miles.models.fusions.ensemble.UnimodalEnsembleFusion`
    replaces the fusion before the optimizer exists); the fusion's own linear head is never used.
    The unimodal columns of our tables are the ensemble members themselves.

    Args:
        rule: how the members combine: ``"logits"`` (default: the mean of their logits) or
            ``"probs"`` (the mean of their softmax probabilities).

    What could not be checked against the authors (only the abstract could be read; no authors'
    code exists publicly and BalanceBenchmark has no UME):

    - the combination rule (logit mean vs. probability mean, weights per modality): both are
      offered, neither is verified;
    - the paper trains each unimodal model in its own run and ensembles their best checkpoints;
      here they train in one run and one epoch is chosen for all of them, by the ensemble's
      validation metric;
    - the paper's guiding strategy, which picks UME or UMT per dataset from the behaviour of
      unimodal and paired features, is not implemented: both are offered (``ume``, ``umt``).

    No neutral setting (no parameter turns UME into another method).
    """

    name = "ume"
    unused_parameters = True  # the fusion's own head is never used (matters under DDP)
    uses_aux_losses = True

    def __init__(self, rule: str = "logits") -> None:
        self.rule = check_choice("rule", rule, RULES)

    def configure_model(self, model: JointFusionModel) -> None:
        model.detach_unimodal_heads = False  # each head trains its own encoder
        model.fusion = unimodal_ensemble(model.fusion, model.unimodal_logits, rule=self.rule)

    def loss(
        self, losses: Mapping[str, Tensor], output: FusionOutput, batch: Mapping[str, Any]
    ) -> Tensor:
        """``sum_m L_m``: every unimodal loss, not the fused (ensemble) one."""
        heads = [value for name, value in losses.items() if name != FUSED]
        total = heads[0]
        for value in heads[1:]:
            total = total + value
        return total

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "rule": self.rule}
