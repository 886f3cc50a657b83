"""CML: calibrating multimodal learning (Ma et al., ICML 2023), its confidence-ranking regulariser
on a late-fusion model.

Reference: H. Ma et al., "Calibrating Multimodal Learning", ICML 2023, and the authors' code
(github.com/QingyangZhang/CML, ``miwae/train.py``: ``get_multi_mask`` and the stage-2 loop; read at
commit 85075b5). The authors' frameworks are MIWAE and CPM (imputation models); the late-fusion
form follows BalanceBenchmark's adaptation, see the class docstring.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from miles.models.fusion import FusionOutput, JointFusionModel
from miles.models.losses import FUSED, task_loss
from miles.strategies.base import EvalResult, StrategyContext
from miles.strategies.joint import Joint
from miles.strategies.registry import register_strategy
from miles.strategies.streams import OwnStream
from miles.validation import check_non_negative

__all__ = ["CML", "ranking_penalty"]

#: added to the run's seed for CML's own random stream (the removal orders)
STREAM_OFFSET = 15485863


def ranking_penalty(
    confidence: Sequence[Tensor], prediction: Sequence[Tensor], target: Tensor, epsilon: float
) -> Tensor:
    """The authors' rank loss over removal levels ``k = 0 .. M-1`` (level ``k`` has ``k``
    modalities removed); ``confidence[k]`` is the max softmax probability, ``prediction[k]`` the
    predicted class. For each ``k -> k + 1``, summed over samples:

    - "trick 1": ``relu((c_{k+1} - c_k) * 1[pred_k right] - eps)``: removing a modality must not
      raise the confidence of a right prediction;
    - "trick 2": ``relu((c_{k+1} - c_k.detach()) * 1[pred_k and pred_{k+1} wrong] - eps)``: nor that
      of a prediction wrong at both levels (only the reduced input is pushed down).
    """
    total = confidence[0].new_zeros(())
    for k in range(len(confidence) - 1):
        right = (prediction[k] == target).to(confidence[k].dtype)
        rise = confidence[k + 1] - confidence[k]
        total = total + torch.relu(rise * right - epsilon).sum()
        both_wrong = ((prediction[k + 1] != target) & (prediction[k] != target)).to(rise.dtype)
        rise_alone = confidence[k + 1] - confidence[k].detach()
        total = total + torch.relu(rise_alone * both_wrong - epsilon).sum()
    return total


@register_strategy("cml")
class CML(Joint):
    """Train on the full input and on inputs with modalities removed, and penalise any rise of
    confidence when a modality is removed.

    Per batch, each sample gets a random order of its modalities (the authors'
    ``get_multi_mask``, drawn per sample and batch); level ``k`` removes the first ``k`` of them
    (``k = 0 .. M-1``: the full input down to one modality). A removed modality's latent is zeroed
    before the fused head, which for an additive linear fusion is BalanceBenchmark's "subtract
    its share and add back ``b / M``". The loss is::

        mean_k CE(fused_k, y) + weight * rank

    with ``rank`` the authors' ranking penalty (:func:`ranking_penalty`, both of their "tricks",
    summed over samples, margin ``epsilon``); the unimodal heads train on detached latents as
    probes (``uses_aux_losses = False``). Readouts: the fused head on the full input; the
    unimodal columns are the probe heads.

    Args:
        weight: the penalty's weight, the authors' ``beta / 100``. Default 0.1: their README's
            command with the regulariser (``--beta 10``; their argparse default 0 disables it).
            BalanceBenchmark's ``lam`` is also 0.1.
        epsilon: the margin (the authors' ``--epsilon``, default 0).

    The orders draw from CML's own random stream (seeded from the run's seed, saved with the
    strategy's state).

    Departures: the authors calibrate imputation models (MIWAE, CPM) whose removed views are
    mean-imputed in input space; a late-fusion version is ours (and BalanceBenchmark's): the
    modality's latent is zeroed. BalanceBenchmark instead draws one order per epoch, averages the
    full and one reduced level's losses, and applies a single hinge to the batch sum of confidence
    rises, without the correctness gates (it computes the CPM-style gate but does not use it).
    The authors select the epoch by the sum of accuracies over removal levels; we select by the
    fused accuracy on the full input, like every method here. The paper body could not be read.

    Not supported: multilabel tasks (confidence is the top class probability).
    """

    name = "cml"
    uses_aux_losses = False

    def __init__(self, weight: float = 0.1, epsilon: float = 0.0) -> None:
        self.weight = check_non_negative("weight", weight)
        self.epsilon = check_non_negative("epsilon", epsilon)
        self._model: JointFusionModel | None = None
        self._stream = OwnStream(STREAM_OFFSET)
        self._rank_sum = 0.0
        self._batches = 0

    def on_fit_start(self, ctx: StrategyContext) -> None:
        if ctx.multilabel:
            raise ValueError("cml does not support multilabel tasks (confidence needs one class)")
        if ctx.data is None:
            raise ValueError("cml needs ctx.data (the trainer provides it)")
        self._model = ctx.model
        self._stream.start(ctx.data.seed)

    def removal_masks(self, batch_size: int, modalities: int) -> list[Tensor]:
        """Keep masks ``(batch, M)`` of levels ``0 .. M-1`` from a random order per sample."""
        draws = torch.rand(batch_size, modalities, generator=self._stream.generator)
        order = torch.argsort(draws, dim=1)
        keep = torch.ones(batch_size, modalities, dtype=torch.bool)
        masks = [keep.clone()]
        for k in range(modalities - 1):
            keep[torch.arange(batch_size), order[:, k]] = False
            masks.append(keep.clone())
        return masks

    def loss(
        self, losses: Mapping[str, Tensor], output: FusionOutput, batch: Mapping[str, Any]
    ) -> Tensor:
        model = self._model
        if model is None:
            raise RuntimeError("CML.on_fit_start was not called (no model)")
        target = batch["target"]
        names = model.modalities
        confidences, predictions, ce = [], [], []
        for level, keep in enumerate(self.removal_masks(int(target.shape[0]), len(names))):
            if level == 0:
                logits = output.fused
            else:
                keep = keep.to(target.device)
                logits = model.fused_logits(
                    {
                        m: output.latents[m] * keep[:, j].unsqueeze(1).to(output.latents[m].dtype)
                        for j, m in enumerate(names)
                    }
                )
            probability = torch.softmax(logits, dim=1)
            confidence, prediction = probability.max(dim=1)
            confidences.append(confidence)
            predictions.append(prediction)
            ce.append(losses[FUSED] if level == 0 else task_loss(logits, target))
        rank = ranking_penalty(confidences, predictions, target, self.epsilon)
        self._rank_sum += float(rank.detach())
        self._batches += 1
        levels = dict(losses)
        levels[FUSED] = torch.stack(ce).mean()
        return super().loss(levels, output, batch) + self.weight * rank

    def on_epoch_start(self, ctx: StrategyContext, epoch: int) -> None:
        self._rank_sum, self._batches = 0.0, 0

    def on_epoch_end(
        self, ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None
    ) -> dict[str, Any]:
        return {"rank_mean": self._rank_sum / max(self._batches, 1)}

    def state_dict(self) -> dict[str, Any]:
        return self._stream.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._stream.load_state_dict(state)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "weight": self.weight, "epsilon": self.epsilon}
