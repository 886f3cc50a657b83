"""MSLR: modality-specific learning rates (Yao and Mihalcea, Findings of ACL 2022).

Y. Yao and R. Mihalcea, "Modality-specific Learning Rates for Effective Multimodal Additive
Late-fusion", Findings of ACL 2022, pp. 1824-1834 (doi:10.18653/v1/2022.findings-acl.143).

The paper's point: the best unimodal models of different modalities often need learning rates
that differ by orders of magnitude, so one global rate for the fused model leaves some encoders
barely trained ("vanishing gradient for some modalities"). MSLR gives each modality's encoder its
own rate, starting from the rate that was best for that modality's unimodal model (see
:func:`miles.studies.lr_sweep.sweep_unimodal_lrs`). The paper studies three ways to assign them:

* **Keep** (``mslr-k``): each encoder keeps its best unimodal rate for the whole run.
* **Smooth** (``mslr-s``): the unimodal rates are pulled towards their common mean by a smoothing
  factor, because rates tuned in isolation can be too far apart once the modalities interact.
* **Dynamic** (``mslr-d``): start from the unimodal rates and rescale each modality's rate from
  its recent unimodal validation performance.

Source caveat. Our stored copies hold the paper's abstract, not its method section, so the exact
Smooth and Dynamic formulas below are our reading, not quotations: Dynamic follows a public
third-party re-implementation (rate *= current unimodal validation accuracy / mean of the last
``window`` ones, every ``window`` epochs, ``window = 5``), Smooth is an interpolation towards the
(geometric, by default) mean. Every choice is an argument, so a closer reading of the paper needs
no code change; check them against the PDF before quoting the paper's numbers.

Setting in this library. The paper fuses additively (sum of unimodal logits) and initialises the
fused model from the fine-tuned unimodal models. The MILES paper uses MSLR as a joint-fusion
baseline; here it trains our :class:`~miles.models.fusion.JointFusionModel` from scratch with the
fused loss plus the auxiliary unimodal losses (``uses_aux_losses = True``): the unimodal heads are
what Dynamic reads, and with every rate equal to the base rate MSLR is exactly ``joint+aux``.
Modality ``m``'s group (encoder ``m`` and its head) gets the modality rate; the fused head (the
shared group) keeps the trainer's base rate. Warm-starting from unimodal checkpoints is not done.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from miles.models.fusion import JointFusionModel
from miles.models.param_groups import modality_param_groups
from miles.strategies.base import EvalResult, StrategyContext
from miles.strategies.joint import JointAux
from miles.validation import check_bool, check_mapping, check_positive

MEANS = ("geometric", "arithmetic")


def _check_lrs(lrs: Mapping[str, float] | None, *, required: bool, who: str) -> dict[str, float]:
    """Validate ``{modality: lr}``: non-empty, string names, positive finite numbers."""
    if lrs is None:
        if required:
            raise ValueError(f"{who}: unimodal_lrs is required ({{modality: learning rate}})")
        return {}
    return check_mapping("unimodal_lrs", lrs, check_positive)


def _check_names(expected: Sequence[str], given: Mapping[str, float], who: str) -> None:
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{who}: unimodal_lrs names must match the model's modalities {list(expected)}; "
            f"missing {missing}, unknown {extra}"
        )


class _MSLRBase(JointAux):
    """Shared mechanism: one optimizer group per modality whose ``lr`` this strategy owns.

    Subclasses say what the rates are at the start (:meth:`initial_lrs`) and, for Dynamic, how
    they move (:meth:`_update`). The rates in force are ``self.lrs``; they are written into the
    optimizer groups at ``on_fit_start`` and after every update, and reported each epoch.
    """

    name = "mslr"
    uses_aux_losses = True
    _lrs_required = True

    def __init__(
        self,
        unimodal_lrs: Mapping[str, float] | None = None,
        head_follows_encoder: bool = True,
        aux_weights: float | dict[str, float] = 1.0,
    ) -> None:
        super().__init__(aux_weights)
        self.unimodal_lrs = _check_lrs(unimodal_lrs, required=self._lrs_required, who=self.name)
        self.head_follows_encoder = check_bool("head_follows_encoder", head_follows_encoder)
        self.base_lr: float | None = None
        self.lrs: dict[str, float] | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._modalities: tuple[str, ...] = ()
        self._restored = False  # load_state_dict gave rates for on_fit_start to apply

    # -- what the rates are ----------------------------------------------------------------------
    def initial_lrs(self, modalities: Sequence[str], base_lr: float) -> dict[str, float]:
        """Keep: every modality starts (and stays) at its best unimodal rate."""
        return {m: self.unimodal_lrs[m] for m in modalities}

    # -- hooks -----------------------------------------------------------------------------------
    def param_groups(self, model: JointFusionModel) -> list[dict[str, Any]]:
        """Modality groups carry their rate explicitly; the shared group uses the base rate."""
        if self.unimodal_lrs:
            _check_names(model.modalities, self.unimodal_lrs, self.name)
        groups = modality_param_groups(model, head_follows_encoder=self.head_follows_encoder)
        if self.unimodal_lrs:  # known before the optimizer exists (Dynamic without them: base)
            start = self.initial_lrs(model.modalities, base_lr=math.nan)
            for group in groups:
                if group["modality"] is not None:
                    group["lr"] = start[group["modality"]]
        return groups

    def on_fit_start(self, ctx: StrategyContext) -> None:
        modalities = ctx.model.modalities
        if self.unimodal_lrs:
            _check_names(modalities, self.unimodal_lrs, self.name)
        self.base_lr = float(ctx.optimizer.defaults["lr"])
        groups = {g.get("modality"): g for g in ctx.optimizer.param_groups}
        missing = [m for m in modalities if m not in groups]
        if missing:
            raise ValueError(
                f"{self.name}: the optimizer has no parameter group for modalities {missing}; "
                "build it from this strategy's param_groups(model)"
            )
        # keep the optimizer, not its group dicts: Optimizer.load_state_dict (resume) replaces them
        self._optimizer, self._modalities = ctx.optimizer, tuple(modalities)
        if not self._restored:  # a fresh fit starts over, even when this object trained before
            self.lrs = self.initial_lrs(modalities, self.base_lr)
            self._reset()
        elif self.lrs is None or set(self.lrs) != set(modalities):
            raise ValueError(
                f"{self.name}: restored rates are for {sorted(self.lrs or {})}, the model has "
                f"{list(modalities)}"
            )
        self._restored = False
        self._apply()

    def _reset(self) -> None:
        """Forget what a previous fit learned (Dynamic's window)."""

    def _apply(self) -> None:
        if self.lrs is None or self._optimizer is None:
            return
        for group in self._optimizer.param_groups:
            modality = group.get("modality")
            if modality in self.lrs:
                group["lr"] = self.lrs[modality]

    def _update(self, epoch: int, val: EvalResult) -> dict[str, Any]:
        """Keep and Smooth never change their rates."""
        return {}

    def on_epoch_end(
        self, ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None
    ) -> dict[str, Any]:
        if self.lrs is None:
            raise RuntimeError(f"{type(self).__name__}.on_fit_start was not called")
        record = self._update(epoch, val)
        self._apply()
        # the rates the *next* epoch uses (the history's lr_* columns show this epoch's)
        return {**record, "lrs": dict(self.lrs)}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "unimodal_lrs": dict(self.unimodal_lrs) or None,
            "shared_lr": "base",
        }
