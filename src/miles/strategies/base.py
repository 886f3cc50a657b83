"""The strategy interface: how a balancing method plugs into the trainer.

A strategy is a set of hooks, in the style of Lightning's ``Callback``: the trainer calls them at
fixed points (see :mod:`miles.training.trainer`), every event hook of :class:`Strategy` does
nothing, and every value hook gives the plain multimodal objective's answer (the fused loss only,
the fused metric for model selection, no early stop, no state). A method overrides only what it
changes. The reference methods live in :mod:`miles.strategies.joint`: ``Joint`` (fused loss, the
unimodal heads trained as detached probes) and ``JointAux`` (``L = L_fused + sum_m w_m L_m``),
which most balancing methods extend.

Order of calls in ``Trainer.fit``::

    configure_model(model)                      once, before the optimizer exists
    param_groups(model) -> groups               once: optimizer groups tagged by "modality"
    holdout_fraction                            read once: > 0 splits a held-out slice off train
    load_state_dict(state)                      when resuming, after the model and optimizer
                                                states are restored (the RNG after on_fit_start)
    on_fit_start(ctx)                           once: build schedulers etc. on ctx.optimizer
                                                (already restored when resuming)
    per epoch:
        on_epoch_start(ctx, epoch)   (look param groups up in ctx.optimizer each time, rather
                                      than caching the group dicts)
        per batch: training_step(ctx, batch) -> StepOutput; the default is
                   ctx.forward -> ctx.head_losses -> loss(losses, output, batch)
                   -> ctx.backward -> on_after_backward(ctx, output, batch) -> ctx.optimizer_step
                   then step_lr_schedule(ctx)       (when the trainer has a base schedule)
        on_epoch_end(ctx, epoch, val, holdout) -> dict recorded in the history
        selection_score(val) -> float           the best epoch maximises this (default: fused)
        should_stop() -> bool
        state_dict() -> dict                    saved with the epoch's checkpoint
    on_fit_end(ctx)                             once, after the last epoch, before the test set
                                                is scored
    describe() -> dict                          name and settings, for results and reports

``training_step`` is the one override point for methods that change how a step is taken
(alternating modalities, several backward passes, extra forward passes with a modality removed):
they compose it from the context's primitives (``ctx.forward``, ``ctx.head_losses``,
``ctx.zero_grad``, ``ctx.backward``, ``ctx.optimizer_step``), so device placement, mixed
precision and gradient clipping stay in one place whatever the method does. Methods that train
copies of the model (per-head copies, teachers) build their optimizers with
``ctx.make_optimizer``, name them in ``ctx.backward(loss, optimizer)`` and
``ctx.optimizer_step(optimizer)`` (the loss scaler keeps one scale per optimizer), and read
``ctx.train_loader``; :func:`miles.training.copies.train_copy` does all of it.

Class attributes state what a method needs from the trainer: ``uses_aux_losses`` (its loss
includes the unimodal losses, reported in tables), ``holdout_fraction``, ``needs_latents``,
``head_follows_encoder``, and ``unused_parameters`` and ``single_process`` (under DDP).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from miles.models.fusion import FusionOutput, JointFusionModel
from miles.models.losses import FUSED, head_losses
from miles.models.param_groups import modality_param_groups
from miles.training.precision import Precision

if TYPE_CHECKING:
    from miles.strategies.data import StrategyData

#: hooks renamed for consistent ``on_*`` names: a subclass still defining the old name would
#: silently never be called, so defining it is an error
RENAMED_HOOKS = {"after_backward": "on_after_backward"}


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
class StepOutput:
    """What one training step reports: the optimised loss and each head's loss (detached), and
    how many samples the batch held (the trainer averages per sample)."""

    loss: Tensor
    losses: dict[str, Tensor]
    batch_size: int

    @classmethod
    def of(cls, loss: Tensor, losses: Mapping[str, Tensor], batch: Mapping[str, Any]) -> StepOutput:
        """The step's loss and per-head losses, detached, for ``batch`` (a method's own
        ``training_step`` ends with it)."""
        return cls(
            loss=loss.detach(),
            losses={name: value.detach() for name, value in losses.items()},
            batch_size=int(batch["target"].shape[0]),
        )


@dataclass
class StrategyContext:
    """What hooks may use: the model, its optimizer, the loaders, and the step primitives.

    The primitives (:meth:`forward`, :meth:`head_losses`, :meth:`zero_grad`, :meth:`backward`,
    :meth:`optimizer_step`) are how every training step runs, the default one and a method's
    own: they are where the trainer's device, precision and clipping settings apply.
    """

    model: JointFusionModel
    optimizer: torch.optim.Optimizer
    device: torch.device
    epochs: int
    multilabel: bool
    metric: str
    #: ``evaluate(loader, keep_latents=False, model=None)``: every head's metric and loss over
    #: ``loader``, of the run's model or of ``model``
    evaluate: Callable[..., EvalResult]
    holdout_loader: Any | None = None
    #: eval-mode loader over a fixed slice of the training part, as large as the holdout (present
    #: when ``holdout_fraction > 0``): train and held-out losses measured the same way
    train_probe_loader: Any | None = None
    #: the shuffled loader this fit trains on (the training part, without any holdout)
    train_loader: Any | None = None
    #: builds an optimizer with the run's settings (kind, momentum, weight decay) over the given
    #: param groups, e.g. for copies of the model a method trains on the side
    make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None = None
    #: the run's seed, from which methods derive the seeds of what they draw on the side (e.g.
    #: the shuffling of copies), so two seeds of one study differ there too
    seed: int = 0
    #: the run's splits for strategies: ordered passes with row positions, collected latents, and
    #: the training plan that replaces the next epochs' rows (:mod:`miles.strategies.data`)
    data: StrategyData | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    #: what :meth:`forward` calls for the run's model: its DistributedDataParallel and/or
    #: ``torch.compile`` wrapper when the trainer uses one (``None``: :attr:`model` itself)
    forward_module: Any | None = None
    #: autocast, loss scaling and gradient clipping of the step primitives
    precision: Precision = field(default_factory=Precision)
    #: the trainer's base learning-rate schedule (warm-up, cosine, step), stepped after every
    #: training batch through :meth:`Strategy.step_lr_schedule`; ``None``: constant rates
    lr_schedule: Any | None = None

    # -- step primitives -------------------------------------------------------------------------
    def forward(
        self, batch: Mapping[str, Any], model: JointFusionModel | None = None
    ) -> FusionOutput:
        """``model(inputs, lengths)`` on a batch already on :attr:`device`, under the run's
        autocast (default model: the run's, through its DDP / compiled wrapper when there is
        one). A training plan's batch with a ``"keep"`` mask has its masked modalities' latents
        zeroed before the fused head (:func:`miles.strategies.data.keep_modalities`). Under
        mixed precision the outputs come back in float32."""
        if model is None:
            net = self.model if self.forward_module is None else self.forward_module
        else:
            net = model
        with self.precision.autocast():
            output: FusionOutput = net(batch["inputs"], batch.get("lengths") or None)
            keep = batch.get("keep")
            if keep is not None:
                from miles.strategies.data import keep_modalities

                output = keep_modalities(self.model if model is None else model, output, keep)
        if self.precision.dtype is None:
            return output
        # Under autocast the outputs are half precision; methods read them again outside it (a
        # head on the latents, logit shares, prototypes) next to float32 weights, so they get
        # float32 copies that still carry the gradient to the autocast graph.
        return dataclasses.replace(
            output,
            fused=output.fused.float(),
            unimodal={m: z.float() for m, z in output.unimodal.items()},
            latents={m: z.float() for m, z in output.latents.items()},
        )

    def head_losses(self, output: FusionOutput, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Per-head losses (``"fused"`` and one per modality) with the run's loss function."""
        with self.precision.autocast():
            return head_losses(output, batch["target"], multilabel=self.multilabel)

    def zero_grad(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Clear the gradients of ``optimizer``'s parameters (default: the run's optimizer)."""
        (self.optimizer if optimizer is None else optimizer).zero_grad(set_to_none=True)

    def backward(self, loss: Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Back-propagate ``loss`` into the parameters of ``optimizer`` (default: the run's).

        With loss scaling (``"16-mixed"``) the loss is scaled and the gradients unscaled again
        right away, so hooks that read or modulate gradients see their true values.
        """
        self.precision.backward(loss, self.optimizer if optimizer is None else optimizer)

    def optimizer_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Apply the gradients: clip them (when the run clips), then one step of ``optimizer``
        (default: the run's), through the loss scaler when there is one (which skips a step
        whose gradients are not finite)."""
        self.precision.step(self.optimizer if optimizer is None else optimizer)


class Strategy:
    """Base strategy: no-op event hooks and the plain multimodal objective (fused loss only)."""

    name: ClassVar[str] = "strategy"
    #: the loss includes the unimodal losses (reported in comparison tables); a class default a
    #: method may set per instance when an option adds them (e.g. MSLR's ``aux_losses``)
    uses_aux_losses: bool = False
    #: fraction of the training set the trainer holds out for this strategy (e.g. G-Blend)
    holdout_fraction: float = 0.0
    #: keep the validation latents in ``EvalResult`` (ablation estimators need them)
    needs_latents: bool = False
    #: put each unimodal head in its modality's param group (else in the shared group)
    head_follows_encoder: bool = True
    #: the most modalities the method is defined for (``None``: any number); studies leave a
    #: method out of ``--methods all`` on a task with more, and refuse it when it is named
    max_modalities: ClassVar[int | None] = None
    #: the optimizer settings the method's authors train with, where a study may want them
    #: (``TrainerConfig`` fields, e.g. OGM's SGD; ``None``: no preference); studies apply them
    #: on request (``miles compare --method-optimizer ogm=authors``), never silently
    authors_optimizer: ClassVar[dict[str, Any] | None] = None
    #: some parameters may get no gradient in a step (one modality trained, an encoder frozen
    #: during the run): under DistributedDataParallel the trainer then looks for them
    #: (``find_unused_parameters=True``, which costs a graph traversal per step)
    unused_parameters: ClassVar[bool] = False
    #: why the method cannot train data-parallel (``None``: it can); the trainer refuses it
    #: under DistributedDataParallel before the first step, with this reason
    single_process: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for old, new in RENAMED_HOOKS.items():
            if old in vars(cls):
                raise TypeError(
                    f"{cls.__name__} defines {old}(), which the trainer no longer calls; "
                    f"rename it {new}()"
                )

    # -- configuration ---------------------------------------------------------------------------
    def configure_model(self, model: JointFusionModel) -> None:
        """Adjust the model before the optimizer exists (e.g. detach heads, freeze encoders)."""

    def param_groups(self, model: JointFusionModel) -> list[dict[str, Any]]:
        """Optimizer groups; default: one per modality (encoder + head) and one shared."""
        return modality_param_groups(model, head_follows_encoder=self.head_follows_encoder)

    # -- events ----------------------------------------------------------------------------------
    def on_fit_start(self, ctx: StrategyContext) -> None:
        """Called once the optimizer exists and, when resuming, every state is restored (build
        schedulers on ``ctx.optimizer`` here and apply what ``load_state_dict`` received)."""

    def on_epoch_start(self, ctx: StrategyContext, epoch: int) -> None:
        """Called before each training epoch (``epoch`` counts from 1)."""

    def on_after_backward(
        self, ctx: StrategyContext, output: FusionOutput, batch: Mapping[str, Any]
    ) -> None:
        """Gradients exist and the optimizer has not stepped: gradient modulation goes here."""

    def on_epoch_end(
        self, ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None
    ) -> dict[str, Any]:
        """Take end-of-epoch decisions; return a JSON-able record for the history."""
        return {}

    def on_fit_end(self, ctx: StrategyContext) -> None:
        """Called once after the last epoch (also when a strategy stopped early)."""

    # -- the training step -----------------------------------------------------------------------
    def training_step(self, ctx: StrategyContext, batch: Mapping[str, Any]) -> StepOutput:
        """One optimisation step on one batch (already on ``ctx.device``).

        The default is the usual step: forward, per-head losses, :meth:`loss`, backward,
        :meth:`on_after_backward`, optimizer step. Override it only for methods that change how a
        step is taken, and build it from the context's primitives.
        """
        output = ctx.forward(batch)
        losses = ctx.head_losses(output, batch)
        loss = self.loss(losses, output, batch)
        ctx.zero_grad()
        ctx.backward(loss)
        self.on_after_backward(ctx, output, batch)
        ctx.optimizer_step()
        return StepOutput.of(loss, losses, batch)

    def step_lr_schedule(self, ctx: StrategyContext) -> None:
        """Advance the trainer's base schedule (``ctx.lr_schedule``) after a training batch.

        The default steps it, and refuses to when the learning rates are not the ones it last
        wrote: a method that sets rates itself would have them silently overwritten. Such a
        method composes the schedule with its own rates here (MILES steps it with its factors
        removed, through the scheduler's ``base=``).
        """
        schedule = ctx.lr_schedule
        if schedule is None:
            return
        current = [float(group["lr"]) for group in ctx.optimizer.param_groups]
        if current != [float(lr) for lr in schedule.get_last_lr()]:
            raise RuntimeError(
                f"strategy {self.name!r} sets learning rates itself, and the trainer's base "
                "schedule would overwrite them at its next step; use schedule 'constant' with "
                "this strategy (or override Strategy.step_lr_schedule to compose the two)"
            )
        schedule.step()

    # -- values ----------------------------------------------------------------------------------
    def loss(
        self, losses: Mapping[str, Tensor], output: FusionOutput, batch: Mapping[str, Any]
    ) -> Tensor:
        """Combine the per-head losses (``losses["fused"]`` and one per modality) into one scalar.

        Default: the fused loss alone, the plain multimodal objective.
        """
        return losses[FUSED]

    def selection_score(self, val: EvalResult) -> float:
        """What the best epoch maximises on validation: the fused metric, unless a method (e.g.
        a unimodal reference) is judged by one head."""
        return val.fused

    def should_stop(self) -> bool:
        """True ends training after the current epoch."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs, JSON-able builtins and tensors (saved in ``last.pt``)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back what :meth:`state_dict` returned; called before ``on_fit_start``."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")

    def describe(self) -> dict[str, Any]:
        """Name and hyper-parameters, for results tables and reports."""
        info: dict[str, Any] = {"name": self.name, "uses_aux_losses": self.uses_aux_losses}
        if not self.head_follows_encoder:
            info["head_follows_encoder"] = False
        return info
