"""MILES: the Modality-Informed Learning ratE Scheduler as a torch LR scheduler.

Reference: A. Guerra-Manzanares and F. E. Shamout, "MILES: Modality-Informed Learning Rate Scheduler
for Balancing Multimodal Learning", arXiv 2510.17394 (2025), Algorithm 1, generalized to N >= 2
modalities and to two estimators of "the model without modality m" (see :mod:`miles.utilization`).

After each epoch's validation, MILES computes each modality's conditional utilization ``u_m``; if
the imbalance ``max(u) - min(u)`` exceeds ``tau`` (and not every ``u_m`` is negative), the learning
rate of the most-utilized modality's parameter groups is set to ``mu`` times its base value, for the
next epoch; otherwise every modality is back at its base value. Factors are never compounded: each
modality's factor is always 1 or ``mu``. Groups without a modality (fusion layer, fused head) are
never changed.

Example::

    optimizer = torch.optim.Adam(
        [
            {"params": audio_encoder.parameters(), "modality": "audio"},
            {"params": image_encoder.parameters(), "modality": "image"},
            {"params": fusion_head.parameters()},  # shared: "modality" missing or None
        ],
        lr=1e-3,
    )
    sched = MILES(optimizer, tau=0.2, mu=0.5)
    for epoch in range(epochs):
        train_one_epoch(...)
        acc_fused, acc_audio, acc_image = validate(...)
        decision = sched.step(fused=acc_fused, unimodal={"audio": acc_audio, "image": acc_image})

With another schedule (warm-up, cosine, one-cycle, ...), MILES keeps, per param group, the LR the
schedule wants (the *unscaled* LR) and its own factor, and the group trains at their product:

* ``MILES(optimizer, ..., base=schedule)``: ``sched.step()`` (no metrics) is one step of
  ``schedule``, taken with MILES's factors removed from the LRs, then put back. The schedule sees
  exactly the LRs it would see alone, so *any* schedule, per step or per epoch, gives
  ``schedule x factor``. Call it wherever you called ``schedule.step()``.
* A schedule stepped by someone else (a framework, timm's ``step_update``): wrap its step in
  ``with sched.unscaled(): ...``, or call :meth:`MILES.unscale` before and :meth:`MILES.reapply`
  after it. :meth:`MILES.reapply` alone, right after a schedule that writes *absolute* LRs
  (LambdaLR, OneCycleLR, HF's and timm's schedules), puts the factors back on top of them.
* Legacy: a multiplicative schedule (:func:`check_composable`) stepped by you before each decision
  and declared with ``base_schedulers=[...]``.

A change of a group's LR that MILES sees outside these paths is detected and warned about once.

Checkpointing: the learning rates themselves live in the optimizer's state dict, the factors, the
unscaled LRs, the history (and the ``base`` schedule's state) in this scheduler's. Save both, and
restore the optimizer first, then the scheduler, as with any torch scheduler.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    ChainedScheduler,
    ConstantLR,
    CosineAnnealingLR,
    ExponentialLR,
    LinearLR,
    LRScheduler,
    MultiplicativeLR,
    MultiStepLR,
    PolynomialLR,
    SequentialLR,
    StepLR,
)

from miles.integrations.distributed import check_sync, gather_floats, world_size
from miles.options import MILESOptions, OptionsState, decide_with_options
from miles.utilization import (
    _check_tau,
    as_metric,
    check_mode,
    check_scale,
    conditional_utilization,
    decide,
    imbalance,
)
from miles.validation import check_bool, check_number

__all__ = ["MILES", "Decision", "check_composable", "check_options"]

#: Version of :meth:`MILES.state_dict`; states without the key are version 1 (still loadable).
STATE_VERSION = 2

#: Schedulers whose ``get_lr`` multiplies the *current* ``group["lr"]`` by a factor that does not
#: depend on it, so ``base.step()`` then ``MILES.step(...)`` gives ``base schedule x MILES factor``.
_MULTIPLICATIVE: tuple[type[LRScheduler], ...] = (
    StepLR,
    MultiStepLR,
    ExponentialLR,
    LinearLR,
    ConstantLR,
    MultiplicativeLR,
    PolynomialLR,
)

_USE_BASE = (
    "pass it to MILES as base= (MILES then steps it with its factors removed, which is exact for "
    "any schedule), or wrap its step in `with miles_scheduler.unscaled():`"
)


def check_composable(scheduler: Any) -> None:
    """Raise ``TypeError`` unless you may step ``scheduler`` yourself next to MILES.

    This is the contract of ``base_schedulers=[...]``: you step the schedule before each MILES
    decision, and MILES rewrites the LRs as ``lr / old_factor * new_factor``. That is exact when
    the schedule is *chainable and multiplicative* (its step multiplies the current LR by a factor
    that does not depend on it). Any other schedule composes exactly through ``MILES(...,
    base=schedule)`` or ``with miles.unscaled(): schedule.step()``, which let it see the LRs
    without MILES's factor; this function is not needed for those.

    ==============================  =========  ================================================
    scheduler                       composes   why
    ==============================  =========  ================================================
    StepLR, MultiStepLR             yes        ``lr * gamma`` at milestones
    ExponentialLR                   yes        ``lr * gamma``
    LinearLR, ConstantLR            yes        ``lr * ratio`` of successive factors
    MultiplicativeLR                yes        ``lr * lambda(epoch)``
    PolynomialLR                    yes        ``lr * ratio`` of successive factors
    CosineAnnealingLR, eta_min=0    yes        ``lr * ratio`` for epochs up to ``T_max``; past
                                               ``T_max`` torch adds a term from ``base_lrs``
    CosineAnnealingLR, eta_min>0    use base=  affine recursion ``eta_min + (lr - eta_min) r``
    ChainedScheduler                if all     steps every child in turn
                                    children
    SequentialLR                    use base=  at each milestone torch re-evaluates the next
                                               child's closed form from ``base_lrs``
    LambdaLR                        use base=  ``base_lr * lambda(epoch)``: absolute
    OneCycleLR, CyclicLR            use base=  absolute LRs from ``max_lr``/``base_lr``
    CosineAnnealingWarmRestarts     use base=  absolute LRs from ``base_lrs``
    ReduceLROnPlateau               no         steps on a metric, not with ``step()``
    anything else (incl. MILES)     use base=  unknown ``get_lr``
    ==============================  =========  ================================================

    Classes are matched exactly, not by ``isinstance``: a subclass may override ``get_lr``.
    """
    cls = type(scheduler)
    name = cls.__name__
    if cls in _MULTIPLICATIVE:
        return
    if cls is CosineAnnealingLR:
        eta_min = scheduler.eta_min
        if float(eta_min) != 0.0:
            raise TypeError(
                f"CosineAnnealingLR with eta_min={eta_min!r} does not compose with MILES when "
                "stepped on its own: its recursive form eta_min + (lr - eta_min) * r is affine, "
                f"not multiplicative, so it would distort MILES's factor; {_USE_BASE}"
            )
        return
    if cls is ChainedScheduler:
        for child in scheduler._schedulers:
            check_composable(child)
        return
    if cls is SequentialLR:
        raise TypeError(
            "SequentialLR does not compose with MILES when stepped on its own: at each milestone "
            "torch sets the LRs from the next scheduler's closed form (from base_lrs), which "
            f"would erase MILES's factor; {_USE_BASE}"
        )
    raise TypeError(
        f"{name} does not compose with MILES when stepped on its own: it is not a known chainable "
        "multiplicative schedule (it sets absolute LRs, e.g. from base_lrs, which would erase "
        f"MILES's factor); {_USE_BASE}. Stepped on their own, only StepLR, MultiStepLR, "
        "ExponentialLR, LinearLR, ConstantLR, MultiplicativeLR, PolynomialLR, "
        "CosineAnnealingLR(eta_min=0) and ChainedScheduler of those compose"
    )


def _scheduler_optimizers(scheduler: Any) -> list[Any]:
    """All optimizers a (possibly chained or sequential) scheduler acts on."""
    found = [getattr(scheduler, "optimizer", None)]
    for child in getattr(scheduler, "_schedulers", ()):
        found.extend(_scheduler_optimizers(child))
    return found


@dataclass(frozen=True)
class Decision:
    """What one metric-driven :meth:`MILES.step` saw and did (one row of the history).

    ``epoch`` is the scheduler's ``last_epoch`` after the step; ``metrics`` are the ``unimodal``
    (estimator ``"heads"``) or ``without`` (estimator ``"ablation"``) values given; ``factors`` and
    ``lrs`` (one per param group, optimizer order, named by ``lr_names``) are those in force after
    the step; ``mode`` says whether the metrics were scores (``"max"``) or losses (``"min"``).
    """

    epoch: int
    fused: float
    estimator: str
    metrics: dict[str, float]
    u: dict[str, float]
    delta: float
    slowed: str | None
    reason: str
    factors: dict[str, float]
    lrs: list[float] = field(default_factory=list)
    mode: str = "max"
    lr_names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return the record as builtins only (for JSON and ``torch.load(weights_only=True)``)."""
        return {
            "epoch": int(self.epoch),
            "fused": float(self.fused),
            "estimator": str(self.estimator),
            "metrics": {str(k): float(v) for k, v in self.metrics.items()},
            "u": {str(k): float(v) for k, v in self.u.items()},
            "delta": float(self.delta),
            "slowed": None if self.slowed is None else str(self.slowed),
            "reason": str(self.reason),
            "factors": {str(k): float(v) for k, v in self.factors.items()},
            "lrs": [float(v) for v in self.lrs],
            "mode": str(self.mode),
            "lr_names": [str(v) for v in self.lr_names],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Decision:
        """Rebuild a record from :meth:`to_dict`'s output (older records lack mode/lr_names)."""
        slowed = data["slowed"]
        return cls(
            epoch=int(data["epoch"]),
            fused=float(data["fused"]),
            estimator=str(data["estimator"]),
            metrics={str(k): float(v) for k, v in data["metrics"].items()},
            u={str(k): float(v) for k, v in data["u"].items()},
            delta=float(data["delta"]),
            slowed=None if slowed is None else str(slowed),
            reason=str(data["reason"]),
            factors={str(k): float(v) for k, v in data["factors"].items()},
            lrs=[float(v) for v in data["lrs"]],
            mode=str(data.get("mode", "max")),
            lr_names=[str(v) for v in data.get("lr_names", [])],
        )

    def scalars(self, prefix: str = "miles/") -> dict[str, float]:
        """A flat ``{name: float}`` view for loggers (TensorBoard, Lightning, HF, CSV).

        Keys: ``fused``, ``delta``, and per modality ``u/<m>``, ``metric/<m>``, ``factor/<m>``,
        ``slowed/<m>`` (1.0 for the slowed modality, else 0.0); per param group ``lr/<name>``
        (its ``"name"``, else its modality or ``shared``). All prefixed with ``prefix``.
        """
        out = {f"{prefix}fused": float(self.fused), f"{prefix}delta": float(self.delta)}
        for m, value in self.u.items():
            out[f"{prefix}u/{m}"] = float(value)
            out[f"{prefix}metric/{m}"] = float(self.metrics[m])
            out[f"{prefix}factor/{m}"] = float(self.factors[m])
            out[f"{prefix}slowed/{m}"] = 1.0 if self.slowed == m else 0.0
        names = self.lr_names or [f"group{i}" for i in range(len(self.lrs))]
        for name, lr in zip(names, self.lrs, strict=True):
            out[f"{prefix}lr/{name}"] = float(lr)
        return out


def _check_mu(mu: Any) -> float:
    """Validate the slow-down factor: a real number in (0, 1] (bool and NaN rejected)."""
    return check_number("mu", mu, low=0, high=1, low_open=True)


def check_options(
    tau: Any = 0.2,
    mu: Any = 0.5,
    reset_other: Any = False,
    *,
    mode: Any = "max",
    scale: Any = None,
    sync: Any = "check",
) -> dict[str, Any]:
    """Validate MILES's hyper-parameters; return them normalized (floats, checked strings).

    :class:`MILES` calls it; callbacks call it at construction, before any optimizer exists, so
    a bad value fails before training rather than after the first epoch.
    """
    mode = check_mode(mode)
    check_scale(scale, mode)
    return {
        "tau": _check_tau(tau),
        "mu": _check_mu(mu),
        "reset_other": check_bool("reset_other", reset_other),
        "mode": mode,
        "scale": None if scale is None else float(scale),
        "sync": check_sync(sync),
    }


def _group_modalities(optimizer: Optimizer) -> list[str | None]:
    """The ``"modality"`` of each param group (None for shared groups), type-checked."""
    out: list[str | None] = []
    for index, group in enumerate(optimizer.param_groups):
        modality = group.get("modality")
        if modality is not None and not isinstance(modality, str):
            raise TypeError(
                f"param_groups[{index}]['modality'] must be a str or None, "
                f"got {type(modality).__name__}: {modality!r}"
            )
        out.append(modality)
    return out


def _lr_names(optimizer: Optimizer, modalities: list[str | None]) -> list[str]:
    """A unique label per group: its ``"name"``, else its modality or ``shared``."""
    names: list[str] = []
    for index, (group, modality) in enumerate(zip(optimizer.param_groups, modalities, strict=True)):
        label = group.get("name")
        if not isinstance(label, str) or not label:
            label = modality if modality is not None else "shared"
        names.append(label if label not in names else f"{label}/{index}")
    return names


def _shared_tensor(lr: torch.Tensor, optimizer: Optimizer) -> bool:
    """True if several groups hold this very tensor, e.g. ``Adam(groups, lr=torch.tensor(x))``."""
    return sum(group["lr"] is lr for group in optimizer.param_groups) > 1


def _lr_value(lr: Any) -> float:
    return float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class MILES(LRScheduler):
    """Modality-Informed Learning ratE Scheduler (Algorithm 1 of arXiv 2510.17394, generalized).

    Args:
        optimizer: optimizer whose param groups carry ``"modality"``: a modality name, or None /
            no key for shared parts (fusion layer, fused head), which MILES never changes. Several
            groups may share a modality; at least two distinct names are required.
        tau: imbalance threshold, ``>= 0`` (paper default 0.2).
        mu: factor applied to the slowed modality's LR, in ``(0, 1]`` (paper default 0.5);
            ``mu = 1`` makes MILES a no-op.
        reset_other: when a modality is slowed, also reset the others to factor 1. The paper is
            silent on it; ``False`` (default) is its literal reading, where a reduction from an
            earlier epoch persists until a balanced / all-negative epoch.
        mode: ``"max"`` (default) for scores where higher is better (accuracy, F1); ``"min"`` for
            losses, where ``u`` is computed on ``1 / loss`` (see :mod:`miles.utilization`).
        scale: the metrics' full scale: ``None`` (default) is 1 (fractions) for ``"max"`` and
            unbounded for ``"min"``; ``100`` for percentages; a metric above it is refused, which
            catches a fused metric in percent next to heads in fractions.
        base: a schedule on the same optimizer that MILES steps on each metric-less
            :meth:`step`, with its factors removed while it steps (any torch scheduler, per step
            or per epoch, or any object with ``step()``). Its state is part of this scheduler's.
        base_schedulers: multiplicative schedules you step yourself before each decision; each
            is checked with :func:`check_composable` (not stored or stepped).
        sync: what to do under ``torch.distributed`` with two or more ranks: ``"check"``
            (default) refuses metrics that differ between ranks, ``"broadcast"`` decides from
            rank 0's, ``"off"`` does not communicate (:mod:`miles.integrations.distributed`).
        process_group: the group ``sync`` communicates in (default: the world).
        options: decision options beyond Algorithm 1 (a :class:`miles.options.MILESOptions` or
            a mapping of its fields): warm-up, smoothing, hysteresis, a floor on how long a
            slow-down lasts, reference-aware and pairwise rules. With every option at its
            default (or ``None``) the decision is Algorithm 1's, bit for bit.
        last_epoch: as for any torch scheduler.

    Call ``step(fused=..., unimodal={...})`` (or ``without={...}``) once per epoch after validation;
    the new LRs apply to the next epoch. ``step()`` without metrics steps ``base``, or (without
    ``base``) only advances the epoch count and warns once; :meth:`skip` advances it silently.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        tau: float = 0.2,
        mu: float = 0.5,
        reset_other: bool = False,
        *,
        mode: str = "max",
        scale: float | None = None,
        base: Any = None,
        base_schedulers: Iterable[LRScheduler] = (),
        sync: str = "check",
        process_group: Any = None,
        options: MILESOptions | Mapping[str, Any] | None = None,
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        checked = check_options(tau, mu, reset_other, mode=mode, scale=scale, sync=sync)
        self._tau, self._mu = checked["tau"], checked["mu"]
        self._reset_other, self._mode = checked["reset_other"], checked["mode"]
        self._scale, self._sync = checked["scale"], checked["sync"]
        self._process_group = process_group
        group_modalities = _group_modalities(optimizer)
        names = tuple(dict.fromkeys(m for m in group_modalities if m is not None))
        if len(names) < 2:
            raise ValueError(
                "MILES needs param groups of at least two distinct modalities (set "
                f"group['modality'] to a name); found {list(names)}"
            )
        declared = tuple(base_schedulers)
        for index, scheduler in enumerate(declared):
            check_composable(scheduler)
            if any(opt is not optimizer for opt in _scheduler_optimizers(scheduler)):
                raise ValueError(
                    f"base_schedulers[{index}] ({type(scheduler).__name__}) acts on a different "
                    "optimizer than MILES"
                )
        if base is not None:
            if isinstance(base, MILES):
                raise TypeError("base must be a learning-rate schedule, not another MILES")
            if not callable(getattr(base, "step", None)):
                raise TypeError(f"base must have a step() method, got {type(base).__name__}")
            if any(o is not None and o is not optimizer for o in _scheduler_optimizers(base)):
                raise ValueError(f"base ({type(base).__name__}) acts on a different optimizer")
        self._base = base
        resolved = MILESOptions.from_value(options)
        resolved.check_for(self._tau, self._mode, names)
        #: None for Algorithm 1 (every option at its default): its own code path, unchanged
        self._options: MILESOptions | None = None if resolved.is_default else resolved
        self._options_state = OptionsState()
        self._multiplicative_declared = bool(declared)
        self._modalities: tuple[str, ...] = names
        self._group_modalities: list[str | None] = group_modalities
        self._factors: dict[str, float] = dict.fromkeys(names, 1.0)
        self._history: list[Decision] = []
        # Per group: the LR the schedule wants (unscaled) and the LR MILES last left in the group.
        # While nothing else has touched the group, MILES recomputes from ``unscaled`` exactly
        # (lr * mu / mu can be off by one ulp); a change it did not make is detected by
        # ``lr != written``. Between unscale() and reapply() the groups hold the unscaled LRs.
        current = [_lr_value(g["lr"]) for g in optimizer.param_groups]
        self._unscaled: list[float | None] = list(current)
        self._written: list[float | None] = list(current)
        self._window_open = False
        self._warned: set[str] = set()
        self._constructing = True
        super().__init__(optimizer, last_epoch)  # calls self.step() once, with no arguments
        self._constructing = False

    # ------------------------------------------------------------------ properties
    @property
    def modalities(self) -> tuple[str, ...]:
        """Distinct modality names, in param-group order (the tie-break order)."""
        return self._modalities

    @property
    def factors(self) -> dict[str, float]:
        """Current factor (1 or ``mu``) per modality; a copy."""
        return dict(self._factors)

    @property
    def history(self) -> list[Decision]:
        """Every metric-driven decision so far; a copy of the list."""
        return list(self._history)

    @property
    def last_decision(self) -> Decision | None:
        """The latest decision, or None before the first metric-driven step."""
        return self._history[-1] if self._history else None

    @property
    def tau(self) -> float:
        return self._tau

    @property
    def mu(self) -> float:
        return self._mu

    @property
    def reset_other(self) -> bool:
        return self._reset_other

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def scale(self) -> float:
        """The resolved full scale of the metrics (``math.inf``: unbounded)."""
        return check_scale(self._scale, self._mode)

    @property
    def options(self) -> MILESOptions:
        """The decision options (all at their defaults: Algorithm 1)."""
        return self._options or MILESOptions()

    @property
    def base(self) -> Any:
        """The schedule MILES steps on metric-less :meth:`step` calls, or None."""
        return self._base

    @property
    def unscaled_lrs(self) -> list[float | None]:
        """Per group, the LR the base schedule wants (MILES's factors not applied); a copy."""
        return list(self._unscaled)

    # ------------------------------------------------------------------ torch API
    def get_lr(self) -> list[float | torch.Tensor]:
        """Return the current group LRs: MILES sets them in :meth:`step`, nothing is recomputed."""
        return [
            group["lr"].clone() if isinstance(group["lr"], torch.Tensor) else group["lr"]
            for group in self.optimizer.param_groups
        ]

    def _advance(self) -> None:
        self.last_epoch += 1
        self._step_count += 1
        self._last_lr = self.get_lr()

    # ------------------------------------------------------------------ LR bookkeeping
    def _factor(self, index: int) -> float:
        modality = self._group_modalities[index]
        return 1.0 if modality is None else self._factors[modality]

    def _write(self, index: int, lr: float) -> None:
        """Set group ``index``'s LR (in place for tensor LRs, as torch schedulers do)."""
        group = self.optimizer.param_groups[index]
        current = group["lr"]
        if isinstance(current, torch.Tensor):
            if float(current.item()) != lr:
                if _shared_tensor(current, self.optimizer):
                    group["lr"] = torch.tensor(lr, dtype=current.dtype, device=current.device)
                else:
                    current.fill_(lr)
        elif current != lr:
            group["lr"] = lr
        self._written[index] = _lr_value(group["lr"])

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=4)

    def _changed_outside(self) -> list[int]:
        """Groups whose LR is not what MILES last left there (someone else wrote it)."""
        return [
            index
            for index, group in enumerate(self.optimizer.param_groups)
            if self._written[index] is None or _lr_value(group["lr"]) != self._written[index]
        ]

    def _reconcile(self) -> set[int]:
        """Read LRs changed behind MILES's back as ``lr / factor`` (the multiplicative contract).

        Only ``base_schedulers`` (multiplicative, stepped before each decision) may change LRs
        outside :meth:`unscale`/:meth:`reapply`; any other change is warned about once. Returns
        the groups that changed.
        """
        changed = set(self._changed_outside())
        for index in sorted(changed):
            value = _lr_value(self.optimizer.param_groups[index]["lr"])
            if self._written[index] is not None and not self._multiplicative_declared:
                modality = self._group_modalities[index]
                self._warn_once(
                    "overwrite",
                    f"the LR of param group {index} (modality {modality!r}) changed from "
                    f"{self._written[index]!r} to {value!r} since MILES last set it, by "
                    "something MILES was not told about. MILES assumed a multiplicative schedule "
                    "(lr * r, like StepLR) and kept its factor. If that schedule writes absolute "
                    "LRs (LambdaLR, OneCycleLR, SequentialLR, HF's or timm's schedules), its "
                    "factor was lost: pass the schedule as MILES(..., base=schedule), or step it "
                    "inside `with scheduler.unscaled():`, or call scheduler.reapply() right after "
                    "it. Declare a multiplicative schedule with base_schedulers=[...] to silence "
                    "this warning.",
                )
            self._unscaled[index] = value / self._factor(index)
            self._written[index] = value
        return changed

    def unscale(self) -> None:
        """Put the base schedule's LRs (MILES's factors removed) into the param groups.

        Call it right before another schedule steps, and :meth:`reapply` right after: the
        schedule then sees, and updates, exactly the LRs it would have without MILES, whatever
        its formula. Idempotent; :meth:`unscaled` does both around a block.
        """
        if self._window_open:
            return
        self._reconcile()
        for index, unscaled in enumerate(self._unscaled):
            assert unscaled is not None
            self._write(index, unscaled)
        self._window_open = True

    def reapply(self) -> None:
        """Apply MILES's factors on top of the LRs a schedule just wrote.

        After :meth:`unscale` this closes the window: whatever is in the groups is the schedule's
        LR. Called on its own, a group whose LR changed since MILES last set it is taken as an
        *absolute* write by a schedule (LambdaLR, OneCycleLR, HF's or timm's schedules) that
        erased the factor; unchanged groups are left as they are, so calling it twice is safe.
        (A schedule that happens to write exactly the LR MILES had set looks unchanged: the
        :meth:`unscale`/:meth:`reapply` pair, ``unscaled()`` and ``base=`` have no such blind
        spot.)
        """
        for index, group in enumerate(self.optimizer.param_groups):
            value = _lr_value(group["lr"])
            if self._written[index] is None and not self._window_open:
                self._unscaled[index] = value / self._factor(index)  # older state: factor in
            elif self._window_open or value != self._written[index]:
                self._unscaled[index] = value
            unscaled = self._unscaled[index]
            assert unscaled is not None
            self._write(index, unscaled * self._factor(index))
        self._window_open = False
        self._last_lr = self.get_lr()

    @contextlib.contextmanager
    def unscaled(self) -> Iterator[None]:
        """``with scheduler.unscaled(): schedule.step()``: step any schedule under MILES."""
        self.unscale()
        try:
            yield
        finally:
            self.reapply()

    # ------------------------------------------------------------------ stepping
    def skip(self) -> None:
        """Advance the epoch count without a decision (e.g. the fused metric is still 0)."""
        self._advance()

    def _validated(
        self, fused: Any, unimodal: Any, without: Any
    ) -> tuple[float, str, dict[str, float], dict[str, float]]:
        """Check every input on every rank; return (fused, estimator, metrics, u)."""
        if _group_modalities(self.optimizer) != self._group_modalities:
            raise ValueError(
                "the optimizer's param groups (or their 'modality' tags) changed after MILES was "
                f"created: was {self._group_modalities}, now {_group_modalities(self.optimizer)}; "
                "create the scheduler after the last add_param_group"
            )
        error: Exception | None = None
        result: tuple[float, str, dict[str, float], dict[str, float]] | None = None
        try:
            result = self._validated_here(fused, unimodal, without)
        except (TypeError, ValueError) as exc:
            error = exc
        if self._sync != "off" and world_size(self._process_group) > 1:
            result = self._agreed(result, error)
        elif error is not None:
            raise error
        assert result is not None
        return result

    def _validated_here(
        self, fused: Any, unimodal: Any, without: Any
    ) -> tuple[float, str, dict[str, float], dict[str, float]]:
        if unimodal is not None and without is not None:
            raise ValueError("give either unimodal= or without=, not both")
        if unimodal is None and without is None:
            raise ValueError(
                "fused given without unimodal= or without=: MILES needs the unimodal head metrics "
                "or the ablated fused metrics to compute utilization"
            )
        estimator, kind, given = (
            ("heads", "unimodal", unimodal)
            if unimodal is not None
            else ("ablation", "without", without)
        )
        if not isinstance(given, Mapping):
            raise TypeError(
                f"{kind} must be a mapping {{modality: metric}}, got {type(given).__name__}"
            )
        unknown = [k for k in given if k not in self._modalities]
        missing = [m for m in self._modalities if m not in given]
        if unknown or missing:
            raise ValueError(
                f"{kind} keys must be exactly the modalities {list(self._modalities)}; "
                f"unknown: {unknown}, missing: {missing}"
            )
        fused_value = as_metric(fused, "fused")
        metrics = {m: as_metric(given[m], f"{kind}[{m!r}]") for m in self._modalities}
        return fused_value, estimator, metrics, self._utilization(fused_value, estimator, metrics)

    def _utilization(
        self, fused: float, estimator: str, metrics: dict[str, float]
    ) -> dict[str, float]:
        key = "unimodal" if estimator == "heads" else "without"
        return conditional_utilization(fused, **{key: metrics}, mode=self._mode, scale=self._scale)

    def _agreed(
        self,
        local: tuple[float, str, dict[str, float], dict[str, float]] | None,
        error: Exception | None,
    ) -> tuple[float, str, dict[str, float], dict[str, float]]:
        """All-gather the metrics; refuse disagreement ("check") or take rank 0's ("broadcast")."""
        n = len(self._modalities)
        if local is None:
            vector = [0.0, 0.0] + [math.nan] * (n + 1)
        else:
            fused, estimator, metrics, _ = local
            vector = [1.0, float(estimator == "heads"), fused, *metrics.values()]
        rows = gather_floats(vector, self._process_group)
        failed = [rank for rank, row in enumerate(rows) if row[0] != 1.0]
        if failed:
            if error is not None:
                raise error
            raise RuntimeError(
                f"MILES step refused on rank(s) {failed} (invalid metrics: see the error there); "
                "no rank changed anything"
            )

        def describe(row: list[float]) -> str:
            kind = "unimodal" if row[1] == 1.0 else "without"
            values = dict(zip(self._modalities, row[3:], strict=True))
            return f"fused={row[2]!r} {kind}={values}"

        if self._sync == "check":
            differ = [rank for rank, row in enumerate(rows) if row != rows[0]]
            if differ:
                shown = "; ".join(f"rank {r}: {describe(row)}" for r, row in enumerate(rows[:8]))
                raise RuntimeError(
                    f"MILES got different validation metrics on different ranks (ranks {differ} "
                    f"differ from rank 0): {shown}. Each rank would take its own decision and the "
                    "replicas would train with different learning rates. Compute the metrics "
                    "over the whole validation set on every rank (miles.HeadMetrics syncs its "
                    "states across ranks; or all_reduce your counts), or pass sync='broadcast' "
                    "to decide from rank 0's metrics"
                )
            assert local is not None
            return local
        first = rows[0]
        estimator = "heads" if first[1] == 1.0 else "ablation"
        metrics = dict(zip(self._modalities, first[3:], strict=True))
        return first[2], estimator, metrics, self._utilization(first[2], estimator, metrics)

    def step(  # type: ignore[override]
        self,
        fused: Any = None,
        unimodal: Mapping[str, Any] | None = None,
        *,
        without: Mapping[str, Any] | None = None,
    ) -> Decision | None:
        """With metrics, decide and set the LRs for the next epoch; without, step ``base``.

        With ``fused`` and exactly one of ``unimodal`` / ``without`` (keys: exactly
        :attr:`modalities`), everything is validated first (and, under ``torch.distributed``,
        compared across ranks), so a step that raises changes nothing. Every modality group then
        trains at ``unscaled LR x factor``: a repeated "slowed" decision is applied again even if
        a schedule overwrote the LR since. Returns the :class:`Decision`, also appended to
        :attr:`history`.

        Without metrics: one step of ``base`` (MILES's factors removed while it steps), or, with
        no ``base``, only the epoch count advances and a warning says (once) that nothing was
        decided, which is what happens when a framework steps MILES like an ordinary scheduler.
        """
        if fused is None and unimodal is None and without is None:
            if self._constructing:
                self._advance()
            elif self._base is not None:
                with self.unscaled():
                    self._base.step()
            else:
                self._warn_once(
                    "no-metrics",
                    "MILES.step() was called without metrics: nothing was decided (factors "
                    "kept, epoch count advanced). MILES decides from validation metrics: call "
                    "step(fused=..., unimodal={...}) after each validation. A framework that "
                    "steps MILES like an ordinary scheduler never passes them: use "
                    "miles.integrations.lightning.MILESCallback with PyTorch Lightning, or "
                    "miles.integrations.hf.MILESCallback with the Hugging Face Trainer. To step "
                    "a schedule through MILES, pass it as base=; to skip an epoch on purpose, "
                    "call skip().",
                )
                self._advance()
            return None
        fused_value, estimator, metrics, u = self._validated(fused, unimodal, without)
        if self._options is None:  # Algorithm 1
            delta = imbalance(u)
            slowed, reason = decide(u, self._tau)
        else:
            u, delta, slowed, reason = decide_with_options(
                self._options,
                self._options_state,
                fused=fused_value,
                estimator=estimator,
                metrics=metrics,
                tau=self._tau,
                mode=self._mode,
                scale=self._scale,
            )
        if self._window_open:
            self.reapply()

        old = self._factors
        if slowed is None:
            new = dict.fromkeys(self._modalities, 1.0)
        else:
            new = dict.fromkeys(self._modalities, 1.0) if self._reset_other else dict(old)
            new[slowed] = self._mu
        changed = self._reconcile()
        for index, modality in enumerate(self._group_modalities):
            if modality is None:
                continue
            if index in changed and new[modality] == old[modality]:
                continue  # a multiplicative schedule kept the factor in: leave its LR bit-exact
            unscaled = self._unscaled[index]
            assert unscaled is not None
            self._write(index, unscaled * new[modality])
        self._factors = new
        self._advance()
        decision = Decision(
            epoch=self.last_epoch,
            fused=fused_value,
            estimator=estimator,
            metrics=metrics,
            u=dict(u),
            delta=delta,
            slowed=slowed,
            reason=reason,
            factors=dict(new),
            lrs=[_lr_value(lr) for lr in self._last_lr],
            mode=self._mode,
            lr_names=_lr_names(self.optimizer, self._group_modalities),
        )
        self._history.append(decision)
        return decision

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Return the scheduler state as builtins only (no tensors, no optimizer).

        The LRs themselves are in the optimizer's state dict: save and restore both. With a
        ``base``, its ``state_dict()`` is included under ``"base"``.
        """
        base_state = None
        if self._base is not None and callable(getattr(self._base, "state_dict", None)):
            base_state = self._base.state_dict()
        return {
            "version": STATE_VERSION,
            "tau": self._tau,
            "mu": self._mu,
            "reset_other": self._reset_other,
            "mode": self._mode,
            "scale": self._scale,
            "modalities": list(self._modalities),
            "group_modalities": list(self._group_modalities),
            "factors": dict(self._factors),
            "history": [d.to_dict() for d in self._history],
            "last_epoch": int(self.last_epoch),
            "_step_count": int(self._step_count),
            "_last_lr": [_lr_value(lr) for lr in self._last_lr],
            "base_lrs": [_lr_value(lr) for lr in self.base_lrs],
            "written": list(self._written),
            "unscaled": list(self._unscaled),
            "window_open": self._window_open,
            "base": base_state,
        } | (
            {}  # Algorithm 1's state dict is unchanged
            if self._options is None
            else {
                "options": self._options.describe(),
                "options_state": self._options_state.to_dict(),
            }
        )

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` (this version's or the older one without ``written``).

        Everything is validated before anything changes: a state from another layout (missing
        keys, other modalities, another number of param groups or other group tags) is refused
        with a ``ValueError`` and leaves the scheduler as it was. Load the optimizer's state dict
        (which holds the LRs) first, then this one.
        """
        new = _parse_state(state_dict, self._modalities, self._group_modalities)
        saved_options = MILESOptions.from_value(state_dict.get("options"))
        if saved_options != self.options:
            raise ValueError(
                f"state_dict was saved with MILES options {saved_options.describe()}, this "
                f"scheduler has {self.options.describe()}: create it with the same options"
            )
        new["options_state"] = (
            OptionsState.from_dict(state_dict["options_state"])
            if "options_state" in state_dict
            else OptionsState()
        )
        saved_base = new["base"] is not None
        base_has_state = self._base is not None and callable(
            getattr(self._base, "load_state_dict", None)
        )
        if saved_base and not base_has_state:
            raise ValueError(
                "state_dict holds the state of a base schedule, but this MILES has none that "
                "can load it: create it with the same base= schedule"
            )
        if base_has_state and not saved_base:
            raise ValueError(
                f"this MILES steps a base schedule ({type(self._base).__name__}) but the "
                "state_dict holds none: it was saved by a MILES without base="
            )
        if saved_base:
            self._base.load_state_dict(new["base"])
        self._tau, self._mu, self._reset_other = new["tau"], new["mu"], new["reset_other"]
        self._mode, self._scale = new["mode"], new["scale"]
        self._factors = new["factors"]
        self._history = new["history"]
        self.last_epoch, self._step_count = new["last_epoch"], new["_step_count"]
        self._last_lr, self.base_lrs = new["_last_lr"], new["base_lrs"]
        self._written, self._unscaled = new["written"], new["unscaled"]
        self._window_open = new["window_open"]
        self._options_state = new["options_state"]


_REQUIRED_KEYS = (
    "tau",
    "mu",
    "reset_other",
    "modalities",
    "factors",
    "history",
    "last_epoch",
    "_step_count",
    "_last_lr",
    "base_lrs",
)


def _float_list(state: Mapping[str, Any], key: str, n: int, *, optional: bool) -> list[Any]:
    """A list of ``n`` reals (or None where ``optional``), or a clear error."""
    values = state.get(key, [None] * n) if optional else state[key]
    if not isinstance(values, (list, tuple)) or len(values) != n:
        size = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise ValueError(f"state_dict[{key!r}] is for {size} param groups, this optimizer has {n}")
    out: list[Any] = []
    for value in values:
        if value is None and optional:
            out.append(None)
        elif _is_real(value) and math.isfinite(float(value)):
            out.append(float(value))
        else:
            raise ValueError(f"state_dict[{key!r}] holds a non-number: {value!r}")
    return out


def _parse_state(
    state: Any, modalities: tuple[str, ...], group_modalities: list[str | None]
) -> dict[str, Any]:
    """Validate a MILES state dict against this scheduler's layout; return parsed values."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state).__name__}")
    missing = [key for key in _REQUIRED_KEYS if key not in state]
    if missing:
        raise ValueError(f"state_dict is not a MILES state: missing keys {missing}")
    saved = tuple(state["modalities"]) if isinstance(state["modalities"], (list, tuple)) else None
    if saved != modalities:
        raise ValueError(
            f"state_dict is for modalities {state['modalities']!r}, this scheduler has "
            f"{list(modalities)}"
        )
    n = len(group_modalities)
    if "group_modalities" in state:
        saved_groups = state["group_modalities"]
        if not isinstance(saved_groups, (list, tuple)) or list(saved_groups) != group_modalities:
            raise ValueError(
                f"state_dict is for param groups tagged {saved_groups!r}, this optimizer's are "
                f"{group_modalities}"
            )
    mode = check_mode(state.get("mode", "max"))
    scale = state.get("scale")
    check_scale(scale, mode)
    mu = _check_mu(state["mu"])
    if not isinstance(state["reset_other"], bool):
        raise ValueError(f"state_dict['reset_other'] must be a bool, got {state['reset_other']!r}")
    factors = state["factors"]
    if (
        not isinstance(factors, Mapping)
        or set(factors) != set(modalities)
        or any(not _is_real(v) or float(v) not in (1.0, mu) for v in factors.values())
    ):
        raise ValueError(f"state_dict factors must be 1 or mu={mu} per modality: {factors!r}")
    history_data = state["history"]
    if not isinstance(history_data, (list, tuple)):
        raise ValueError(f"state_dict['history'] must be a list, got {type(history_data).__name__}")
    history = []
    for index, record in enumerate(history_data):
        try:
            history.append(Decision.from_dict(record))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(
                f"state_dict['history'][{index}] is not a decision record: {exc!r}"
            ) from exc
    counters = {}
    for key in ("last_epoch", "_step_count"):
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"state_dict[{key!r}] must be an int, got {value!r}")
        counters[key] = value
    window_open = state.get("window_open", False)
    if not isinstance(window_open, bool):
        raise ValueError(f"state_dict['window_open'] must be a bool, got {window_open!r}")
    return {
        "tau": _check_tau(state["tau"]),
        "mu": mu,
        "reset_other": state["reset_other"],
        "mode": mode,
        "scale": None if scale is None else float(scale),
        "factors": {m: float(factors[m]) for m in modalities},
        "history": history,
        **counters,
        "_last_lr": _float_list(state, "_last_lr", n, optional=False),
        "base_lrs": _float_list(state, "base_lrs", n, optional=False),
        "written": _float_list(state, "written", n, optional=True),
        "unscaled": _float_list(state, "unscaled", n, optional=True),
        "window_open": window_open,
        "base": state.get("base"),
    }
