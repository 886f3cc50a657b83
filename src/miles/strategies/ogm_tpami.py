"""OGM as revised in the TPAMI extension (Wei, Hu, Du, Wen, TPAMI 2024), as a trainer strategy.

Reference: Y. Wei, D. Hu, H. Du, J.-R. Wen, "On-the-fly Modulation for Balanced Multimodal
Learning", IEEE TPAMI 2024 (arXiv 2410.11582; Sec. 3.2.2, Eq. 7, 11-17, Alg. 2), and the authors'
code (github.com/GeWu-Lab/BML_TPAMI2024, ``code/main.py`` and ``code/scripts/train_ogm.sh``, read
at commit 8db168f). The CVPR 2022 OGM / OGM-GE are :mod:`miles.strategies.ogm` and
:mod:`miles.strategies.ogm_ge`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from miles.models.fusion import FusionOutput, JointFusionModel
from miles.strategies.base import EvalResult, StrategyContext
from miles.strategies.ogm_ge import gradient_noise_std
from miles.strategies.onthefly import OnTheFly, discrepancy, mean_ratios, unimodal_scores
from miles.strategies.registry import register_strategy
from miles.strategies.requirements import ModulationWindow, batch_dependent
from miles.validation import check_bool, check_non_negative

__all__ = ["OGMTPAMI", "tpami_coefficient"]


def tpami_coefficient(ratio: float, alpha: float) -> float:
    """Eq. 11: ``k = max(1 - alpha * tanh(rho - 1), 0)`` when ``rho > 1``, else 1.

    Unlike the CVPR form (``1 - tanh(alpha * rho)``), ``k`` tends to 1 as the modalities draw
    level and lies in ``(1 - alpha, 1)`` for ``alpha <= 1``.
    """
    if not ratio > 1:
        return 1.0
    return max(1.0 - alpha * discrepancy(ratio), 0.0)


@register_strategy("ogm-tpami")
class OGMTPAMI(OnTheFly):
    """On-the-fly gradient modulation, TPAMI version: Eq. 11 coefficients and GE noise.

    After every backward pass (inside the modulation window):

    1. Scores ``s_m = sum_i softmax(W_m z_m,i + b / M)[y_i]`` (Eq. 6) and ratios
       ``rho_m = 1/(M-1) sum_{j != m} s_m / s_j`` (Eq. 7), on the current batch.
    2. ``k_m = max(1 - alpha tanh(rho_m - 1), 0)`` for ``rho_m > 1``, 1 otherwise (Eq. 11,
       :func:`tpami_coefficient`).
    3. Every gradient ``g`` of encoder ``m``: ``g <- k_m g + h``, ``h ~ N(0, std(g)^2)`` per
       parameter tensor when ``noise`` (Eq. 16, with the covariance of the mini-batch gradient
       approximated, as the authors' code does, by the spread of the tensor's own entries, taken
       before the scaling; :func:`~miles.strategies.ogm_ge.gradient_noise_std`). The noise is
       added to every encoder, modulated or not, as in the authors' code.

    Loss: the fused loss alone; the unimodal heads train on detached latents as probes, as in
    :class:`~miles.strategies.joint.Joint` (``uses_aux_losses = False``). Readouts: the fused head;
    the unimodal columns are the probe heads.

    Args:
        alpha: ``alpha`` of Eq. 11. Default 0.8: the authors' ``train_ogm.sh`` (used there with
            their code's formula, see below; the paper gives no value). ``alpha = 0`` with
            ``noise=False`` is exactly ``joint``.
        noise: add the GE noise of Eq. 16 (default True, the paper's OGM and the code's default
            ``--modulation OGM_GE``).
        modulation_starts: first modulated epoch (1-based). Default 7: the authors' ``main.py``
            modulates only after its warm-up (``warm_up = 1 if epoch <= 5``, 0-based).
        modulation_ends: last modulated epoch (1-based). Default 61: ``train_ogm.sh``'s
            ``--modulation_ends 60`` (0-based).

    Departures from the authors' code, on purpose: their ``main.py`` computes
    ``k = 1 - tanh(alpha * relu(rho))`` (the CVPR 2022 form, our ``ogm-ge``), not the paper's
    Eq. 11; we follow the paper, which is what distinguishes this method from ``ogm-ge``. Their
    ``else`` branch modulates the second modality whenever the first does not lead (ties
    included); we modulate only ``rho > 1``. They modulate 4-D (convolution) gradients only; we
    modulate every encoder parameter (the 4-D rule does nothing for MLP or GRU encoders). More than
    two modalities use Eq. 7. Their optimiser is AdamW (5e-5, weight decay 0.01) although Adam
    largely normalises a per-parameter gradient scale away; the paper reports SGD (1e-3,
    momentum 0.9); ours is the run's. Their undocumented ``--use_OGM_plus`` flag (the weaker
    modality's gradient times 4) is not offered. BalanceBenchmark has only the CVPR form of OGM.

    Not supported: multilabel tasks, non-additive fusions.
    """

    name = "ogm-tpami"
    single_process = batch_dependent("modulation")

    def __init__(
        self,
        alpha: float = 0.8,
        noise: bool = True,
        modulation_starts: int = 7,
        modulation_ends: int = 61,
    ) -> None:
        self.alpha = check_non_negative("alpha", alpha)
        self.noise = check_bool("noise", noise)
        self.window = ModulationWindow(modulation_starts, modulation_ends)
        self._epoch = 0
        self._reset_stats()

    def on_epoch_start(self, ctx: StrategyContext, epoch: int) -> None:
        self._epoch = epoch
        self._reset_stats()

    def _reset_stats(self) -> None:
        self._coeff_sum: dict[str, float] = {}
        self._ratio_sum: dict[str, float] = {}
        self._batches = 0

    def coefficients(
        self, model: JointFusionModel, latents: Mapping[str, Any], target: Any
    ) -> tuple[dict[str, float], dict[str, float]]:
        """``(k_m, rho_m)`` for one batch (no window applied)."""
        ratios = mean_ratios(unimodal_scores(model, latents, target))
        return {m: tpami_coefficient(r, self.alpha) for m, r in ratios.items()}, ratios

    def on_after_backward(
        self, ctx: StrategyContext, output: FusionOutput, batch: Mapping[str, Any]
    ) -> None:
        model = ctx.model
        coeffs, ratios = self.coefficients(model, output.latents, batch["target"])
        if self._epoch not in self.window:
            coeffs = dict.fromkeys(coeffs, 1.0)
        else:
            with torch.no_grad():
                for m in model.modalities:
                    for p in model.encoders[m].parameters():
                        grad = p.grad
                        if grad is None:
                            continue
                        std = gradient_noise_std(grad) if self.noise else None
                        if coeffs[m] != 1.0:
                            grad.mul_(coeffs[m])
                        if std is not None:
                            grad.addcmul_(torch.randn_like(grad), std)
        self._batches += 1
        for m in model.modalities:
            self._coeff_sum[m] = self._coeff_sum.get(m, 0.0) + coeffs[m]
            self._ratio_sum[m] = self._ratio_sum.get(m, 0.0) + ratios[m]

    def on_epoch_end(
        self, ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None
    ) -> dict[str, Any]:
        n = max(self._batches, 1)
        return {
            "modulation_active": epoch in self.window,
            "coeff_mean": {m: v / n for m, v in self._coeff_sum.items()},
            "ratio_mean": {m: v / n for m, v in self._ratio_sum.items()},
        }

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "alpha": self.alpha,
            "noise": self.noise,
            **self.window.describe(),
        }
