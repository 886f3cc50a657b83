"""The strategy interface: how a balancing method plugs into the trainer.

A strategy is an object with a few optional hooks that the trainer calls at fixed points of every
epoch (see ``miles.training.trainer``). Each hook has a do-nothing default, so a method
overrides only what it changes. The base class itself is joint training with auxiliary losses
(``joint+aux``): ``L = L_fused + sum_m w_m L_m``, all weights 1.

Order of calls::

    configure_model(model)                      once, before the optimizer exists
    param_groups(model) -> groups               once: groups tagged by "modality"
    holdout_fraction                            read once: >0 splits a held-out slice off train
    on_fit_start(ctx)                           once: build schedulers etc. on ctx.optimizer
    load_state_dict(state)                      when resuming
    per epoch:
        on_epoch_start(ctx, epoch)   (look param groups up in ctx.optimizer each time: resuming
                                      replaces the group dicts, so cached ones go stale)
        per batch: loss(losses, output, batch) -> backward -> after_backward(ctx, output, batch)
                   -> optimizer.step()
        on_epoch_end(ctx, epoch, val, holdout) -> dict recorded in the history
        selection_score(val) -> float           the best epoch maximises this (default: fused)
        should_stop() -> bool
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from miles.models.fusion import FusionOutput, JointFusionModel
from miles.models.losses import FUSED
from miles.models.param_groups import modality_param_groups


@dataclass
class EvalResult:
    """One evaluation pass: metric per head, mean loss per head, optional cached latents."""

    fused: float
    unimodal: dict[str, float]
    loss: float  #: mean loss of the fused head
    latents: dict[str, Tensor] | None = None
    target: Tensor | None = None
    unimodal_loss: dict[str, float] = field(default_factory=dict)  #: mean loss of each head


@dataclass
class ComparisonSetup:
    """What ``miles compare`` tells a method about the comparison it runs in.

    ``unimodal_lrs()`` runs (or reads from cache) the per-modality learning-rate sweep, only when a
    method asks for it.
    """

    modalities: tuple[str, ...]
    base_lr: float
    unimodal_lrs: Callable[[], dict[str, float]]


@dataclass
class StrategyContext:
    """What hooks may use: the model, its optimizer, and a way to evaluate any loader."""

    model: JointFusionModel
    optimizer: torch.optim.Optimizer
    device: torch.device
    epochs: int
    multilabel: bool
    metric: str
    evaluate: Callable[[Any], EvalResult]
    holdout_loader: Any | None = None
    #: eval-mode loader over a fixed slice of the training part, as large as the holdout (present
    #: when ``holdout_fraction > 0``): train and held-out losses measured the same way
    train_probe_loader: Any | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def check_aux_weights(value: float | Mapping[str, float]) -> float | dict[str, float]:
    """Validate ``w_m`` of ``L = L_fused + sum_m w_m L_m``: one number, or one per modality."""

    def one(name: str, w: Any) -> float:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"aux weight {name} must be a finite number >= 0, got {w!r}")
        return float(w)

    if isinstance(value, Mapping):
        return {str(k): one(repr(k), v) for k, v in value.items()}
    return one("", value)


class Strategy:
    """Base strategy = joint training with the auxiliary unimodal losses (``joint+aux``)."""

    name: ClassVar[str] = "joint+aux"
    uses_aux_losses: ClassVar[bool] = True
    #: fraction of the training set the trainer holds out for this strategy (e.g. G-Blend)
    holdout_fraction: float = 0.0
    #: keep the validation latents in ``EvalResult`` (ablation estimators need them)
    needs_latents: bool = False
    #: ``w_m`` of the auxiliary losses: one number for all, or ``{modality: weight}`` (missing: 1)
    aux_weights: float | dict[str, float] = 1.0
    #: results do not depend on the fusion (unimodal references): ``miles compare`` runs it once
    fusion_independent: ClassVar[bool] = False
    #: put each unimodal head in its modality's param group (else in the shared group)
    head_follows_encoder: bool = True

    def configure_model(self, model: JointFusionModel) -> None:
        """Adjust the model before training (e.g. detach the unimodal heads)."""
        model.detach_unimodal_heads = False

    def param_groups(self, model: JointFusionModel) -> list[dict[str, Any]]:
        """Optimizer groups; default: one per modality (encoder + head) and one shared."""
        return modality_param_groups(model, head_follows_encoder=self.head_follows_encoder)

    def aux_weight(self, modality: str) -> float:
        """``w_m`` for one modality's auxiliary loss."""
        if isinstance(self.aux_weights, Mapping):
            return self.aux_weights.get(modality, 1.0)
        return self.aux_weights

    def on_fit_start(self, ctx: StrategyContext) -> None:
        """Called once the optimizer exists (build schedulers on ``ctx.optimizer`` here)."""

    def on_epoch_start(self, ctx: StrategyContext, epoch: int) -> None:
        """Called before each training epoch (``epoch`` counts from 1)."""

    def loss(
        self, losses: Mapping[str, Tensor], output: FusionOutput, batch: Mapping[str, Any]
    ) -> Tensor:
        """Combine per-head losses (``losses["fused"]`` and one per modality) into one scalar."""
        total = losses[FUSED]
        for name, value in losses.items():
            if name != FUSED:
                weight = self.aux_weight(name)
                total = total + (value if weight == 1.0 else weight * value)
        return total

    def after_backward(
        self, ctx: StrategyContext, output: FusionOutput, batch: Mapping[str, Any]
    ) -> None:
        """Gradients exist and the optimizer has not stepped: gradient modulation goes here."""

    def on_epoch_end(
        self, ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None
    ) -> dict[str, Any]:
        """Take end-of-epoch decisions; return a JSON-able record for the history."""
        return {}

    def selection_score(self, val: EvalResult) -> float:
        """What the best epoch maximises on validation: the fused metric, unless a method (e.g.
        a unimodal reference) is judged by one head."""
        return val.fused

    def should_stop(self) -> bool:
        """True ends training after the current epoch."""
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")

    @classmethod
    def comparison_runs(cls, setup: ComparisonSetup) -> list[tuple[str, dict[str, Any]]]:
        """``(label, constructor params)`` of each run ``miles compare`` makes of this method.

        One run with default parameters unless a method needs more (one per modality for the
        unimodal references) or extra inputs (the swept unimodal learning rates for MSLR).
        """
        return [("", {})]

    def describe(self) -> dict[str, Any]:
        """Name and hyper-parameters, for results tables and reports."""
        info: dict[str, Any] = {"name": self.name, "uses_aux_losses": self.uses_aux_losses}
        if self.aux_weights != 1.0:
            info["aux_weights"] = self.aux_weights
        if not self.head_follows_encoder:
            info["head_follows_encoder"] = False
        return info
