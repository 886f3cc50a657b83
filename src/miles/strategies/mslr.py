"""MSLR: modality-specific learning rates (Yao and Mihalcea, Findings of ACL 2022).

Y. Yao and R. Mihalcea, "Modality-specific Learning Rates for Effective Multimodal Additive
Late-fusion", Findings of ACL 2022, pp. 1824-1834 (doi:10.18653/v1/2022.findings-acl.143).

The paper's point: the best unimodal models of different modalities often need learning rates
that differ by orders of magnitude, so one global rate for the fused model leaves some encoders
barely trained ("vanishing gradient for some modalities"). MSLR gives each modality's encoder its
own rate, starting from the rate that was best for that modality's unimodal model (see
:func:`miles.training.lr_sweep.sweep_unimodal_lrs`). The paper studies three ways to assign them:

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
from miles.strategies.base import (
    ComparisonSetup,
    EvalResult,
    Strategy,
    StrategyContext,
    check_aux_weights,
)
from miles.strategies.registry import register_strategy

MEANS = ("geometric", "arithmetic")


def _check_lrs(lrs: Mapping[str, float] | None, *, required: bool, who: str) -> dict[str, float]:
    """Validate ``{modality: lr}``: non-empty, string names, positive finite numbers."""
    if lrs is None:
        if required:
            raise ValueError(f"{who}: unimodal_lrs is required ({{modality: learning rate}})")
        return {}
    if not isinstance(lrs, Mapping) or not lrs:
        raise ValueError(f"{who}: unimodal_lrs must be a non-empty mapping, got {lrs!r}")
    out: dict[str, float] = {}
    for name, value in lrs.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{who}: modality names must be non-empty strings, got {name!r}")
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ValueError(
                f"{who}: unimodal_lrs[{name!r}] must be a positive finite number, got {value!r}"
            )
        out[name] = float(value)
    return out


def _check_names(expected: Sequence[str], given: Mapping[str, float], who: str) -> None:
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{who}: unimodal_lrs names must match the model's modalities {list(expected)}; "
            f"missing {missing}, unknown {extra}"
        )


class _MSLRBase(Strategy):
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
        self.unimodal_lrs = _check_lrs(unimodal_lrs, required=self._lrs_required, who=self.name)
        if not isinstance(head_follows_encoder, bool):
            raise TypeError(
                f"{self.name}: head_follows_encoder must be a bool, got {head_follows_encoder!r}"
            )
        self.head_follows_encoder = head_follows_encoder
        self.aux_weights = check_aux_weights(aux_weights)
        self.base_lr: float | None = None
        self.lrs: dict[str, float] | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._modalities: tuple[str, ...] = ()
        self._restored = False  # load_state_dict ran before on_fit_start

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

    @classmethod
    def comparison_runs(cls, setup: ComparisonSetup) -> list[tuple[str, dict[str, Any]]]:
        """One run, started from the swept best unimodal rates (the paper's starting point)."""
        return [("", {"unimodal_lrs": setup.unimodal_lrs()})]

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "unimodal_lrs": dict(self.unimodal_lrs) or None,
            "shared_lr": "base",
        }


@register_strategy("mslr-k")
class MSLRKeep(_MSLRBase):
    """MSLR-Keep (Yao and Mihalcea, Findings of ACL 2022): each encoder keeps its unimodal rate.

    Modality ``m``'s encoder and auxiliary head train at ``unimodal_lrs[m]`` (the rate that was
    best for ``m``'s unimodal model, e.g. from :func:`miles.training.lr_sweep.sweep_unimodal_lrs`)
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


@register_strategy("mslr-s")
class MSLRSmooth(_MSLRBase):
    """MSLR-Smooth (Yao and Mihalcea, Findings of ACL 2022): unimodal rates pulled to their mean.

    ``lr_m = exp((1 - s) ln lr*_m + s ln G)`` with ``G`` the geometric mean of the ``lr*`` (default,
    ``mean="geometric"``: rates differ by orders of magnitude, so this interpolates on a log
    scale), or ``lr_m = (1 - s) lr*_m + s A`` with ``A`` their arithmetic mean
    (``mean="arithmetic"``). ``s = 0`` is Keep, ``s = 1`` gives every modality the same rate. The
    rates are fixed for the run. When all unimodal rates are equal they are returned unchanged
    (so Smooth is Keep bit for bit, without floating-point noise from ``exp(log(.))``).

    Args:
        unimodal_lrs: as for :class:`MSLRKeep`.
        smoothing: ``s`` in ``[0, 1]``; default 0.5. The paper's value is not in our copy (see the
            module docstring), so treat it as a hyper-parameter to tune.
        mean: ``"geometric"`` (default) or ``"arithmetic"``.
        head_follows_encoder, aux_weights: as for :class:`MSLRKeep`.

    Loss and groups as for :class:`MSLRKeep` (``uses_aux_losses = True``).
    """

    name = "mslr-s"

    def __init__(
        self,
        unimodal_lrs: Mapping[str, float] | None = None,
        smoothing: float = 0.5,
        mean: str = "geometric",
        head_follows_encoder: bool = True,
        aux_weights: float | dict[str, float] = 1.0,
    ) -> None:
        super().__init__(unimodal_lrs, head_follows_encoder, aux_weights)
        if (
            isinstance(smoothing, bool)
            or not isinstance(smoothing, (int, float))
            or not 0.0 <= smoothing <= 1.0
        ):
            raise ValueError(f"mslr-s: smoothing must be in [0, 1], got {smoothing!r}")
        if mean not in MEANS:
            raise ValueError(f"mslr-s: mean must be one of {MEANS}, got {mean!r}")
        self.smoothing = float(smoothing)
        self.mean = mean

    def initial_lrs(self, modalities: Sequence[str], base_lr: float) -> dict[str, float]:
        return smooth_lrs({m: self.unimodal_lrs[m] for m in modalities}, self.smoothing, self.mean)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "smoothing": self.smoothing, "mean": self.mean}


def smooth_lrs(
    lrs: Mapping[str, float], smoothing: float, mean: str = "geometric"
) -> dict[str, float]:
    """MSLR-Smooth's rule, exposed for inspection: interpolate each rate towards the mean."""
    values = list(lrs.values())
    if smoothing == 0 or len(set(values)) <= 1:
        return dict(lrs)
    s = smoothing
    if mean == "geometric":
        log_g = sum(math.log(v) for v in values) / len(values)
        return {m: math.exp((1 - s) * math.log(v) + s * log_g) for m, v in lrs.items()}
    if mean == "arithmetic":
        a = sum(values) / len(values)
        return {m: (1 - s) * v + s * a for m, v in lrs.items()}
    raise ValueError(f"mean must be one of {MEANS}, got {mean!r}")


@register_strategy("mslr-d")
class MSLRDynamic(_MSLRBase):
    """MSLR-Dynamic (Yao and Mihalcea, Findings of ACL 2022): rates follow unimodal validation.

    After every validation the unimodal metric of each head, ``M_m(t)``, joins a window of the last
    ``window`` values. Every ``update_every`` epochs (``t % update_every == 0``)::

        lr_m <- lr_m * (M_m(t) / mean(M_m(t - window + 1 .. t))) ** strength

    A modality still improving (current metric above its recent mean) speeds up; one that
    stagnates or degrades slows down. Updates compound; the new rates apply from the next epoch.
    A modality whose current metric or window mean is 0 (or not finite) is left unchanged that
    time (the ratio would zero or blow up its rate), which the epoch record notes.

    Args:
        unimodal_lrs: starting rates (as for :class:`MSLRKeep`); ``None`` starts every modality at
            the trainer's base rate.
        window: how many recent validation metrics form the mean; default 5 (the public
            re-implementation's ``history_length``).
        update_every: epochs between updates; default ``None`` = ``window`` (as in that
            re-implementation; ``1`` updates after every epoch).
        strength: exponent on the ratio; 1 (default) is the plain ratio, 0 disables updates (then
            this is Keep bit for bit).
        head_follows_encoder, aux_weights: as for :class:`MSLRKeep`.

    Uses the auxiliary losses (``uses_aux_losses = True``): the unimodal heads it reads must be
    trained. Its window and current rates are in ``state_dict``, so a resumed run matches an
    uninterrupted one.
    """

    name = "mslr-d"
    _lrs_required = False

    def __init__(
        self,
        unimodal_lrs: Mapping[str, float] | None = None,
        window: int = 5,
        update_every: int | None = None,
        strength: float = 1.0,
        head_follows_encoder: bool = True,
        aux_weights: float | dict[str, float] = 1.0,
    ) -> None:
        super().__init__(unimodal_lrs, head_follows_encoder, aux_weights)
        for label, value in (("window", window), ("update_every", update_every)):
            if value is None and label == "update_every":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"mslr-d: {label} must be a positive int, got {value!r}")
        if (
            isinstance(strength, bool)
            or not isinstance(strength, (int, float))
            or not math.isfinite(strength)
            or strength < 0
        ):
            raise ValueError(f"mslr-d: strength must be a finite number >= 0, got {strength!r}")
        self.window = window
        self.update_every = update_every if update_every is not None else window
        self.strength = float(strength)
        self.history: dict[str, list[float]] = {}

    def _reset(self) -> None:
        self.history = {}

    def initial_lrs(self, modalities: Sequence[str], base_lr: float) -> dict[str, float]:
        if self.unimodal_lrs:
            return {m: self.unimodal_lrs[m] for m in modalities}
        return {m: base_lr for m in modalities}

    def _update(self, epoch: int, val: EvalResult) -> dict[str, Any]:
        assert self.lrs is not None
        for m in self.lrs:
            window = self.history.setdefault(m, [])
            window.append(float(val.unimodal[m]))
            del window[: -self.window]
        if epoch % self.update_every != 0:
            return {"updated": False}
        ratios: dict[str, float | None] = {}
        for m, window in self.history.items():
            current, mean = window[-1], sum(window) / len(window)
            if not (current > 0 and mean > 0 and math.isfinite(current) and math.isfinite(mean)):
                ratios[m] = None
                continue
            ratios[m] = current / mean
            if self.strength != 0:
                self.lrs[m] = self.lrs[m] * ratios[m] ** self.strength  # type: ignore[operator]
        return {"updated": True, "ratio": ratios}

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
        if self._optimizer is None:
            self._restored = True  # on_fit_start will apply these instead of starting over
        else:
            if set(self._modalities) != set(self.lrs):
                raise ValueError(
                    f"mslr-d: saved rates are for {sorted(self.lrs)}, the model has "
                    f"{list(self._modalities)}"
                )
            self._apply()

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "window": self.window,
            "update_every": self.update_every,
            "strength": self.strength,
        }
