"""MSLR-Dynamic: rates set from recent unimodal progress, Eq. 2 (method: ``mslr_base``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from miles.models.fusion import JointFusionModel
from miles.readouts import slice_scores
from miles.strategies.base import EvalResult, StrategyContext
from miles.strategies.mslr_base import _MSLRBase
from miles.strategies.registry import register_strategy
from miles.validation import check_choice, check_non_negative, check_positive_int

#: Eq. 2 of the paper, or the compounding rule of a public re-implementation (ours before)
RULES = ("eq2", "compounding")
#: Eq. 2 before ``window`` previous epochs exist: the mean of those there are, or hold the rate
WARMUPS = ("available", "hold")
#: the unimodal performance ``r`` is read from: the fused-head slice (the paper's ``f_N(n)``)
#: or the model's unimodal head
SIGNALS = ("slice", "head")


@register_strategy("mslr-d")
class MSLRDynamic(_MSLRBase):
    """MSLR-Dynamic (Yao and Mihalcea, Findings of ACL 2022, Sec. 3.4, Eq. 2).

    "We start from the 'Keep' strategy in the first epoch, and update the step-size for modality
    N after each epoch based on the performance of the unimodal prediction f_N(n) on the
    validation set"::

        lr_m(t + 1) = lr_m(0) * r_m(t) ** strength,   r_m(t) = M_m(t) / mean(M_m(t-5 .. t-1))

    (``rule="eq2"``, default): after epoch ``t``, ``M_m(t)`` is modality ``m``'s validation
    metric and the mean is over the *previous* ``window`` epochs (5, "we compute the ratio r with
    respect to the previous 5 epochs", Sec. 5.1), not including ``t``. The rate is always
    relative to the starting rate ``lr_m(0)``: never compounded, back to ``lr_m(0)`` on a plateau.
    Before ``window`` previous epochs exist (the paper is silent): ``warmup="available"`` (default)
    averages those there are (``r = 1`` after the first epoch, which has none); ``"hold"`` keeps
    ``lr_m(0)`` until there are ``window`` of them. The new rate applies from the next epoch.

    ``rule="compounding"`` is the rule of a public third-party re-implementation (and ours before
    we had the paper): every ``update_every`` epochs, ``lr_m <- lr_m * r ** strength`` with the
    mean over the last ``window`` epochs *including* ``t``. On a rising learning curve it ends
    well above ``lr_m(0)``, for good.

    The signal (``signal="slice"``, default) is ``m``'s share of the fused head scored on
    validation (:func:`miles.readouts.slice_scores`): the paper's ``f_N(n)``, the modality's
    additive term of the late-fusion logits. ``signal="head"`` reads the model's unimodal head
    instead (co-trained with ``aux_losses=True``, an online probe otherwise). A ratio whose
    current value or mean is 0 (or not finite) is taken as 1 that time (the rate would drop to 0
    or blow up), which the epoch record notes.

    Args:
        unimodal_lrs: starting rates ``lr_m(0)`` (as for Keep); ``None`` starts every modality at
            the trainer's base rate.
        window: previous epochs in the mean; 5 (the paper; its range: 5-10).
        rule: ``"eq2"`` (default) or ``"compounding"``.
        warmup: ``"available"`` (default) or ``"hold"`` (Eq. 2 only).
        update_every: epochs between compounding updates; ``None``: ``window`` (compounding
            only; Eq. 2 updates after every epoch).
        strength: exponent on the ratio (ours); 1 (default) is the paper, 0 is Keep bit for bit.
        signal: ``"slice"`` (default) or ``"head"``.
        head_follows_encoder, aux_losses, aux_weights: as for Keep.

    The window and the current rates are in ``state_dict``, so a resumed run matches an
    uninterrupted one.
    """

    name = "mslr-d"
    _lrs_required = False

    def __init__(
        self,
        unimodal_lrs: Mapping[str, float] | None = None,
        window: int = 5,
        rule: str = "eq2",
        warmup: str = "available",
        update_every: int | None = None,
        strength: float = 1.0,
        signal: str = "slice",
        head_follows_encoder: bool = True,
        aux_losses: bool = False,
        aux_weights: float | dict[str, float] = 1.0,
    ) -> None:
        super().__init__(unimodal_lrs, head_follows_encoder, aux_losses, aux_weights)
        self.window = check_positive_int("window", window)
        self.rule = check_choice("rule", rule, RULES)
        self.warmup = check_choice("warmup", warmup, WARMUPS)
        if update_every is not None:
            check_positive_int("update_every", update_every)
            if rule != "compounding":
                raise ValueError(
                    "update_every applies to rule='compounding' (Eq. 2 updates every epoch)"
                )
        self.update_every = update_every if update_every is not None else window
        self.strength = float(check_non_negative("strength", strength))
        self.signal = check_choice("signal", signal, SIGNALS)
        self.needs_latents = signal == "slice"  # the slice is scored on the validation latents
        #: per modality, the metrics of the last epochs (Eq. 2: the previous ``window``;
        #: compounding: the last ``window``, the current one included)
        self.history: dict[str, list[float]] = {}

    def _reset(self) -> None:
        self.history = {}

    def initial_lrs(
        self, modalities: Sequence[str], base_lr: float | None
    ) -> dict[str, float] | None:
        if self.unimodal_lrs:
            return {m: self.unimodal_lrs[m] for m in modalities}
        return None if base_lr is None else {m: base_lr for m in modalities}

    def configure_model(self, model: JointFusionModel) -> None:
        super().configure_model(model)
        if self.signal == "slice":  # fail before training when the fusion has no slices
            like = model.fused_head.weight
            probe = {m: like.new_zeros(1, size) for m, size in model.latent_sizes.items()}
            try:
                for m in model.modalities:
                    model.fusion.modality_logits(probe, m)
            except NotImplementedError as exc:
                raise NotImplementedError(
                    f"mslr-d with signal='slice': {exc}; use signal='head'"
                ) from None

    def unimodal_metrics(self, ctx: StrategyContext, val: EvalResult) -> dict[str, float]:
        """``M_m(t)`` of every modality from this epoch's validation pass."""
        if self.signal == "head":
            return {m: float(val.unimodal[m]) for m in ctx.model.modalities}
        if val.latents is None or val.target is None:
            raise RuntimeError("mslr-d: signal='slice' needs the validation latents")
        scores = slice_scores(
            ctx.model, val.latents, val.target, metric=ctx.metric, multilabel=ctx.multilabel
        )
        assert scores is not None  # checked in configure_model
        return scores

    @staticmethod
    def _ratio(current: float, values: Sequence[float]) -> float | None:
        mean = sum(values) / len(values)
        ok = current > 0 and mean > 0 and math.isfinite(current) and math.isfinite(mean)
        return current / mean if ok else None

    def _update(self, ctx: StrategyContext, epoch: int, val: EvalResult) -> dict[str, Any]:
        assert self.lrs is not None
        metrics = self.unimodal_metrics(ctx, val)
        ratios: dict[str, float | None] = {}
        if self.rule == "eq2":
            for m in self.lrs:
                previous = self.history.setdefault(m, [])
                if not previous or (self.warmup == "hold" and len(previous) < self.window):
                    ratio: float | None = 1.0
                else:
                    ratio = self._ratio(metrics[m], previous)
                ratios[m] = ratio
                factor = 1.0 if ratio is None or self.strength == 0 else ratio**self.strength
                self.lrs[m] = self.start_lrs[m] * factor
                previous.append(metrics[m])
                del previous[: -self.window]
            return {"signal": metrics, "ratio": ratios}
        for m in self.lrs:
            window = self.history.setdefault(m, [])
            window.append(metrics[m])
            del window[: -self.window]
        if epoch % self.update_every != 0:
            return {"signal": metrics, "updated": False}
        for m, window in self.history.items():
            ratios[m] = self._ratio(window[-1], window)
            if ratios[m] is not None and self.strength != 0:
                self.lrs[m] = self.lrs[m] * ratios[m] ** self.strength  # type: ignore[operator]
        return {"signal": metrics, "updated": True, "ratio": ratios}

    def state_dict(self) -> dict[str, Any]:
        if self.lrs is None:
            return {}
        return {"lrs": dict(self.lrs), "history": {m: list(v) for m, v in self.history.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        unknown = sorted(set(state) - {"lrs", "history"})
        if unknown:
            raise ValueError(f"mslr-d: unexpected state keys {unknown}")
        self.lrs = {str(m): float(v) for m, v in state["lrs"].items()}
        self.history = {str(m): [float(x) for x in v] for m, v in state["history"].items()}
        self._restored = True  # on_fit_start applies these rates instead of starting over

    def describe(self) -> dict[str, Any]:
        info = {
            **super().describe(),
            "rule": self.rule,
            "window": self.window,
            "strength": self.strength,
            "signal": self.signal,
        }
        if self.rule == "eq2":
            info["warmup"] = self.warmup
        else:
            info["update_every"] = self.update_every
        return info
