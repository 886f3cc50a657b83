"""MMCosine: modality-wise normalised logits with a scaling factor (Xu et al., ICASSP 2023).

Reference: R. Xu et al. (Xu, Feng, Zhang, Hu), "MMCosine: Multi-Modal Cosine Loss Towards Balanced
Audio-Visual Fine-Grained Learning", ICASSP 2023 (arXiv 2303.05338), and the authors' code
(github.com/GeWu-Lab/MMCosine_ICASSP23, ``main_CD.py``; read at commit 214797c).
"""

from __future__ import annotations

from typing import Any

from miles.models.fusion import JointFusionModel
from miles.models.fusions.cosine import READOUTS, cosine_fusion
from miles.strategies.joint import Joint
from miles.strategies.registry import register_strategy
from miles.validation import check_choice, check_positive

__all__ = ["MMCosine"]


@register_strategy("mmcosine")
class MMCosine(Joint):
    """Train the fused head on per-modality cosine logits: ``s * sum_m cos(z_m, W_m[c])``.

    The fused linear head is replaced, before the optimizer exists, by its MMCosine variant
    (:func:`miles.models.fusions.cosine.cosine_fusion`, same weights): in training mode each
    modality's latent and each class row of its head block ``W_m`` are L2-normalised, the bias is
    left out, and the cosines are scaled by ``s`` and summed. The loss is the cross-entropy of
    those logits (the authors' ``criterion(out, label)``); the unimodal heads train on detached
    latents as probes, as in :class:`~miles.strategies.joint.Joint` (``uses_aux_losses = False``).

    Readouts: the fused prediction in eval mode (validation, test, model selection) is the
    ordinary linear head with its bias, ``readout="linear"``, as the authors' ``valid`` predicts
    (``softmax(out)`` of the model's linear fusion); note that the bias receives no gradient in
    training and stays at its initial value. ``readout="cosine"`` predicts with the cosine sum
    instead, as BalanceBenchmark does. The fusion's per-modality share
    (``model.fusion.modality_logits``) is ``s * cos(z_m, W_m[c])``, the authors' "approximate
    uni-modal evaluation"; the unimodal columns of our tables come from the probe heads.

    Args:
        scaling: ``s``. Default 10: the authors' ``--scaling`` default and README command
            (BalanceBenchmark uses 15).
        readout: ``"linear"`` (default, the authors) or ``"cosine"`` (BalanceBenchmark).

    Where we depart from the authors' code:

    - Their supplementary NCE term (``lam * NCE(a, v, y)``) is left out; its weight defaults to 0
      in their code, so the default objective is the same.
    - Fusions: the authors support concat, gated and FiLM fusion; we support ``concat`` (``W_m`` =
      the head's columns that read ``z_m``, exactly theirs) and ``sum`` (every modality reads the
      whole head weight, the natural extension); other fusions raise ``NotImplementedError``.
    - Any number of modalities (theirs: two).
    - Optimiser, schedule and model selection are the run's (theirs: SGD 1e-3, momentum 0.9,
      weight decay 1e-4, StepLR(100, 0.1), 200 epochs, batch 32, best epoch on the test set).

    And from BalanceBenchmark: ``s = 15`` there, and its fused prediction is the cosine sum
    (``readout="cosine"``). No setting recovers the plain linear head, so there is no neutral
    setting.
    """

    name = "mmcosine"
    unused_parameters = True  # the fused head's bias gets no gradient (matters under DDP)
    uses_aux_losses = False

    def __init__(self, scaling: float = 10.0, readout: str = "linear") -> None:
        self.scaling = check_positive("scaling", scaling)
        self.readout = check_choice("readout", readout, READOUTS)

    def configure_model(self, model: JointFusionModel) -> None:
        try:
            model.fusion = cosine_fusion(model.fusion, scaling=self.scaling, readout=self.readout)
        except NotImplementedError as exc:
            raise NotImplementedError(f"{type(self).__name__}: {exc}") from None
        super().configure_model(model)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "scaling": self.scaling, "readout": self.readout}
