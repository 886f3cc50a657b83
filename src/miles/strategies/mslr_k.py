"""MSLR-Keep: each encoder keeps its best unimodal learning rate (method: ``mslr_base``)."""

from __future__ import annotations

from miles.strategies.mslr_base import _MSLRBase
from miles.strategies.registry import register_strategy


@register_strategy("mslr-k")
class MSLRKeep(_MSLRBase):
    """MSLR-Keep (Yao and Mihalcea, Findings of ACL 2022): each encoder keeps its unimodal rate.

    Modality ``m``'s encoder and auxiliary head train at ``unimodal_lrs[m]`` (the rate that was
    best for ``m``'s unimodal model, e.g. from :func:`miles.studies.lr_sweep.sweep_unimodal_lrs`)
    for the whole run; the fused head trains at the trainer's base rate. Loss: fused + every
    unimodal loss (``uses_aux_losses = True``), so with every ``unimodal_lrs[m]`` equal to the base
    rate this is ``joint+aux`` exactly.

    Args:
        unimodal_lrs: ``{modality: learning rate}``, positive and finite, one per model modality
            (checked at ``param_groups``/``on_fit_start``). No default: the paper takes them from
            the unimodal learning-rate search.
        head_follows_encoder: modality ``m``'s auxiliary head trains at ``m``'s rate (default) or
            at the base rate with the fused head. The paper has no auxiliary heads (its unimodal
            predictions are the summands of the fused one), so the default mirrors it.
        aux_weights: ``w_m`` of the auxiliary losses; 1 (default) as in ``joint+aux``.

    Unsupported: warm-starting from the unimodal checkpoints (the paper's pipeline) and additive
    logit fusion; this is the joint-fusion adaptation the MILES paper compares against.
    """

    name = "mslr-k"
