"""AGM: adaptive gradient modulation (Li et al., ICCV 2023), as a trainer strategy.

Reference: H. Li, X. Li, P. Hu, Y. Lei, C. Li, Y. Zhou, "Boosting Multi-modal Model Performance
with Adaptive Gradient Modulation", ICCV 2023, and the authors' code (``lihong2303/AGM``, commit
``5a65542``: ``model/CREMAD_net.py``, ``model/URFunny_net.py``, ``run/CREMAD_main.py``,
``utils/config.py``). The paper's PDF was not available to us: the mechanism below is the
authors' code, with the abstract for the intent.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from itertools import combinations
from typing import Any

import torch
from torch import Tensor, nn

from miles.models.fusion import FusionOutput, JointFusionModel
from miles.strategies.base import EvalResult, StepOutput, StrategyContext
from miles.strategies.joint import Joint
from miles.strategies.registry import register_strategy
from miles.strategies.requirements import (
    ModulationWindow,
    require_modalities,
    require_single_label,
)
from miles.validation import check_non_negative, check_positive

#: the authors floor the true-class probability at 1e-8 before its log (``run/CREMAD_main.py``)
MIN_PROBABILITY = 1e-8

Coalition = frozenset[str]


def coalitions(modalities: Sequence[str]) -> list[Coalition]:
    """Every non-empty subset of ``modalities``, the full set first."""
    names = list(modalities)
    out = [frozenset(names)]
    for size in range(len(names) - 1, 0, -1):
        out += [frozenset(c) for c in combinations(names, size)]
    return out


def _subsets(items: Sequence[str]) -> Iterator[Coalition]:
    for size in range(len(items) + 1):
        for c in combinations(items, size):
            yield frozenset(c)


def mono_modal_responses(
    values: Mapping[Coalition, Tensor], modalities: Sequence[str]
) -> dict[str, Tensor]:
    """Each modality's Shapley share of the fused logits (the authors' mono-modal response).

    ``m_i = sum_{S not containing i} w(S) [f(S + i) - f(S)]``, ``w(S) = |S|! (M-|S|-1)! / M!``,
    ``f(S)`` the fused logits with the modalities outside ``S`` zeroed at the input and ``f`` of
    the empty set taken as 0, so ``sum_i m_i = f(all)``. For two modalities this is the authors'
    ``m_a = (f(a, v) - f(0, v) + f(a, 0)) / 2``, for three their ``URFunny_net.py`` weights.
    """
    names = list(modalities)
    total = math.factorial(len(names))
    out: dict[str, Tensor] = {}
    for i in names:
        share: Tensor | None = None
        for s in _subsets([m for m in names if m != i]):
            weight = math.factorial(len(s)) * math.factorial(len(names) - len(s) - 1) / total
            term = values[s | {i}] - values[s] if s else values[s | {i}]
            share = weight * term if share is None else share + weight * term
        assert share is not None
        out[i] = share
    return out


def response_scores(responses: Mapping[str, Tensor], target: Tensor) -> dict[str, float]:
    """``s_m``: mean over the batch of ``-log softmax(m_m)[y]``, the probability floored at 1e-8."""
    idx = target.long().unsqueeze(1)
    out = {}
    with torch.no_grad():
        for m, logits in responses.items():
            p = torch.softmax(logits.float(), dim=1).gather(1, idx).clamp_min(MIN_PROBABILITY)
            out[m] = float(-p.log().mean())
    return out


def standing(scores: Mapping[str, float]) -> dict[str, float]:
    """``r_m = exp(M / (M-1) * (mean_k s_k - s_m))``; two modalities: ``r_a = exp(s_v - s_a)``.

    A lower loss score than the average (a modality ahead) gives ``r_m > 1``.
    """
    n = len(scores)
    mean = sum(scores.values()) / n
    return {m: math.exp(n / (n - 1) * (mean - s)) for m, s in scores.items()}


def agm_coefficients(
    scores: Mapping[str, float], running: Mapping[str, float], alpha: float, cap: float | None
) -> dict[str, float]:
    """``c_m = exp(alpha * min(rbar_m - r_m, cap))``: ``r`` from this batch's scores, ``rbar`` from
    the running scores. A modality ahead of its running standing (``r_m > rbar_m``) gets
    ``c_m < 1``, one behind gets ``c_m > 1``. ``cap=None``: no cap (the authors' AV-MNIST)."""
    now, before = standing(scores), standing(running)
    out = {}
    for m in scores:
        gap = before[m] - now[m]
        out[m] = math.exp(alpha * (gap if cap is None else min(gap, cap)))
    return out


def zero_modalities(batch: Mapping[str, Any], keep: Coalition) -> dict[str, Any]:
    """``batch`` with every modality outside ``keep`` replaced by zeros (lengths kept)."""
    inputs = {m: x if m in keep else torch.zeros_like(x) for m, x in batch["inputs"].items()}
    return {**batch, "inputs": inputs}


@register_strategy("agm")
class AGM(Joint):
    """Adaptive gradient modulation (AGM; Li et al., ICCV 2023).

    Each step, besides the usual forward pass, the model is run once per non-empty proper subset
    of the modalities with the others' inputs zeroed (in eval mode, with gradients: the authors'
    ``GradMod.forward``). From these fused outputs every modality gets its mono-modal response
    ``m_m``, its Shapley share of the fused logits (:func:`mono_modal_responses`); they add up to
    the fused logits. Then:

    1. ``s_m`` = the cross-entropy of ``m_m`` over the batch (:func:`response_scores`);
    2. ``c_m = exp(alpha * min(rbar_m - r_m, cap))`` with ``r_m = exp(M/(M-1) (mean s - s_m))`` from
       this batch and ``rbar_m`` the same on the running means of ``s_m`` over every step so far
       (:func:`agm_coefficients`): a modality doing better than its running standing is slowed;
    3. the loss is the fused cross-entropy with the gradient reaching ``m_m`` multiplied by
       ``c_m`` (the authors' backward hooks on ``m_a`` and ``m_v``; here the value is the fused
       logits plus ``(c_m - 1)(m_m - m_m.detach())``, the same gradient with no hook);
    4. if any element of the fusion's weight gradient leaves ``[-clip, clip]``, every encoder and
       fusion gradient is clipped to total norm ``clip`` (the authors', CREMA-D and AV-MNIST).

    The running scores are updated after the coefficients, every step, inside the window or not.
    Vanilla joint training is the parent: no auxiliary losses; the unimodal heads train as
    detached probes and give the heads column (the authors report the accuracy of ``m_m``, which
    the per-epoch record gives for the training batches as ``response_accuracy``).

    Args:
        alpha: modulation strength; the authors' argparse default 1.0 (``utils/config.py``; the
            README's AV-MNIST example uses 2.5, BalanceBenchmark 0.1). ``alpha = 0`` with
            ``clip=None`` is exactly ``joint``.
        cap: upper bound of ``rbar_m - r_m`` inside the exponential: 10 on CREMA-D
            (``run/CREMAD_main.py``), 7 on UR-Funny, none on AV-MNIST, AVE and MOSEI; default 10.
            ``None``: no bound.
        modulation_starts: first epoch (1-based) in which the coefficients apply. The authors'
            default window is epochs 0 to 20 of a loop counting from 1 (``--modulation_starts 0
            --modulation_ends 20``), our 1 to 20.
        modulation_ends: last epoch (1-based, inclusive) in which the coefficients apply.
        clip: the conditional gradient clipping threshold (1.0 in the authors' CREMA-D and
            AV-MNIST code, 5.0 on UR-Funny); ``None``: off.

    Where this departs from the authors' code:

    - Outside the window no coefficient applies. The authors' hooks stay registered after the
      window, so the last coefficients computed keep scaling every later step (an artefact of
      leaving the window; the window's intent is to stop modulating).
    - The zeroed passes use ``ctx.forward`` with the inputs zeroed and the lengths of
      variable-length modalities kept; the authors' ``f(0, 0)`` pass, computed but unused, is not
      run.
    - The clipping acts on the encoders and the fusion, the authors' whole model; our detached
      probe heads (not in their model) are left out of the norm. The threshold test reads every
      weight (not bias) gradient of the fusion, for concat and sum fusion exactly the authors'
      ``fc_out.weight``.
    - More than two modalities use the general Shapley weights, which the authors write out for
      three (UR-Funny) and we check against theirs.
    - Optimizer: the authors use SGD (momentum 0.9, weight decay 1e-4, StepLR(70, 0.1), lr 1e-4
      in the README); any of ours works, the learning-rate schedule is not reproduced.

    BalanceBenchmark's AGM departs further (its ``AGM_trainer.py``): it computes the responses
    under ``no_grad`` without the empty-coalition term (``(f(a,v) - f(0,v)) / 2`` for audio),
    scales the ``.grad`` of every non-bias parameter whose name contains the modality (OGM-style)
    instead of the gradient at the response, inverts the ratio (``exp(s_m - mean)``: for two
    modalities the coefficients are swapped, speeding up the modality ahead), and uses
    ``alpha = 0.1``, cap 7, clip 5, no window and AdamW.

    Not supported: multilabel tasks (the score is a softmax cross-entropy; ``ValueError`` at
    ``on_fit_start``), a single modality.
    """

    name = "agm"
    uses_aux_losses = False

    def __init__(
        self,
        alpha: float = 1.0,
        cap: float | None = 10.0,
        modulation_starts: int = 1,
        modulation_ends: int = 20,
        clip: float | None = 1.0,
    ) -> None:
        self.alpha = check_non_negative("alpha", alpha)
        self.cap = None if cap is None else check_non_negative("cap", cap)
        self.window = ModulationWindow(modulation_starts, modulation_ends)
        self.clip = None if clip is None else check_positive("clip", clip)
        #: running mean of each modality's score over every step so far (``t_m``), and the count
        self.running: dict[str, float] = {}
        self.steps = 0
        self._epoch = 0
        self._reset_epoch_stats()

    # -- setup -----------------------------------------------------------------------------------
    def configure_model(self, model: JointFusionModel) -> None:
        require_modalities(self.name, model)
        super().configure_model(model)

    def on_fit_start(self, ctx: StrategyContext) -> None:
        require_single_label(self.name, ctx.multilabel)

    def on_epoch_start(self, ctx: StrategyContext, epoch: int) -> None:
        self._epoch = epoch
        self._reset_epoch_stats()

    def _reset_epoch_stats(self) -> None:
        self._sums: dict[str, dict[str, float]] = {"coeff": {}, "score": {}, "correct": {}}
        self._batches = 0
        self._samples = 0

    # -- the step --------------------------------------------------------------------------------
    def coalition_logits(
        self, ctx: StrategyContext, batch: Mapping[str, Any], output: FusionOutput
    ) -> dict[Coalition, Tensor]:
        """``f(S)`` for every non-empty subset ``S``: ``output`` for all modalities, one eval-mode
        pass with gradients for each proper subset."""
        model = ctx.model
        full, *partial = coalitions(model.modalities)
        values = {full: output.fused}
        was_training = model.training
        model.eval()
        try:
            for keep in partial:
                values[keep] = ctx.forward(zero_modalities(batch, keep)).fused
        finally:
            model.train(was_training)
        return values

    def training_step(self, ctx: StrategyContext, batch: Mapping[str, Any]) -> StepOutput:
        model, target = ctx.model, batch["target"]
        output = ctx.forward(batch)
        responses = mono_modal_responses(
            self.coalition_logits(ctx, batch, output), model.modalities
        )
        scores = response_scores(responses, target)
        if not self.running:
            self.running = dict.fromkeys(model.modalities, 0.0)
        coeffs = agm_coefficients(scores, self.running, self.alpha, self.cap)
        self.steps += 1
        for m, s in scores.items():
            self.running[m] = self.running[m] * (self.steps - 1) / self.steps + s / self.steps
        if self._epoch not in self.window:
            coeffs = dict.fromkeys(coeffs, 1.0)
        fused = output.fused
        for m, c in coeffs.items():
            if c != 1.0:
                fused = fused + (c - 1.0) * (responses[m] - responses[m].detach())
        losses = ctx.head_losses(FusionOutput(fused, output.unimodal, output.latents), batch)
        loss = self.loss(losses, output, batch)
        ctx.zero_grad()
        ctx.backward(loss)
        self.clip_gradients(model)
        ctx.optimizer_step()
        self._record(coeffs, scores, responses, target)
        return StepOutput.of(loss, losses, batch)

    def clip_gradients(self, model: JointFusionModel) -> bool:
        """The authors' conditional clip; True when it clipped."""
        if self.clip is None:
            return False
        weights = [p.grad for p in model.fusion.parameters() if p.dim() > 1 and p.grad is not None]
        if not any(bool((g.abs() > self.clip).any()) for g in weights):
            return False
        params: list[nn.Parameter] = [
            *model.encoders.parameters(),
            *model.fusion.parameters(),
        ]
        nn.utils.clip_grad_norm_(params, max_norm=self.clip)
        return True

    def _record(
        self,
        coeffs: Mapping[str, float],
        scores: Mapping[str, float],
        responses: Mapping[str, Tensor],
        target: Tensor,
    ) -> None:
        self._batches += 1
        self._samples += int(target.shape[0])
        sums = self._sums
        for m in coeffs:
            correct = float((responses[m].detach().argmax(dim=1) == target).sum())
            for key, value in (("coeff", coeffs[m]), ("score", scores[m]), ("correct", correct)):
                sums[key][m] = sums[key].get(m, 0.0) + value

    # -- per epoch and state -----------------------------------------------------------------------
    def on_epoch_end(
        self, ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None
    ) -> dict[str, Any]:
        n, sums = max(self._batches, 1), self._sums
        return {
            "modulation_active": epoch in self.window,
            "coeff_mean": {m: v / n for m, v in sums["coeff"].items()},
            "score_mean": {m: v / n for m, v in sums["score"].items()},
            "running_score": dict(self.running),
            "response_accuracy": {m: v / max(self._samples, 1) for m, v in sums["correct"].items()},
        }

    def state_dict(self) -> dict[str, Any]:
        return {"running": dict(self.running), "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.running = {str(m): float(v) for m, v in state["running"].items()}
        self.steps = int(state["steps"])

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "alpha": self.alpha,
            "cap": self.cap,
            **self.window.describe(),
            "clip": self.clip,
        }
