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


@register_strategy("ogm-ge")
class OGMGE(OGM):
    """OGM with Generalization Enhancement (OGM-GE; Peng et al., CVPR 2022, Sec. 3.3).

    Everything of :class:`~miles.strategies.ogm.OGM` (same hyper-parameters and defaults, fused
    loss only, ``uses_aux_losses = False``), plus Gaussian noise on the encoder gradients. Inside
    the modulation window, for every parameter of **every** encoder (the modulated one and the
    others, whose ``k = 1``), following the authors' code (``main.py``, "bug fixed" version)::

        grad <- k_m * grad + N(0, (std(grad) + 1e-8)^2)

    where ``std(grad)`` is the unbiased standard deviation of that parameter's *original* (not yet
    modulated) gradient over its elements. The noise restores the gradient's stochasticity that
    the down-scaling removes (the paper's argument for better generalization). Outside the window
    neither modulation nor noise is applied. As in OGM, every encoder parameter is concerned (the
    original touches only 4-D convolution kernels, which does nothing for MLP/GRU/transformer
    encoders).

    The noise is drawn from torch's global generator of the gradient's device, so a run is
    reproducible with the same seed and resumable (the trainer checkpoints the CPU and CUDA
    generator states; on GPU, bit-exactness also needs deterministic kernels). The noise scale
    stays on the device (no host synchronisation per parameter). ``alpha = 0`` is *not* vanilla
    joint training: the noise remains. Unlike the rescaling, the noise is not normalised away by
    Adam. In the per-epoch record, ``modulated_fraction`` counts batches with some ``k_m < 1``;
    the noise is added in every batch of an epoch whose ``modulation_active`` is true.
    """

    name = "ogm-ge"
    gaussian_noise = True

    def _modulate(self, encoder: nn.Module, coeff: float) -> None:
        for p in encoder.parameters():
            grad = p.grad
            if grad is None:
                continue
            std = gradient_noise_std(grad)  # of the original gradient, before the scaling
            if coeff != 1.0:
                grad.mul_(coeff)
            # grad += noise * std in one kernel (same rounding as the former add_(alpha=float))
            grad.addcmul_(torch.randn_like(grad), std)
