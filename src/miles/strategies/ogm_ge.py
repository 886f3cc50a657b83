"""OGM-GE: on-the-fly gradient modulation with generalization enhancement (Peng et al., 2022)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from miles.strategies.ogm import NOISE_EPS, OGM
from miles.strategies.registry import register_strategy


def gradient_noise_std(grad: Tensor) -> Tensor:
    """Standard deviation of the GE noise: ``std(grad) + 1e-8`` (unbiased std, as the authors).

    A 0-d tensor on ``grad``'s device: no host synchronisation per parameter and batch. A
    one-element gradient has no spread: its std is taken as 0 (torch's unbiased std is NaN).
    """
    std = grad.std() if grad.numel() > 1 else grad.new_zeros(())
    return std + NOISE_EPS


def step_noise_std(step: Tensor) -> Tensor:
    """Standard deviation of the GE noise in step mode: ``std(step)``, the unbiased spread of the
    elements of the parameter's own unmodulated step (0 for one element)."""
    return step.std() if step.numel() > 1 else step.new_zeros(())


@register_strategy("ogm-ge")
class OGMGE(OGM):
    """OGM with Generalization Enhancement (OGM-GE; Peng et al., CVPR 2022, Sec. 3.3).

    Everything of :class:`~miles.strategies.ogm.OGM` (same options and defaults, fused loss only,
    ``uses_aux_losses = False``), plus Gaussian noise on the modulated parameters of **every**
    encoder (the dominant one and the others, whose ``k = 1``), inside the modulation window, as
    the paper's Alg. 1 (``theta^u <- theta^u - eta (k^u g + h)`` for every ``u``) and the
    authors' code (``main.py`` l.136-148, "bug fixed" version) do:

    * ``mode="gradient"`` (the authors): ``grad <- k * grad + N(0, (std(grad) + 1e-8)^2)``,
      elementwise, with ``std(grad)`` the unbiased standard deviation of that parameter's
      *unmodulated* gradient over its elements; the noise then enters the optimizer (SGD's
      momentum buffer). Under Adam it also enters the second moment, inflating it, which slows
      every encoder: the reason for step mode.
    * ``mode="step"`` (ours, scaled consistently): after the unmodulated step ``D = theta_1 -
      theta_0``, ``theta <- theta_0 + k D - std(D) * N(0, 1)``: noise with the spread of the
      parameter's own unmodulated step, outside the optimizer's state. Under plain SGD
      (``D = -eta g``) it is the authors' noise ``-eta h`` (up to their 1e-8), draw for draw.

    The noise is drawn from torch's global generator of the parameter's device, so a run is
    reproducible with the same seed and resumable (the trainer checkpoints the generator states;
    on GPU, bit-exactness also needs deterministic kernels). ``alpha = 0`` is *not* vanilla joint
    training: the noise remains. In the per-epoch record, ``modulated_fraction`` counts batches
    with some ``k_m < 1``; the noise is added in every batch of an epoch whose
    ``modulation_active`` is true.
    """

    name = "ogm-ge"
    gaussian_noise = True

    def _modulate_gradients(self, params: list[nn.Parameter], coeff: float) -> None:
        for p in params:
            grad = p.grad
            if grad is None:
                continue
            std = gradient_noise_std(grad)  # of the original gradient, before the scaling
            if coeff != 1.0:
                grad.mul_(coeff)
            # grad += noise * std in one kernel (same rounding as the former add_(alpha=float))
            grad.addcmul_(torch.randn_like(grad), std)

    def _snapshot(
        self, params: list[nn.Parameter], coeff: float
    ) -> list[tuple[nn.Parameter, Tensor, float]]:
        """Every modulated parameter with a gradient: the noise reaches all of them."""
        return [(p, p.detach().clone(), coeff) for p in params if p.grad is not None]

    def _scale_steps(self, pending: list[tuple[nn.Parameter, Tensor, float]]) -> None:
        for p, before, coeff in pending:
            step = p - before
            std = step_noise_std(step)  # of the unmodulated step
            if coeff != 1.0:
                p.copy_(before.add(step, alpha=coeff))
            p.addcmul_(torch.randn_like(step), std, value=-1)
