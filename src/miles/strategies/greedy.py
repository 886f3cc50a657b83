"""Greedy: balanced multimodal learning by conditional learning speed (Wu et al., ICML 2022).

Reference: N. Wu, S. Jastrzebski, K. Cho, K. J. Geras, "Characterizing and Overcoming the Greedy
Nature of Learning in Multi-modal Deep Neural Networks", ICML 2022, and the authors' code
(``nyukat/greedy_multimodal_learning``, commit ``a190e03``: ``src/callbacks.py``
``Bias_Mitigation_Strong``, ``src/balanced_mmtm.py``, ``src/model.py``, ``train.py``,
``configs/training_guided.gin``). The paper's PDF was not available to us: the mechanism below is
the authors' code, with the abstract for the intent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from miles.models.fusion import JointFusionModel
from miles.models.fusions import MMTMFusion
from miles.strategies.base import EvalResult, StepOutput, Strategy, StrategyContext
from miles.strategies.registry import register_strategy
from miles.strategies.requirements import installed_fusion, require_modalities
from miles.validation import check_number, check_positive, check_positive_int


def speed_ratio(params: Iterable[nn.Parameter]) -> float:
    """``||grad||^2 / ||theta||^2`` summed over a group of parameters (the authors'
    ``compute_BDR`` terms); parameters without a gradient are skipped."""
    grad_sq = weight_sq = 0.0
    for p in params:
        if p.grad is not None:
            grad_sq += float(p.grad.detach().pow(2).sum())
            weight_sq += float(p.detach().pow(2).sum())
    return grad_sq / weight_sq if weight_sq > 0 else 0.0


def learning_speed_gap(bypass: tuple[float, float], main: tuple[float, float]) -> float:
    """``d = BDR_0 - BDR_1`` with ``BDR_k = log10(bypass_k / main_k)``, the accumulated
    conditional learning speeds of the two branches. ``d > 0``: branch 0 leans more on the
    cross-modal bypass than branch 1 does."""
    bdr = [math.log10(b / m) if b > 0 and m > 0 else 0.0 for b, m in zip(bypass, main, strict=True)]
    return bdr[0] - bdr[1]


@register_strategy("greedy")
class Greedy(Strategy):
    """Greedy-learner re-balancing (Wu et al., ICML 2022).

    The model is the authors' intermediate fusion: the strategy installs the ``mmtm`` fusion
    (:class:`~miles.models.fusions.MMTMFusion`), which rescales each modality's latent by a gate
    computed from both (MMTM), classifies each gated latent with its own branch head and predicts
    the mean of the two branches. The loss is the sum of the branch cross-entropies. After every
    backward pass (the authors' ``Bias_Mitigation_Strong.on_backward_end``):

    1. the conditional learning speed of each branch ``k`` accumulates ``||g||^2 / ||theta||^2`` of
       its bypass (the MMTM gate of ``k`` plus the shared squeeze layer) and of its main path (its
       encoder and branch head), over every regular step so far; ``d = BDR_0 - BDR_1`` with
       ``BDR_k = log10(bypass_k / main_k)`` (:func:`learning_speed_gap`);
    2. from epoch ``starting_epoch`` on, when ``|d| > epsilon``, the next ``window`` steps are
       *re-balancing* steps for the branch that leans more on the bypass (modality 0 if
       ``d > 0``): its MMTM gate is replaced by the gate's running mean, a constant, so that
       branch learns from its own modality; the accumulators pause meanwhile.

    The heads column is each branch head's accuracy. These outputs are not unimodal: the gate
    reads both modalities (the authors measure unimodal reliance by replacing the other
    modality's squeeze by its dataset mean instead).

    Args:
        epsilon: the threshold on ``|d|``: 0.01 (``configs/training_guided.gin``;
            BalanceBenchmark's ``alpha`` 0.001); ``math.inf``: never re-balance.
        window: re-balancing steps per trigger, ``Q``: 5.
        starting_epoch: the first epoch (1-based) that may re-balance: 2 (the authors' loop counts
            epochs from 1 and unlocks at ``epoch >= 2``).
        ratio: the MMTM squeeze ratio: 4 (``src/model.py``).

    Where this departs from the authors' code:

    - One MMTM, on the encoders' latents. The authors insert MMTMs after ResNet-18 stages 2, 3
      and 4; the last one, before global average pooling, is exactly an MMTM on the pooled
      features (see :class:`~miles.models.fusions.MMTMFusion`), but the earlier ones sit inside
      the encoders, which are opaque modules here, so they are not reproduced. Our latents are
      the encoders' outputs, which for our encoders end in a projection after the pooling.
    - The running mean of each gate counts training forwards only, and the second modality's
      mean tracks its own gate; the authors' running mean also counts evaluation forwards, and
      its second entry tracks the *first* modality's gate (``running_avg_weight_skeleton`` is
      updated with ``vis_out``).
    - Evaluation always uses the computed gates; the authors evaluate in whatever mode the last
      training step left (mid-window, the re-balanced one).
    - Optimizer: the authors use SGD lr 0.1 without momentum or weight decay, batch 8,
      ReduceLROnPlateau on the loss and early stopping on accuracy (patience 5); any of ours works,
      the schedule and early stopping are not reproduced. The random variant
      (``Bias_Mitigation_Random``) is not implemented.

    BalanceBenchmark's Greedy (``Greedy_trainer.py``) trains a fused concat head instead of the
    branch losses, uses ``epsilon = 0.001`` with no starting epoch and four MMTMs, and as released
    cannot run: its MMTM resets its running averages on every forward then indexes them
    (``KeyError``), hard-codes a batch of 64, and the trainer calls
    ``model.Unimodality_Calculate()``, which the repository does not define.

    No neutral setting reduces Greedy to a method of ours (``epsilon = inf`` is plain training of
    the MMTM model, the authors' baseline). Defined for exactly two modalities.
    """

    name = "greedy"
    unused_parameters = True  # a re-balancing step trains one branch only (matters under DDP)
    uses_aux_losses = True
    max_modalities = 2

    def __init__(
        self, epsilon: float = 0.01, window: int = 5, starting_epoch: int = 2, ratio: float = 4.0
    ) -> None:
        self.epsilon = check_number("epsilon", epsilon, low=0, finite=False)
        self.window = check_positive_int("window", window)
        self.starting_epoch = check_positive_int("starting_epoch", starting_epoch)
        self.ratio = check_positive("ratio", ratio)
        #: accumulated ``||g||^2 / ||theta||^2`` of each branch's bypass and main path
        self.bypass = [0.0, 0.0]
        self.main = [0.0, 0.0]
        #: the re-balanced branch (index) and the re-balancing steps it has left
        self.caring: int | None = None
        self.steps_left = 0
        self.gap: float | None = None
        self._epoch = 0
        self._reset_epoch_stats()

    def configure_model(self, model: JointFusionModel) -> None:
        require_modalities(self.name, model, exactly=2)
        model.set_fusion("mmtm", ratio=self.ratio)

    @staticmethod
    def _fusion(model: JointFusionModel) -> MMTMFusion:
        return installed_fusion("Greedy", model, MMTMFusion)

    def on_epoch_start(self, ctx: StrategyContext, epoch: int) -> None:
        self._epoch = epoch
        self._reset_epoch_stats()

    def _reset_epoch_stats(self) -> None:
        self._steps = 0
        self._rebalanced = [0, 0]

    # -- the step --------------------------------------------------------------------------------
    def training_step(self, ctx: StrategyContext, batch: Mapping[str, Any]) -> StepOutput:
        model = ctx.model
        fusion = self._fusion(model)
        modalities = model.modalities
        fusion.caring = modalities[self.caring] if self.caring is not None else None
        output = ctx.forward(batch)
        losses = ctx.head_losses(output, batch)
        loss = torch.stack([losses[m] for m in modalities]).sum()
        ctx.zero_grad()
        ctx.backward(loss)
        self.rebalance(model)
        ctx.optimizer_step()
        return StepOutput.of(loss, losses, batch)

    def rebalance(self, model: JointFusionModel) -> None:
        """Count this step, then decide the next (the authors' ``on_backward_end``)."""
        self._steps += 1
        if self.caring is not None:
            self._rebalanced[self.caring] += 1
            self.steps_left -= 1
            if self.steps_left == 0:
                self.caring = None
            return
        self.accumulate(model)
        self.gap = learning_speed_gap(
            (self.bypass[0], self.bypass[1]), (self.main[0], self.main[1])
        )
        if self._epoch >= self.starting_epoch and abs(self.gap) > self.epsilon:
            self.caring = 0 if self.gap > 0 else 1
            self.steps_left = self.window

    def accumulate(self, model: JointFusionModel) -> None:
        """Add this step's ``||g||^2 / ||theta||^2`` of each branch's bypass and main path."""
        fusion = self._fusion(model)
        shared = list(fusion.squeeze.parameters())
        for k, m in enumerate(model.modalities):
            self.bypass[k] += speed_ratio([*fusion.excite[m].parameters(), *shared])
            main = [*model.encoders[m].parameters(), *fusion.branches[m].parameters()]
            self.main[k] += speed_ratio(main)

    # -- per epoch and state -----------------------------------------------------------------------
    def on_epoch_end(
        self, ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None
    ) -> dict[str, Any]:
        n = max(self._steps, 1)
        names = ctx.model.modalities
        return {
            "gap": self.gap,
            "rebalanced_fraction": {names[k]: self._rebalanced[k] / n for k in range(2)},
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "bypass": list(self.bypass),
            "main": list(self.main),
            "caring": self.caring,
            "steps_left": self.steps_left,
            "gap": self.gap,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.bypass = [float(v) for v in state["bypass"]]
        self.main = [float(v) for v in state["main"]]
        self.caring = None if state["caring"] is None else int(state["caring"])
        self.steps_left = int(state["steps_left"])
        self.gap = None if state["gap"] is None else float(state["gap"])

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "fusion": "mmtm",
            "epsilon": self.epsilon,
            "window": self.window,
            "starting_epoch": self.starting_epoch,
            "ratio": self.ratio,
        }
