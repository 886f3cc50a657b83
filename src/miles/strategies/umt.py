"""UMT: Uni-Modal Teachers distilled into the multimodal model (Du et al., ICML 2023).

Reference: C. Du et al., "On Uni-Modal Feature Learning in Supervised Multi-Modal Learning", ICML
2023 (arXiv 2305.01233). No code by the authors was found; the mechanism and its default follow
BalanceBenchmark (github.com/GeWu-Lab/BalanceBenchmark, ``balancemm/trainer/UMT_trainer.py`` and
``configs/trainer_config.yaml``, read at commit 4c1482f), see the class docstring.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from miles.models.fusion import FusionOutput, JointFusionModel
from miles.strategies.base import EvalResult, StrategyContext
from miles.strategies.joint import Joint
from miles.strategies.registry import register_strategy
from miles.training.copies import train_copy
from miles.validation import check_non_negative, check_positive_int

__all__ = ["UMT", "train_unimodal_teachers"]


def train_unimodal_teachers(
    ctx: StrategyContext, *, epochs: int, seed: int
) -> tuple[JointFusionModel, dict[str, int], dict[str, float]]:
    """Train one unimodal model per modality and keep each at its best validation epoch.

    A copy of the run's model (taken before any training, so every teacher starts from the same
    initial weights as the student) trains each encoder with its own head on ``L_m`` alone:
    the encoders share nothing and the fused head is not in the loss, so this is ``M``
    independent unimodal trainings in one loop (:func:`~miles.training.copies.train_copy`, its
    own shuffling and forked random streams). After every epoch each head is scored on the
    validation split; each modality keeps the encoder and head of its own best epoch.

    Returns ``(teacher model, best epoch per modality, best validation metric per modality)``.
    """
    if ctx.data is None:
        raise ValueError("training unimodal teachers needs ctx.data (the trainer provides it)")
    data = ctx.data
    net = copy.deepcopy(ctx.model)
    net.detach_unimodal_heads = False
    names = net.modalities
    best_state: dict[str, dict[str, Tensor]] = {}
    best_epoch: dict[str, int] = {}
    best_score: dict[str, float] = {}

    def keep_best(epoch: int, model: JointFusionModel) -> None:
        scores = ctx.evaluate(data.loader("val"), model=model).unimodal
        for m in names:
            if m not in best_score or scores[m] > best_score[m]:
                best_score[m], best_epoch[m] = scores[m], epoch
                best_state[m] = _clone_state(model, m)

    def unimodal_losses(
        losses: Mapping[str, Tensor], output: FusionOutput, batch: Mapping[str, Any]
    ) -> Tensor:
        total = losses[names[0]]
        for m in names[1:]:
            total = total + losses[m]
        return total

    params = [p for m in names for p in (*net.encoders[m].parameters(), *net.heads[m].parameters())]
    train_copy(
        ctx,
        unimodal_losses,
        epochs=epochs,
        seed=seed,
        model=net,
        param_groups=[{"params": params}],
        on_epoch_end=keep_best,
    )
    teacher = copy.deepcopy(ctx.model)
    for m in names:
        teacher.load_state_dict(best_state[m], strict=False)
    return _frozen(teacher), best_epoch, best_score


def _clone_state(model: JointFusionModel, modality: str) -> dict[str, Tensor]:
    """The encoder and head weights of one modality, as keys of the model's state dict."""
    prefixes = (f"encoders.{modality}.", f"heads.{modality}.")
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(prefixes)}


def _frozen(model: JointFusionModel) -> JointFusionModel:
    model.eval()
    model.requires_grad_(False)
    return model


@register_strategy("umt")
class UMT(Joint):
    """Distil unimodal teachers' features into the multimodal model.

    Two stages, as in BalanceBenchmark's ``UMTTrainer``:

    1. Teachers (``on_fit_start``): one unimodal model per modality (its encoder and its
       head, on ``L_m``) is trained for ``teacher_epochs`` and kept at its best validation epoch
       (:func:`train_unimodal_teachers`). They start from the student's initial weights, use the
       run's optimizer settings and base learning rate, and are then frozen in eval mode.
    2. Student (the run): ``L = L_fused + s * sum_m MSE(z_m, t_m)``, where ``z_m`` is the
       student's latent of modality ``m`` (its encoder's output, what the fusion reads),
       ``t_m`` the teacher's for the same batch (no gradient), and the MSE a mean over the batch
       and the latent dimensions. The unimodal heads train on detached latents as probes, as in
       :class:`~miles.strategies.joint.Joint` (``uses_aux_losses = False``): no unimodal loss
       reaches the student's encoders, as in BalanceBenchmark.

    Readouts: the fused head predicts (validation, selection, test); the unimodal columns are the
    probe heads; the teachers are not used at test time.

    Args:
        scaling: ``s``, the distillation weight. Default 10, BalanceBenchmark's
            (``trainer_config.yaml``, ``UMT: scaling: 10``); the paper's value could not be read.
            ``scaling = 0`` is exactly ``joint`` (the teachers are still trained, on their own
            random streams, and change nothing).
        teacher_epochs: epochs of teacher training (default: the run's epoch budget, as
            BalanceBenchmark trains its unimodal teachers with the global epoch setting). The
            teachers are trained once, when the fit starts; a resumed run reuses them, even if
            it was given a longer budget.

    Departures, from BalanceBenchmark and from the paper:

    - BalanceBenchmark loads teachers trained in separate ``unimodalTrainer`` runs (best
      validation checkpoint) and never puts them in eval mode, so their BatchNorm layers use and
      update batch statistics during distillation; ours are frozen in eval mode (BatchNorm uses
      the running statistics and stays unchanged), which is what a teacher is meant to be.
    - Our teachers are trained inside the run, all modalities in one loop (independent, since
      nothing is shared), and saved in the strategy's state so a resumed run reuses them.
    - Paper (abstract only, no authors' code): which layer is distilled, the weight and the
      guiding strategy (UMT or UME per dataset) could not be verified; the distilled layer
      (encoder output) and ``s`` are BalanceBenchmark's. UME is the ``ume`` strategy.
    """

    name = "umt"
    uses_aux_losses = False

    def __init__(self, scaling: float = 10.0, teacher_epochs: int | None = None) -> None:
        self.scaling = check_non_negative("scaling", scaling)
        self.teacher_epochs = (
            None if teacher_epochs is None else check_positive_int("teacher_epochs", teacher_epochs)
        )
        self.teacher: JointFusionModel | None = None
        self._teacher_state: dict[str, Tensor] | None = None
        self._teacher_info: dict[str, Any] = {}

    def on_fit_start(self, ctx: StrategyContext) -> None:
        if self._teacher_state is None:  # a fresh fit: train them (ctx.model is still untrained)
            if ctx.data is None:
                raise ValueError("UMT needs ctx.data (the trainer provides it)")
            epochs = self.teacher_epochs if self.teacher_epochs is not None else ctx.epochs
            teacher, best_epoch, best_val = train_unimodal_teachers(
                ctx, epochs=epochs, seed=ctx.data.seed
            )
            self._teacher_state = {  # the encoders are all a teacher needs
                k: v.detach().cpu().clone()
                for k, v in teacher.state_dict().items()
                if k.startswith("encoders.")
            }
            self._teacher_info = {"epochs": epochs, "best_epoch": best_epoch, "best_val": best_val}
        else:  # resuming: the teachers saved in the state
            teacher = copy.deepcopy(ctx.model)
            teacher.load_state_dict(self._teacher_state, strict=False)
        self.teacher = _frozen(teacher.to(ctx.device))

    def distillation(self, output: FusionOutput, batch: Mapping[str, Any]) -> Tensor:
        """``sum_m MSE(z_m, t_m)`` for this batch (teachers in eval mode, no gradient)."""
        if self.teacher is None:
            raise RuntimeError("UMT.on_fit_start was not called (no teachers)")
        with torch.no_grad():
            targets = self.teacher.encode(batch["inputs"], batch.get("lengths") or None)
        terms = [F.mse_loss(output.latents[m], targets[m]) for m in self.teacher.modalities]
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return total

    def loss(
        self, losses: Mapping[str, Tensor], output: FusionOutput, batch: Mapping[str, Any]
    ) -> Tensor:
        base = super().loss(losses, output, batch)  # fused loss + detached probe losses
        if self.scaling == 0:
            return base
        return base + self.scaling * self.distillation(output, batch)

    def on_epoch_end(
        self, ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None
    ) -> dict[str, Any]:
        return {"teachers": self._teacher_info} if epoch == 1 else {}

    def state_dict(self) -> dict[str, Any]:
        if self._teacher_state is None:
            return {}
        return {"teacher": dict(self._teacher_state), "teacher_info": self._teacher_info}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self._teacher_state = dict(state["teacher"])
        self._teacher_info = dict(state["teacher_info"])

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        return {**info, "scaling": self.scaling, "teacher_epochs": self.teacher_epochs}
