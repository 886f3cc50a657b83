"""OGM: on-the-fly gradient modulation (Peng et al., CVPR 2022), as a trainer strategy.

Reference: X. Peng, Y. Wei, A. Deng, D. Wang, D. Hu, "Balanced Multimodal Learning via On-the-fly
Gradient Modulation", CVPR 2022 (Sec. 3.2, Eq. 8-10), and the authors' code
(github.com/GeWu-Lab/OGM-GE_CVPR2022, ``main.py``). OGM-GE (the Gaussian-noise variant) lives in
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
from miles.strategies.base import EvalResult, StrategyContext
from miles.strategies.joint import Joint
from miles.strategies.registry import register_strategy
from miles.validation import check_bool, check_non_negative, check_positive_int

#: added to the gradient's standard deviation before sampling the GE noise, as the authors do
NOISE_EPS = 1e-8


def modality_logit_shares(
    model: JointFusionModel, latents: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Each modality's additive share of the fused logits (detached), the paper's Eq. 8.

    Read from the model's fusion (:meth:`~miles.models.fusions.Fusion.modality_logits`): concat
    fusion gives ``out_m = z_m W[:, slice_m]^T + b / N`` (the columns of the fused linear layer
    that read ``z_m``), sum fusion ``out_m = z_m W^T + b / N``. In both cases the shares add up to
    the fused logits, and the bias is split evenly, as in the authors' code (``bias / 2``).
    """
    with torch.no_grad():
        detached = {m: latents[m].detach() for m in model.modalities}
        return {m: model.fusion.modality_logits(detached, m) for m in model.modalities}


def discrepancy_ratios(scores: Mapping[str, float]) -> dict[str, float]:
    """``rho_m = s_m / mean_{k != m} s_k`` (Eq. 9; for two modalities ``rho_a = s_a / s_b``).

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


def modulation_coefficient(ratio: float, alpha: float, *, continuous: bool = False) -> float:
    """Eq. 10 as the authors implement it: ``k = 1 - tanh(alpha * rho)`` when ``rho > 1``, else 1.

    This default jumps from 1 to at most ``1 - tanh(alpha)`` as soon as ``rho`` exceeds 1.
    ``continuous=True`` is ``k = 1 - tanh(alpha * relu(rho - 1))``, which tends to 1 as the
    modalities draw level.
    """
    if not ratio > 1 or alpha == 0:
        return 1.0
    x = ratio - 1.0 if continuous else ratio
    return 1.0 - math.tanh(alpha * x)


@register_strategy("ogm")
class OGM(Joint):
    """On-the-fly gradient modulation (OGM; Peng et al., CVPR 2022).

    Vanilla joint training (fused loss only; the unimodal heads learn on detached latents and are
    only reported, ``uses_aux_losses = False``) whose encoder gradients are rescaled after every
    backward pass:

    1. Each modality's share of the fused logits, ``out_m`` (the fusion's ``modality_logits``,
       see :func:`modality_logit_shares`: its slice of the fused linear layer for concat fusion,
       its own contribution for sum fusion, the bias split evenly), gives a score
       ``s_m = sum_i softmax(out_m)_i[y_i]`` over the batch (Eq. 8).
    2. Discrepancy ratio ``rho_m = s_m / s_other`` (Eq. 9).
    3. Coefficient ``k_m = 1 - tanh(alpha * rho_m)`` when ``rho_m > 1`` (the dominant modality),
       ``1`` otherwise: the paper's Eq. 10 as implemented in the authors' ``main.py``. It is
       discontinuous at ``rho = 1``: as soon as ``rho_m > 1``, ``k_m`` drops from 1 to at most
       ``1 - tanh(alpha)`` (e.g. 0.90 for ``alpha = 0.1``), however small the lead. The form
       ``k_m = 1 - tanh(alpha * relu(rho_m - 1))`` (continuous, ``k -> 1`` as ``rho -> 1``), as
       written in our task's specification, is ``continuous=True``.
    4. Every gradient of encoder ``m`` is multiplied by ``k_m`` before the optimizer steps. Only the
       encoders are modulated; the unimodal heads and the fused head are not.

    Args:
        alpha: modulation strength (Eq. 10). The authors' ``main.py`` has no default
            (``--alpha`` is required); the value their README suggests differs between versions
            of the repository (0.1 in one, 0.5 in another). Our default is 0.1. ``alpha = 0`` is
            exactly ``joint``.
        modulation_starts: first modulated epoch (1-based, inclusive).
        modulation_ends: last modulated epoch (1-based, inclusive). The authors modulate 0-based
            epochs ``0 <= epoch <= 50`` by default (``--modulation_starts 0 --modulation_ends
            50``), i.e. our epochs 1 to 51, hence the defaults 1 and 51.
        continuous: use ``1 - tanh(alpha * relu(rho - 1))`` (continuous at ``rho = 1``; the
            specification's form) instead of ``1 - tanh(alpha * rho)`` for ``rho > 1``. Default
            ``False``: Eq. 10 as the authors implement it.

    Deviations from the authors' code, on purpose:

    - The original multiplies only 4-D gradients (convolution kernels), which silently does
      nothing for MLP, GRU or transformer encoders and skips biases and BatchNorm parameters;
      here every parameter of the encoder is modulated (BalanceBenchmark similarly extends it to
      all non-bias weights).
    - Ties (``s_a == s_b``): the original's ``else`` branch then modulates its second modality
      with ``1 - tanh(alpha)``; here neither is modulated (Eq. 10 needs ``rho > 1``).
    - More than two modalities (the paper defines two): ``rho_m = s_m / mean_{k != m} s_k`` and
      every modality with ``rho_m > 1`` is modulated. For two modalities this is exactly Eq. 9.

    Not supported: multilabel tasks (the softmax score of the true class is undefined; raises
    ``ValueError`` at ``on_fit_start``), fusions that are not additive (no per-modality share of
    the fused logits; ``NotImplementedError`` at ``configure_model``).

    Optimizer: the authors use SGD with momentum 0.9 (weight decay 1e-4). Under Adam-like
    optimizers a per-parameter rescaling of the gradient is largely normalised away by the
    second-moment estimate (exactly, up to ``eps``, when ``k`` is constant), so OGM does much less;
    both are supported and ``on_fit_start`` warns once when ``alpha > 0`` with an Adam-like
    optimizer.

    The per-epoch record holds the mean applied coefficient per modality, the mean score per
    sample (``s_m / batch size``), and the fraction of batches where some ``k_m < 1`` was applied.
    """

    name = "ogm"
    uses_aux_losses = False
    #: OGM-GE adds Gaussian noise to the encoder gradients (see :mod:`miles.strategies.ogm_ge`)
    gaussian_noise: ClassVar[bool] = False

    def __init__(
        self,
        alpha: float = 0.1,
        modulation_starts: int = 1,
        modulation_ends: int = 51,
        continuous: bool = False,
    ) -> None:
        self.alpha = check_non_negative("alpha", alpha)
        self.modulation_starts = check_positive_int("modulation_starts", modulation_starts)
        self.modulation_ends = check_positive_int("modulation_ends", modulation_ends)
        if self.modulation_ends < self.modulation_starts:
            raise ValueError(
                f"modulation_ends ({modulation_ends}) must be >= modulation_starts "
                f"({modulation_starts})"
            )
        self.continuous = check_bool("continuous", continuous)
        self._epoch: int | None = None
        self._reset_epoch_stats()

    # -- setup -----------------------------------------------------------------------------------
    def configure_model(self, model: JointFusionModel) -> None:
        if len(model.modalities) < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least 2 modalities, got {list(model.modalities)}"
            )
        # fail before training when the fusion cannot split its logits by modality
        like = model.fused_head.weight
        probe = {m: like.new_zeros(1, size) for m, size in model.latent_sizes.items()}
        try:
            modality_logit_shares(model, probe)
        except NotImplementedError as exc:
            raise NotImplementedError(f"{type(self).__name__}: {exc}") from None
        super().configure_model(model)

    def on_fit_start(self, ctx: StrategyContext) -> None:
        if ctx.multilabel:
            raise ValueError(
                f"{type(self).__name__} does not support multilabel tasks: its score (softmax "
                "probability of the true class) is defined for single-label classification only"
            )
        if self.alpha > 0 and "betas" in ctx.optimizer.defaults:
            warnings.warn(
                f"{type(self).__name__} rescales encoder gradients, but the optimizer "
                f"({type(ctx.optimizer).__name__}) normalises each parameter's step by its "
                "second-moment estimate, which largely cancels the rescaling; the authors use "
                "SGD with momentum (TrainerConfig(optimizer='sgd')).",
                stacklevel=2,
            )

    # -- per epoch ---------------------------------------------------------------------------------
    def _reset_epoch_stats(self) -> None:
        self._coeff_sum: dict[str, float] = {}
        self._score_sum: dict[str, float] = {}
        self._samples = 0
        self._batches = 0
        self._modulated = 0

    def in_window(self, epoch: int) -> bool:
        """Whether ``epoch`` (1-based) lies in the modulation window."""
        return self.modulation_starts <= epoch <= self.modulation_ends

    def on_epoch_start(self, ctx: StrategyContext, epoch: int) -> None:
        self._epoch = epoch
        self._reset_epoch_stats()

    def coefficients(
        self, model: JointFusionModel, latents: Mapping[str, Tensor], target: Tensor
    ) -> tuple[dict[str, float], dict[str, float]]:
        """``(k_m, s_m)`` for one batch (no window applied)."""
        if target.dim() != 1 or target.dtype.is_floating_point:
            raise ValueError(
                f"{type(self).__name__} needs class-index targets of shape (batch,), got dtype "
                f"{target.dtype} and shape {tuple(target.shape)}"
            )
        shares = modality_logit_shares(model, latents)
        idx = target.long().unsqueeze(1)
        scores = {
            m: float(torch.softmax(out, dim=1).gather(1, idx).sum()) for m, out in shares.items()
        }
        ratios = discrepancy_ratios(scores)
        coeffs = {
            m: modulation_coefficient(r, self.alpha, continuous=self.continuous)
            for m, r in ratios.items()
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
        active = self.in_window(self._epoch)
        if active:
            with torch.no_grad():
                for m in model.modalities:
                    self._modulate(model.encoders[m], coeffs[m])
        else:
            coeffs = dict.fromkeys(coeffs, 1.0)  # what was applied: nothing
        self._batches += 1
        self._samples += int(target.shape[0])
        self._modulated += int(any(k < 1.0 for k in coeffs.values()))
        for m in model.modalities:
            self._coeff_sum[m] = self._coeff_sum.get(m, 0.0) + coeffs[m]
            self._score_sum[m] = self._score_sum.get(m, 0.0) + scores[m]

    def _modulate(self, encoder: nn.Module, coeff: float) -> None:
        """``grad <- k * grad`` for every parameter of ``encoder`` (OGM-GE adds noise)."""
        if coeff == 1.0:
            return
        for p in encoder.parameters():
            if p.grad is not None:
                p.grad.mul_(coeff)

    def on_epoch_end(
        self, ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None
    ) -> dict[str, Any]:
        n = max(self._batches, 1)
        return {
            "modulation_active": self.in_window(epoch),
            "coeff_mean": {m: v / n for m, v in self._coeff_sum.items()},
            "score_mean": {m: v / max(self._samples, 1) for m, v in self._score_sum.items()},
            "modulated_fraction": self._modulated / n,
        }

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "alpha": self.alpha,
            "modulation_starts": self.modulation_starts,
            "modulation_ends": self.modulation_ends,
            "continuous": self.continuous,
            "gaussian_noise": self.gaussian_noise,
        }
