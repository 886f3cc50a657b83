"""MSLR-Keep: each encoder keeps its best unimodal learning rate (method: ``mslr_base``)."""

from __future__ import annotations

from miles.strategies.mslr_base import _MSLRBase
from miles.strategies.registry import register_strategy


@register_strategy("mslr-k")
class MSLRKeep(_MSLRBase):
    """MSLR-Keep (Yao and Mihalcea, Findings of ACL 2022, Sec. 3.2): each encoder keeps its
    unimodal rate.

    Modality ``m``'s encoder (and unimodal head) trains at ``unimodal_lrs[m]`` (the rate that was
    best for ``m``'s unimodal model, e.g. from :func:`miles.studies.lr_sweep.sweep_unimodal_lrs`)
    for the whole run; the fused head trains at the trainer's base rate. Loss: the fused loss
    alone (the paper), or fused + every unimodal loss with ``aux_losses=True``. With every
    ``unimodal_lrs[m]`` equal to the base rate this is ``joint`` exactly (``joint+aux`` with
    ``aux_losses=True``).

    Args:
        unimodal_lrs: ``{modality: learning rate}``, positive and finite, one per model modality
            (checked at ``param_groups``/``on_fit_start``). No default: the paper takes them from
            the unimodal learning-rate search.
        head_follows_encoder: modality ``m``'s unimodal head trains at ``m``'s rate (default) or
            at the base rate with the fused head.
        aux_losses: add the unimodal losses (default ``False``, the paper).
        aux_weights: ``w_m`` of the auxiliary losses when ``aux_losses=True``; 1 (default).
    """

    name = "mslr-k"
