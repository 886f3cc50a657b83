"""MSLR: modality-specific learning rates (Yao and Mihalcea, Findings of ACL 2022).

Y. Yao and R. Mihalcea, "Modality-specific Learning Rates for Effective Multimodal Additive
Late-fusion", Findings of ACL 2022, pp. 1824-1834 (doi:10.18653/v1/2022.findings-acl.143).

The paper's point: the best unimodal models of different modalities often need learning rates
that differ by orders of magnitude, so one global rate for the fused model leaves some encoders
barely trained. MSLR gives each modality its own rate, starting from the rate that was best for
that modality's unimodal model ("all the MSLR strategies rely on searching for a best unimodal
learning rate for each modality before the multimodal training starts", Sec. 3.5; found "by a
linear search based on the metrics on the validation sets", Sec. 5.1; here
:func:`miles.studies.lr_sweep.sweep_unimodal_lrs`). Three strategies:

* **Keep** (``mslr-k``, Sec. 3.2): "keeping the best fine-tuned unimodal learning rate for
  different modalities while training the late-fusion model".
* **Smooth** (``mslr-s``, Sec. 3.3): "shifting the learning rate for different modalities to be
  closer to the average learning rate of all modalities, resulting in smaller margins". The paper
  gives no formula, only three examples; :mod:`miles.strategies.mslr_s` shows how each rule we
  offer fits them.
* **Dynamic** (``mslr-d``, Sec. 3.4, Eq. 2): ``lr_{t,m} = lr_{0,m} * r_{t,m}`` after every epoch,
  ``r`` the modality's validation performance over its mean over the previous 5 epochs (Sec. 5.1).

Setting in this library. The paper's models are additive late-fusion networks ``f(m, n) = f_M(m) +
f_N(n)`` (Eq. 1) trained with the fused loss only: **no auxiliary unimodal losses** (default
``aux_losses=False``; ``True`` adds them, as MILES's joint+aux objective does). The MILES paper
uses MSLR as a joint-fusion baseline ("distinct learning rates for the multimodal model and each
encoder"), which is what this is: modality ``m``'s optimizer group (its encoder, and its unimodal
head) trains at ``m``'s rate, the fused head (the shared group) at the trainer's base rate, the
best joint rate in a tuned comparison. A per-slice rate for the fused linear layer (the exact
analogue of Eq. 1's ``f_N``) is not expressible with one ``nn.Linear`` in PyTorch param groups.
Without auxiliary losses the unimodal heads are online probes on detached latents, as in
``joint``: reported, never reaching an encoder. With equal rates MSLR is therefore ``joint``
exactly (``joint+aux`` with ``aux_losses=True``). Warm-starting from the unimodal checkpoints (the
paper's pipeline) is not done: every method starts from the same initial weights.
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

    Args:
        unimodal_lrs: ``{modality: best unimodal learning rate}``.
        head_follows_encoder: modality ``m``'s unimodal head trains at ``m``'s rate (default) or
            at the base rate with the fused head.
        aux_losses: add the unimodal losses to the fused one (``L = L_fused + sum_m w_m L_m``,
            the heads then train the encoders). Default ``False``: the paper has none.
        aux_weights: ``w_m`` when ``aux_losses=True`` (1, as in ``joint+aux``).
    """

    name = "mslr"
    uses_aux_losses = False
    _lrs_required = True

    def __init__(
        self,
        unimodal_lrs: Mapping[str, float] | None = None,
        head_follows_encoder: bool = True,
        aux_losses: bool = False,
        aux_weights: float | dict[str, float] = 1.0,
    ) -> None:
        super().__init__(aux_weights)
        self.aux_losses = check_bool("aux_losses", aux_losses)
        if not aux_losses and self.aux_weights != 1.0:
            raise ValueError(
                f"{self.name}: aux_weights={aux_weights!r} weigh the auxiliary losses, which are "
                "off (aux_losses=False, the paper); pass aux_losses=True to use them"
            )
        self.uses_aux_losses = self.aux_losses
        self.unimodal_lrs = _check_lrs(unimodal_lrs, required=self._lrs_required, who=self.name)
        self.head_follows_encoder = check_bool("head_follows_encoder", head_follows_encoder)
        self.base_lr: float | None = None
        self.lrs: dict[str, float] | None = None
        #: the rates of the first epoch (Dynamic's ``lr_{0,m}``)
        self.start_lrs: dict[str, float] = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._modalities: tuple[str, ...] = ()
        self._restored = False  # load_state_dict gave rates for on_fit_start to apply

    # -- what the rates are ----------------------------------------------------------------------
    def initial_lrs(
        self, modalities: Sequence[str], base_lr: float | None
    ) -> dict[str, float] | None:
        """Keep: every modality starts (and stays) at its best unimodal rate. ``base_lr=None``
        (the optimizer does not exist yet): ``None`` when the rates need it."""
        return {m: self.unimodal_lrs[m] for m in modalities}

    # -- hooks -----------------------------------------------------------------------------------
    def configure_model(self, model: JointFusionModel) -> None:
        """Heads attached (they train the encoders) only with ``aux_losses=True``."""
        model.detach_unimodal_heads = not self.aux_losses

    def param_groups(self, model: JointFusionModel) -> list[dict[str, Any]]:
        """Modality groups carry their rate when it is known without the base rate; the shared
        group uses the base rate (``on_fit_start`` sets every rate in any case)."""
        if self.unimodal_lrs:
            _check_names(model.modalities, self.unimodal_lrs, self.name)
        groups = modality_param_groups(model, head_follows_encoder=self.head_follows_encoder)
        start = self.initial_lrs(model.modalities, None) if self.unimodal_lrs else None
        if start is not None:
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
        start = self.initial_lrs(modalities, self.base_lr)
        assert start is not None
        self.start_lrs = dict(start)
        if not self._restored:  # a fresh fit starts over, even when this object trained before
            self.lrs = dict(start)
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

    def _update(self, ctx: StrategyContext, epoch: int, val: EvalResult) -> dict[str, Any]:
        """Keep and Smooth never change their rates."""
        return {}

    def on_epoch_end(
        self, ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None
    ) -> dict[str, Any]:
        if self.lrs is None:
            raise RuntimeError(f"{type(self).__name__}.on_fit_start was not called")
        record = self._update(ctx, epoch, val)
        self._apply()
        # the rates the *next* epoch uses (the history's lr_* columns show this epoch's)
        return {**record, "lrs": dict(self.lrs)}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        info = {
            **super().describe(),
            "unimodal_lrs": dict(self.unimodal_lrs) or None,
            "shared_lr": "base",
            "aux_losses": self.aux_losses,
        }
        if not self.head_follows_encoder:
            info["head_follows_encoder"] = False
        return info


def smooth_lrs(
    lrs: Mapping[str, float],
    smoothing: float,
    mean: str = "geometric",
    *,
    target: float | None = None,
) -> dict[str, float]:
    """MSLR-Smooth's rule: move each rate a fraction ``smoothing`` of the way to a target.

    ``target=None``: the mean of the rates (``mean``: geometric or arithmetic); a number: that
    rate (e.g. the best joint rate). ``mean="geometric"`` interpolates on a log scale,
    ``lr' = lr^(1 - s) * T^s``; ``"arithmetic"`` linearly, ``lr' = (1 - s) lr + s T``. A rate
    already equal to the target is returned unchanged (no ``exp(log(.))`` noise).
    """
    if mean not in MEANS:
        raise ValueError(f"mean must be one of {MEANS}, got {mean!r}")
    values = list(lrs.values())
    if target is None:
        if len(set(values)) <= 1:
            return dict(lrs)
        if mean == "geometric":
            target = math.exp(sum(math.log(v) for v in values) / len(values))
        else:
            target = sum(values) / len(values)
    s = smoothing
    out = {}
    for m, v in lrs.items():
        if s == 0 or v == target:
            out[m] = v
        elif mean == "geometric":
            out[m] = math.exp((1 - s) * math.log(v) + s * math.log(target))
        else:
            out[m] = (1 - s) * v + s * target
    return out
