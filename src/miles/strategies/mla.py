"""MLA: multimodal learning with alternating unimodal adaptation (Zhang et al., CVPR 2024).

Reference: X. Zhang, J. Yoon, M. Bansal, H. Yao, "Multimodal Representation Learning by
Alternating Unimodal Adaptation", CVPR 2024 (Sec. 3, Eq. 1-8, Tab. 3), and the authors' code
(``Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation``, commit ``ab6c184``:
``main.py``, ``utils/utils.py``). The appendix with the hyper-parameters was not available to us.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from miles.models.fusion import JointFusionModel
from miles.models.fusions import UncertaintyFusion
from miles.models.losses import FUSED, task_loss
from miles.strategies.base import EvalResult, StepOutput, Strategy, StrategyContext
from miles.strategies.registry import register_strategy
from miles.strategies.requirements import (
    installed_fusion,
    require_modalities,
    require_single_label,
)
from miles.validation import check_bool


def rls_alpha(batch_index: int, batches: int) -> float:
    """The regulariser of the projection update: ``0.1 ** (1 + b / N)``, ``b`` the batch index in
    the epoch (from 0) and ``N`` the batches per epoch, 0.1 at each epoch's start decaying towards
    0.01 (the authors' ``GSPlugin.before_update``)."""
    return 0.1 ** (1.0 + batch_index / max(batches, 1))


def projection_update(
    projection: Tensor, mean_latent: Tensor, alpha: float, *, normalize: bool = False
) -> Tensor:
    """One recursive-least-squares step of the head's gradient projection (Eq. 3-4):
    ``P <- P - P h h^T P / (alpha + h^T P h)`` with ``h`` the batch-mean latent of the modality
    being trained, which removes (up to ``alpha``) the directions earlier modalities' latents used.
    ``normalize``: divide ``P`` by its Frobenius norm afterwards, as the authors' code does."""
    h = mean_latent.reshape(-1, 1).to(projection)
    k = projection @ h
    updated = projection - (k @ k.T) / (alpha + (h.T @ k))
    return updated / torch.linalg.matrix_norm(updated) if normalize else updated


@register_strategy("mla")
class MLA(Strategy):
    """Alternating unimodal adaptation (MLA; Zhang et al., CVPR 2024).

    The model is one encoder per modality and **one head ``g`` shared by every modality**: the
    strategy installs the ``uncertainty`` fusion (:class:`~miles.models.fusions.UncertaintyFusion`),
    whose head is ``g``; its unimodal outputs ``g(z_m)`` are the heads column, and its fused output
    is the test-time prediction. Each batch takes one step per modality, in order (the authors'
    code: one forward of every encoder, then per modality a backward, a projection and an
    optimizer step):

    1. ``L_m = CE(g(z_m), y)``; only encoder ``m`` and ``g`` receive gradients (Eq. 1-2);
    2. head gradient modification (HGM, Eq. 3-5): before updating ``g``, its weight gradient is
       projected, ``grad W <- grad W P^T``, with ``P`` updated by :func:`projection_update` from
       the batch-mean latent of the current modality, so learning one modality forgets less of
       the others (skipped at the very first step, as in the code);
    3. the optimizer steps.

    At test time the prediction is ``sum_m lambda_m g(z_m)``, ``lambda`` a softmax over the
    modalities of minus the entropy of each ``softmax(g(z_m))`` (Eq. 6-8; ``dynamic=False``: equal
    weights).

    Args:
        dynamic: the uncertainty-based fusion (default, the README's ``--dynamic`` run) or equal
            weights (the code's fixed ``av_alpha`` weighting, here ``1/M``).
        hgm: apply the head gradient modification (default, the paper). The released code never
            applies it: ``before_update`` looks for a parameter named ``"module.weight"`` in a bare
            ``nn.Linear``, whose parameters are ``"weight"`` and ``"bias"``.
        normalize_projection: divide ``P`` by its Frobenius norm after every update, as the
            authors' (inactive) code does; default ``False``, the paper's Eq. 3-4.

    Where this departs from the authors' code:

    - HGM is on (paper); in the released code it is dead, see ``hgm``.
    - The fused prediction weighs each example by its own modalities' entropies (Eq. 7); the code
      normalises the weights over the whole evaluation batch, so its predictions depend on the
      batch.
    - Gradients are cleared to ``None`` between the sub-steps (``ctx.zero_grad``), so the idle
      encoder is not moved by momentum or weight decay; the authors' ``zero_grad`` under their
      pinned ``torch==1.8.1`` sets them to zero, which does move it. The paper updates only the
      active encoder and the head.
    - ``P`` is ``d x d`` for our latent size ``d`` (the code hard-codes 512); the shared head is
      linear, as in the paper and code.
    - Optimizer: the authors use SGD (momentum 0.9, weight decay 1e-4, lr 1e-3, StepLR(70, 0.1),
      batch 64); any of ours works, the schedule is not reproduced.

    BalanceBenchmark's MLA (``MLA_trainer.py``) applies the projection (its name test matches)
    but adds the projected gradient to the raw one (``grad += grad P^T``) instead of replacing it,
    runs one forward per modality, and as released reads ``self.alpha``, which it never sets.

    No neutral setting reduces MLA to a method of ours (the paper's ablations ``hgm=False`` and
    ``dynamic=False`` remain MLA). Not supported: multilabel tasks (``ValueError`` at
    ``on_fit_start``), a single modality, unequal latent sizes (one head reads every latent).
    """

    name = "mla"
    single_process = (
        "it runs one backward pass per modality through one forward pass, which "
        "DistributedDataParallel does not allow"
    )
    uses_aux_losses = True

    def __init__(
        self, dynamic: bool = True, hgm: bool = True, normalize_projection: bool = False
    ) -> None:
        self.dynamic = check_bool("dynamic", dynamic)
        self.hgm = check_bool("hgm", hgm)
        self.normalize_projection = check_bool("normalize_projection", normalize_projection)
        #: the head-gradient projection ``P`` (built at the first fit)
        self.projection: Tensor | None = None
        #: updates of the shared head so far (the code's ``exp_count``)
        self.sub_steps = 0
        self._batch_index = 0
        self._batches = 1

    def configure_model(self, model: JointFusionModel) -> None:
        require_modalities(self.name, model)
        model.set_fusion("uncertainty", dynamic=self.dynamic)

    def on_fit_start(self, ctx: StrategyContext) -> None:
        require_single_label(self.name, ctx.multilabel)
        head = self._head(ctx.model)
        if self.projection is None:
            self.projection = torch.eye(head.in_features, dtype=head.weight.dtype)
        self.projection = self.projection.to(head.weight)

    def on_epoch_start(self, ctx: StrategyContext, epoch: int) -> None:
        self._batch_index = 0
        self._batches = len(ctx.train_loader) if ctx.train_loader is not None else 1

    @staticmethod
    def _head(model: JointFusionModel) -> torch.nn.Linear:
        """The shared head ``g``: the head of the installed ``uncertainty`` fusion."""
        return installed_fusion("MLA", model, UncertaintyFusion).head

    def training_step(self, ctx: StrategyContext, batch: Mapping[str, Any]) -> StepOutput:
        model, target = ctx.model, batch["target"]
        head = self._head(model)
        output = ctx.forward(batch)
        alpha = rls_alpha(self._batch_index, self._batches)
        losses: dict[str, Tensor] = {
            FUSED: task_loss(output.fused.detach(), target, multilabel=ctx.multilabel)
        }
        for m in model.modalities:
            ctx.zero_grad()
            loss = task_loss(head(output.latents[m]), target, multilabel=ctx.multilabel)
            ctx.backward(loss)
            if self.hgm and self.sub_steps > 0:
                self.project(head, output.latents[m].detach().mean(dim=0), alpha)
            ctx.optimizer_step()
            self.sub_steps += 1
            losses[m] = loss.detach()
        ctx.zero_grad()
        self._batch_index += 1
        return StepOutput(
            loss=torch.stack([losses[m] for m in model.modalities]).sum(),
            losses=losses,
            batch_size=int(target.shape[0]),
        )

    @torch.no_grad()
    def project(self, head: torch.nn.Linear, mean_latent: Tensor, alpha: float) -> None:
        """Update ``P`` with this modality's mean latent, then ``grad W <- grad W P^T``."""
        assert self.projection is not None
        self.projection = projection_update(
            self.projection, mean_latent, alpha, normalize=self.normalize_projection
        )
        if head.weight.grad is not None:
            head.weight.grad = head.weight.grad @ self.projection.T

    def on_epoch_end(
        self, ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None
    ) -> dict[str, Any]:
        record: dict[str, Any] = {"sub_steps": self.sub_steps}
        if self.projection is not None:
            record["projection_norm"] = float(torch.linalg.matrix_norm(self.projection))
        return record

    def state_dict(self) -> dict[str, Any]:
        projection = None if self.projection is None else self.projection.detach().cpu().clone()
        return {"projection": projection, "sub_steps": self.sub_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        projection = state["projection"]
        self.projection = None if projection is None else projection.clone()
        self.sub_steps = int(state["sub_steps"])

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "fusion": "uncertainty",
            "dynamic": self.dynamic,
            "hgm": self.hgm,
            "normalize_projection": self.normalize_projection,
        }
