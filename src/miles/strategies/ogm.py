"""OGM: on-the-fly gradient modulation (Peng et al., CVPR 2022), as a trainer strategy.

Reference: X. Peng, Y. Wei, A. Deng, D. Wang, D. Hu, "Balanced Multimodal Learning via On-the-fly
Gradient Modulation", CVPR 2022 (Sec. 3.2, Eq. 8-11), its journal extension (Wei, Hu et al.,
arXiv 2410.11582, Eq. 7 and 11), and the authors' code (github.com/GeWu-Lab/OGM-GE_CVPR2022,
``main.py`` at 343dc1d). OGM-GE (the Gaussian-noise variant) lives in
:mod:`miles.strategies.ogm_ge` and reuses everything here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from miles.models.fusion import FusionOutput, JointFusionModel
from miles.strategies.base import EvalResult, StepOutput, StrategyContext
from miles.strategies.joint import Joint
from miles.strategies.registry import register_strategy
from miles.strategies.requirements import (
    ModulationWindow,
    batch_dependent,
    require_modalities,
)
from miles.validation import check_choice, check_non_negative

#: added to the gradient's standard deviation before sampling the GE noise, as the authors do
NOISE_EPS = 1e-8
#: how the coefficient acts: on the gradient (the authors, for SGD), on the step (our Adam mode),
#: or chosen from the optimizer (step for optimizers with a second moment, gradient otherwise)
MODES = ("auto", "gradient", "step")
#: which encoder parameters are modulated: every one with more than one dimension (weights and
#: kernels, not biases or norms: BalanceBenchmark), convolution kernels only (the authors'
#: 4-D grads; here any kernel of >= 3 dimensions), or all of them
PARAMS = ("non_1d", "conv_kernels", "all")
#: Eq. 10 of the CVPR paper (= the authors' code), or Eq. 11 of the journal extension
COEFFICIENTS = ("cvpr", "journal")
#: the per-sample score of a multilabel task (ours; the papers are single-label)
MULTILABEL_SCORES = ("geometric", "arithmetic", "positives")
#: alpha the authors recommend per dataset (README: "we recommend alpha=0.1 for VGGSound and
#: alpha=0.8 for CREMA-D"); elsewhere alpha is "determined from [0, 1] according to the
#: validation set" (paper Sec. 4.2)
AUTHORS_ALPHA = {"cremad": 0.8, "vggsound": 0.1}
#: the authors' optimizer (paper Sec. 4.2, main.py l.246-247): SGD, momentum 0.9, weight decay
#: 1e-4 (their lr 1e-3, x0.1 every 70 epochs)
AUTHORS_OPTIMIZER = {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 1e-4}


def modality_logit_shares(
    model: JointFusionModel, latents: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Each modality's additive share of the fused logits (detached), the paper's Eq. 8.

    Read from the model's fusion (:meth:`~miles.models.fusions.Fusion.modality_logits`, the same
    slice :mod:`miles.readouts` reports): concat fusion gives ``out_m = z_m W[:, slice_m]^T +
    b / N``, sum fusion ``out_m = z_m W^T + b / N``. The shares add up to the fused logits; the
    bias is split evenly, as in the authors' code (``bias / 2``).
    """
    with torch.no_grad():
        detached = {m: latents[m].detach() for m in model.modalities}
        return {m: model.fusion.modality_logits(detached, m) for m in model.modalities}


def discrepancy_ratios(scores: Mapping[str, float]) -> dict[str, float]:
    """``rho_m = s_m / mean_{k != m} s_k`` (Eq. 9; the journal's Eq. 7 for more modalities).

    A zero denominator gives ``inf`` when ``s_m > 0`` (``m`` dominates infinitely) and ``1``
    (no decision) when both are zero.
    """
    names = list(scores)
    ratios: dict[str, float] = {}
    for m in names:
        others = [scores[k] for k in names if k != m]
        denom = sum(others) / len(others)
        if denom > 0:
            ratios[m] = scores[m] / denom
        else:
            ratios[m] = math.inf if scores[m] > 0 else 1.0
    return ratios


def modulation_coefficient(ratio: float, alpha: float, *, coefficient: str = "cvpr") -> float:
    """``k`` of a modality with discrepancy ratio ``rho``; 1 unless ``rho > 1`` (strictly).

    ``"cvpr"`` (Eq. 10, identical to the authors' ``1 - tanh(alpha * relu(rho))``, since
    ``rho > 0``): ``k = 1 - tanh(alpha * rho)``; it jumps from 1 to ``1 - tanh(alpha)`` as soon as
    ``rho`` exceeds 1. ``"journal"`` (Eq. 11 of the extension): ``k = max(0, 1 - alpha *
    tanh(rho - 1))``, continuous at ``rho = 1``.
    """
    if not ratio > 1 or alpha == 0:
        return 1.0
    if coefficient == "journal":
        return max(0.0, 1.0 - alpha * math.tanh(ratio - 1.0))
    return 1.0 - math.tanh(alpha * ratio)


def batch_scores(
    shares: Mapping[str, Tensor], target: Tensor, *, multilabel: str | None = None
) -> dict[str, float]:
    """``s_m = sum_i s_{m,i}`` over the batch (Eq. 8).

    Single-label (``multilabel=None``): ``s_{m,i} = softmax(out_m)_i[y_i]``, the probability of
    the true class. Multilabel (ours; the papers are single-label): ``"geometric"``
    ``s_{m,i} = exp(-mean_c BCE_ic) = (prod_c p_ic)^(1/C)``, with ``p_ic = sigmoid(o_ic)`` for a
    positive label and ``1 - sigmoid(o_ic)`` for a negative one (the same identity
    ``s = exp(-loss)`` the single-label score has); ``"arithmetic"`` ``mean_c p_ic``;
    ``"positives"`` the mean ``sigmoid(o_ic)`` over the sample's positive labels (0 for a sample
    without any).
    """
    scores: dict[str, float] = {}
    for m, out in shares.items():
        if multilabel is None:
            scores[m] = float(torch.softmax(out, dim=1).gather(1, target.long().unsqueeze(1)).sum())
            continue
        y = target.to(out.dtype)
        p = torch.where(y > 0.5, torch.sigmoid(out), torch.sigmoid(-out))
        if multilabel == "geometric":
            per_sample = torch.exp(torch.log(p.clamp_min(1e-30)).mean(dim=1))
        elif multilabel == "arithmetic":
            per_sample = p.mean(dim=1)
        else:
            positives = y.sum(dim=1)
            per_sample = (torch.sigmoid(out) * y).sum(dim=1) / positives.clamp_min(1.0)
        scores[m] = float(per_sample.sum())
    return scores


def modulated_parameters(encoder: nn.Module, which: str) -> list[nn.Parameter]:
    """The parameters of ``encoder`` that OGM modulates (``which``: see :data:`PARAMS`)."""
    params = [p for p in encoder.parameters() if p.requires_grad]
    if which == "non_1d":
        return [p for p in params if p.dim() > 1]
    if which == "conv_kernels":
        return [p for p in params if p.dim() >= 3]
    return params


def is_adaptive(optimizer: torch.optim.Optimizer) -> bool:
    """An optimizer that divides by a second-moment estimate (Adam, AdamW, ...): it cancels a
    constant rescaling of the gradient, so OGM must act on its step instead."""
    return "betas" in optimizer.defaults


@register_strategy("ogm")
class OGM(Joint):
    """On-the-fly gradient modulation (OGM; Peng et al., CVPR 2022).

    Vanilla joint training (fused loss only; the unimodal heads learn on detached latents and are
    only reported, ``uses_aux_losses = False``) whose dominant encoder is slowed after every
    backward pass:

    1. Each modality's share of the fused logits, ``out_m`` (:func:`modality_logit_shares`: its
       slice of the fused linear layer for concat fusion, its own term for sum fusion, the bias
       split evenly), gives a score ``s_m = sum_i softmax(out_m)_i[y_i]`` over the batch (Eq. 8;
       multilabel tasks: :func:`batch_scores`).
    2. Discrepancy ratio ``rho_m = s_m / s_other`` (Eq. 9; more modalities: the mean of the
       others, the journal's Eq. 7).
    3. Coefficient ``k_m = 1 - tanh(alpha * rho_m)`` when ``rho_m > 1`` (strictly), else 1
       (Eq. 10 = the authors' code; ``coefficient="journal"``: Eq. 11 of the extension).
    4. ``k_m`` slows encoder ``m`` (Eq. 11, ``theta <- theta - eta k g``), in one of two ways:

       * ``mode="gradient"`` (the authors, for SGD): ``grad <- k * grad`` before the optimizer
         steps. Under an optimizer with a second-moment estimate (Adam) a constant rescaling of
         the gradient cancels out of the step (exactly, up to ``eps``): OGM then does nothing.
       * ``mode="step"`` (ours, for Adam): the optimizer steps with the *unmodulated* gradient
         (its state, moments included, is exactly that of an unmodulated step), then the
         modulated parameters' update is scaled: ``theta <- theta_0 + k (theta_1 - theta_0)``.
         For optimizers whose update is linear in the learning rate (SGD, Adam, AdamW) that is
         the step at learning rate ``k * lr``: ``k`` is the encoder's effective learning rate
         for that step, as Eq. 11 intends.
       * ``mode="auto"`` (default): ``"step"`` when the optimizer has a second moment
         (:func:`is_adaptive`), ``"gradient"`` otherwise.

       The two modes agree under plain SGD. Under SGD with momentum they differ: gradient mode
       puts ``k g`` into the momentum buffer, where it persists; step mode keeps the buffer
       unmodulated and scales what is applied. Only the encoders are modulated, never the heads.

    Args:
        alpha: modulation strength (Eq. 10), ``>= 0``. The authors recommend 0.8 for CREMA-D and
            0.1 for VGGSound (README; :data:`AUTHORS_ALPHA`, which ``miles compare`` uses for
            those datasets); the paper tunes it in ``[0, 1]`` on validation. Default 0.1 (the
            README's example command). ``alpha = 0`` is exactly ``joint``.
        modulation_starts: first modulated epoch (1-based, inclusive).
        modulation_ends: last modulated epoch (1-based, inclusive). The authors modulate 0-based
            epochs ``0 <= epoch <= 50`` (``--modulation_starts 0 --modulation_ends 50``), i.e.
            our epochs 1 to 51: hence the defaults 1 and 51.
        mode: ``"auto"`` (default), ``"gradient"`` or ``"step"`` (see 4.).
        params: which encoder parameters are modulated: ``"non_1d"`` (default; weights and
            kernels, not biases or normalisation parameters, as BalanceBenchmark),
            ``"conv_kernels"`` (the authors: the 4-D kernels of their ResNet-18; here every
            kernel of 3 or more dimensions; an encoder without any is an error, not a silent
            no-op) or ``"all"``.
        coefficient: ``"cvpr"`` (default, Eq. 10) or ``"journal"`` (Eq. 11 of the extension).
        multilabel_score: the score of a multilabel task: ``"geometric"`` (default),
            ``"arithmetic"`` or ``"positives"`` (:func:`batch_scores`; ours).

    Deviations from the authors' code: ties (``s_a == s_b``) modulate no one (Eq. 10 needs
    ``rho > 1``; their ``else`` branch then slows audio by ``1 - tanh(alpha)``); more than two
    modalities and multilabel tasks are ours (see above); ``params`` defaults to every weight and
    kernel, because the authors' 4-D rule does nothing for MLP, GRU or transformer encoders.
    Fusions that are not additive have no per-modality share (``NotImplementedError`` at
    ``configure_model``).

    The per-epoch record holds the mode applied, the mean coefficient per modality, the mean
    score per sample (``s_m / batch size``), and the fraction of batches where some ``k_m < 1``.
    """

    name = "ogm"
    uses_aux_losses = False
    single_process = batch_dependent("modulation")
    #: OGM-GE adds Gaussian noise to the encoder gradients (see :mod:`miles.strategies.ogm_ge`)
    gaussian_noise: ClassVar[bool] = False
    #: the optimizer settings of the authors (``miles compare --method-optimizer ogm=authors``)
    authors_optimizer: ClassVar[dict[str, Any]] = AUTHORS_OPTIMIZER

    def __init__(
        self,
        alpha: float = 0.1,
        modulation_starts: int = 1,
        modulation_ends: int = 51,
        mode: str = "auto",
        params: str = "non_1d",
        coefficient: str = "cvpr",
        multilabel_score: str = "geometric",
    ) -> None:
        self.alpha = check_non_negative("alpha", alpha)
        self.window = ModulationWindow(modulation_starts, modulation_ends)
        self.mode = check_choice("mode", mode, MODES)
        self.params = check_choice("params", params, PARAMS)
        self.coefficient = check_choice("coefficient", coefficient, COEFFICIENTS)
        self.multilabel_score = check_choice(
            "multilabel_score", multilabel_score, MULTILABEL_SCORES
        )
        self._epoch: int | None = None
        self._multilabel = False
        self._applied_mode = "gradient" if mode == "auto" else mode
        self._modulated: dict[str, list[nn.Parameter]] = {}
        #: step mode: (parameter, value before the step, k) of this batch, applied after the step
        self._pending: list[tuple[nn.Parameter, Tensor, float]] = []
        self._reset_epoch_stats()

    # -- setup -----------------------------------------------------------------------------------
    def configure_model(self, model: JointFusionModel) -> None:
        require_modalities(type(self).__name__, model)
        # fail before training when the fusion cannot split its logits by modality
        like = model.fused_head.weight
        probe = {m: like.new_zeros(1, size) for m, size in model.latent_sizes.items()}
        try:
            modality_logit_shares(model, probe)
        except NotImplementedError as exc:
            raise NotImplementedError(f"{type(self).__name__}: {exc}") from None
        super().configure_model(model)

    def on_fit_start(self, ctx: StrategyContext) -> None:
        self._multilabel = ctx.multilabel
        adaptive = is_adaptive(ctx.optimizer)
        self._applied_mode = (
            self.mode if self.mode != "auto" else ("step" if adaptive else "gradient")
        )
        self._modulated = {
            m: modulated_parameters(ctx.model.encoders[m], self.params)
            for m in ctx.model.modalities
        }
        empty = [m for m, ps in self._modulated.items() if not ps]
        if empty:
            raise ValueError(
                f"{type(self).__name__}: params={self.params!r} selects no parameter of the "
                f"encoders {empty} (e.g. no convolution kernel); use params='non_1d' or 'all'"
            )
        if self.alpha > 0 and adaptive and self._applied_mode == "gradient":
            warnings.warn(
                f"{type(self).__name__} in gradient mode rescales encoder gradients, but the "
                f"optimizer ({type(ctx.optimizer).__name__}) normalises each parameter's step by "
                "its second-moment estimate, which largely cancels the rescaling; use mode='step' "
                "(or 'auto'), or SGD as the authors (TrainerConfig(optimizer='sgd')).",
                stacklevel=2,
            )

    # -- per epoch ---------------------------------------------------------------------------------
    def _reset_epoch_stats(self) -> None:
        self._coeff_sum: dict[str, float] = {}
        self._score_sum: dict[str, float] = {}
        self._samples = 0
        self._batches = 0
        self._modulated_batches = 0

    def on_epoch_start(self, ctx: StrategyContext, epoch: int) -> None:
        self._epoch = epoch
        self._reset_epoch_stats()

    def coefficients(
        self, model: JointFusionModel, latents: Mapping[str, Tensor], target: Tensor
    ) -> tuple[dict[str, float], dict[str, float]]:
        """``(k_m, s_m)`` for one batch (no window applied)."""
        if not self._multilabel and (target.dim() != 1 or target.dtype.is_floating_point):
            raise ValueError(
                f"{type(self).__name__} needs class-index targets of shape (batch,), got dtype "
                f"{target.dtype} and shape {tuple(target.shape)} (multilabel tasks: the trainer "
                "passes multilabel=True)"
            )
        shares = modality_logit_shares(model, latents)
        scores = batch_scores(
            shares, target, multilabel=self.multilabel_score if self._multilabel else None
        )
        coeffs = {
            m: modulation_coefficient(r, self.alpha, coefficient=self.coefficient)
            for m, r in discrepancy_ratios(scores).items()
        }
        return coeffs, scores

    def on_after_backward(
        self, ctx: StrategyContext, output: FusionOutput, batch: Mapping[str, Any]
    ) -> None:
        if self._epoch is None:
            raise RuntimeError(f"{type(self).__name__}.on_epoch_start was not called")
        model = ctx.model
        target = batch["target"]
        coeffs, scores = self.coefficients(model, output.latents, target)
        self._pending = []
        if self._epoch in self.window:
            with torch.no_grad():
                for m in model.modalities:
                    params = self._modulated.get(m) or modulated_parameters(
                        model.encoders[m], self.params
                    )
                    if self._applied_mode == "gradient":
                        self._modulate_gradients(params, coeffs[m])
                    else:
                        self._pending += self._snapshot(params, coeffs[m])
        else:
            coeffs = dict.fromkeys(coeffs, 1.0)  # what was applied: nothing
        self._batches += 1
        self._samples += int(target.shape[0])
        self._modulated_batches += int(any(k < 1.0 for k in coeffs.values()))
        for m in model.modalities:
            self._coeff_sum[m] = self._coeff_sum.get(m, 0.0) + coeffs[m]
            self._score_sum[m] = self._score_sum.get(m, 0.0) + scores[m]

    def _modulate_gradients(self, params: list[nn.Parameter], coeff: float) -> None:
        """Gradient mode: ``grad <- k * grad`` (OGM-GE adds noise)."""
        if coeff == 1.0:
            return
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coeff)

    def _snapshot(
        self, params: list[nn.Parameter], coeff: float
    ) -> list[tuple[nn.Parameter, Tensor, float]]:
        """Step mode: the parameters whose step :meth:`_scale_steps` changes, before the step."""
        if coeff == 1.0:
            return []
        return [(p, p.detach().clone(), coeff) for p in params if p.grad is not None]

    def training_step(self, ctx: StrategyContext, batch: Mapping[str, Any]) -> StepOutput:
        """The usual step (gradient mode modulates in :meth:`on_after_backward`); in step mode,
        the modulated parameters' update is then scaled by ``k``."""
        out = super().training_step(ctx, batch)
        if self._pending:
            with torch.no_grad():
                self._scale_steps(self._pending)
            self._pending = []
        return out

    def _scale_steps(self, pending: list[tuple[nn.Parameter, Tensor, float]]) -> None:
        """``theta <- theta_0 + k (theta_1 - theta_0)`` (OGM-GE adds noise)."""
        for p, before, coeff in pending:
            p.copy_(before.add(p - before, alpha=coeff))

    def on_epoch_end(
        self, ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None
    ) -> dict[str, Any]:
        n = max(self._batches, 1)
        return {
            "modulation_active": epoch in self.window,
            "mode": self._applied_mode,
            "coeff_mean": {m: v / n for m, v in self._coeff_sum.items()},
            "score_mean": {m: v / max(self._samples, 1) for m, v in self._score_sum.items()},
            "modulated_fraction": self._modulated_batches / n,
        }

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "alpha": self.alpha,
            **self.window.describe(),
            "mode": self.mode,
            "params": self.params,
            "coefficient": self.coefficient,
            "multilabel_score": self.multilabel_score,
            "gaussian_noise": self.gaussian_noise,
        }
