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

Checkpointing: the learning rates themselves live in the optimizer's state dict, the factors and
history in this scheduler's. Save both, and restore the optimizer first, then the scheduler, as with
any torch scheduler.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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

from miles.utilization import (
    _check_tau,
    as_metric,
    conditional_utilization,
    decide,
    imbalance,
)
from miles.validation import check_bool, check_number

__all__ = ["MILES", "Decision", "check_composable"]

_ESTIMATORS = ("heads", "ablation")

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


def check_composable(scheduler: Any) -> None:
    """Raise ``TypeError`` unless ``scheduler`` can run under MILES on the same optimizer.

    MILES changes a group's LR by ``lr / old_factor * new_factor``. That is exact when the other
    schedule is *chainable and multiplicative* (its step multiplies the current LR by a factor that
    does not depend on the LR), stepped before MILES each epoch: ``base.step(); miles.step(...)``.
    A schedule that writes absolute LRs (computed from ``base_lrs`` or constants) would erase the
    MILES factor, or would be distorted by it, so it is rejected.

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
    CosineAnnealingLR, eta_min>0    no         affine recursion ``eta_min + (lr - eta_min) r``
    ChainedScheduler                if all     steps every child in turn
                                    children
    SequentialLR                    no         at each milestone torch re-evaluates the next
                                               child's closed form from ``base_lrs``, which
                                               resets the LRs
    LambdaLR                        no         ``base_lr * lambda(epoch)``: absolute
    OneCycleLR, CyclicLR            no         absolute LRs from ``max_lr``/``base_lr``
    CosineAnnealingWarmRestarts     no         absolute LRs from ``base_lrs``
    ReduceLROnPlateau               no         ``max(lr * factor, min_lr)``: the clamp is not
                                               multiplicative
    anything else (incl. MILES)     no         unknown ``get_lr``
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
                f"CosineAnnealingLR with eta_min={eta_min!r} does not compose with MILES: its "
                "recursive form eta_min + (lr - eta_min) * r is affine, not multiplicative, so it "
                "would distort MILES's factor; use eta_min=0"
            )
        return
    if cls is ChainedScheduler:
        for child in scheduler._schedulers:
            check_composable(child)
        return
    if cls is SequentialLR:
        raise TypeError(
            "SequentialLR does not compose with MILES: at each milestone torch sets the LRs from "
            "the next scheduler's closed form (from base_lrs), which would erase MILES's factor"
        )
    raise TypeError(
        f"{name} does not compose with MILES: it is not a known chainable multiplicative schedule "
        "(it sets absolute LRs, e.g. from base_lrs, which would erase MILES's factor). Composable: "
        "StepLR, MultiStepLR, ExponentialLR, LinearLR, ConstantLR, MultiplicativeLR, PolynomialLR, "
        "CosineAnnealingLR(eta_min=0), ChainedScheduler of those"
    )


def _scheduler_optimizers(scheduler: Any) -> list[Any]:
    """All optimizers a (possibly chained) scheduler acts on."""
    found = [getattr(scheduler, "optimizer", None)]
    for child in getattr(scheduler, "_schedulers", ()):
        found.extend(_scheduler_optimizers(child))
    return found


@dataclass(frozen=True)
class Decision:
    """What one metric-driven :meth:`MILES.step` saw and did (one row of the history).

    ``epoch`` is the scheduler's ``last_epoch`` after the step; ``metrics`` are the ``unimodal``
    (estimator ``"heads"``) or ``without`` (estimator ``"ablation"``) values given; ``factors`` and
    ``lrs`` (one per param group, optimizer order) are those in force after the step.
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
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Decision:
        """Rebuild a record from :meth:`to_dict`'s output."""
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
        )


def _check_mu(mu: Any) -> float:
    """Validate the slow-down factor: a real number in (0, 1] (bool and NaN rejected)."""
    return check_number("mu", mu, low=0, high=1, low_open=True)


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


def _shared_tensor(lr: torch.Tensor, optimizer: Optimizer) -> bool:
    """True if several groups hold this very tensor, e.g. ``Adam(groups, lr=torch.tensor(x))``."""
    return sum(group["lr"] is lr for group in optimizer.param_groups) > 1


def _lr_value(lr: Any) -> float:
    return float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)


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
        base_schedulers: other schedulers on the same optimizer that will be stepped before MILES
            each epoch; each is checked with :func:`check_composable` (not stored or stepped).
        last_epoch: as for any torch scheduler.

    Call ``step(fused=..., unimodal={...})`` (or ``without={...}``) once per epoch after validation;
    the new LRs apply to the next epoch. ``step()`` without arguments only advances the epoch count.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        tau: float = 0.2,
        mu: float = 0.5,
        reset_other: bool = False,
        *,
        base_schedulers: Iterable[LRScheduler] = (),
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self._tau = _check_tau(tau)
        self._mu = _check_mu(mu)
        self._reset_other = check_bool("reset_other", reset_other)
        group_modalities = _group_modalities(optimizer)
        names = tuple(dict.fromkeys(m for m in group_modalities if m is not None))
        if len(names) < 2:
            raise ValueError(
                "MILES needs param groups of at least two distinct modalities (set "
                f"group['modality'] to a name); found {list(names)}"
            )
        for index, scheduler in enumerate(tuple(base_schedulers)):
            check_composable(scheduler)
            if any(opt is not optimizer for opt in _scheduler_optimizers(scheduler)):
                raise ValueError(
                    f"base_schedulers[{index}] ({type(scheduler).__name__}) acts on a different "
                    "optimizer than MILES"
                )
        self._modalities: tuple[str, ...] = names
        self._group_modalities: list[str | None] = group_modalities
        # Set up before super().__init__, which calls self.step() with no arguments.
        self._factors: dict[str, float] = dict.fromkeys(names, 1.0)
        self._history: list[Decision] = []
        # Per group: the LR MILES last wrote and the LR before its factor. While nothing else has
        # touched the group since, resetting restores that LR exactly (lr * mu / mu can be off by
        # one ulp); after a base schedule changed it, we fall back to lr / old_factor.
        self._written: list[float | None] = [None] * len(group_modalities)
        self._unscaled: list[float | None] = [None] * len(group_modalities)
        super().__init__(optimizer, last_epoch)

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

    def _validated(
        self, fused: Any, unimodal: Any, without: Any
    ) -> tuple[float, str, dict[str, float], dict[str, float]]:
        """Check every input; return (fused, estimator, metrics, u) in modality order."""
        if _group_modalities(self.optimizer) != self._group_modalities:
            raise ValueError(
                "the optimizer's param groups (or their 'modality' tags) changed after MILES was "
                f"created: was {self._group_modalities}, now {_group_modalities(self.optimizer)}; "
                "create the scheduler after the last add_param_group"
            )
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
        ordered = {m: given[m] for m in self._modalities}
        fused_value = as_metric(fused, "fused")
        metrics = {m: as_metric(v, f"{kind}[{m!r}]") for m, v in ordered.items()}
        if estimator == "heads":
            u = conditional_utilization(fused_value, metrics)
        else:
            u = conditional_utilization(fused_value, without=metrics)
        return fused_value, estimator, metrics, u

    def step(  # type: ignore[override]
        self,
        fused: Any = None,
        unimodal: Mapping[str, Any] | None = None,
        *,
        without: Mapping[str, Any] | None = None,
    ) -> Decision | None:
        """Advance one epoch; with metrics, decide and set the LRs for the next epoch.

        With no arguments nothing is decided and the factors are kept (this is what the torch base
        class calls at construction). With ``fused`` and exactly one of ``unimodal`` /
        ``without`` (keys: exactly :attr:`modalities`), everything is validated first, so a step
        that raises changes nothing. Each modality's groups get
        ``lr / old_factor * new_factor``, which composes with chainable multiplicative schedules
        stepped first (see :func:`check_composable`); groups whose factor is unchanged are not
        touched at all. Returns the :class:`Decision`, also appended to :attr:`history`.
        """
        if fused is None and unimodal is None and without is None:
            self._advance()
            return None
        fused_value, estimator, metrics, u = self._validated(fused, unimodal, without)
        delta = imbalance(u)
        slowed, reason = decide(u, self._tau)

        old = self._factors
        if slowed is None:
            new = dict.fromkeys(self._modalities, 1.0)
        else:
            new = dict.fromkeys(self._modalities, 1.0) if self._reset_other else dict(old)
            new[slowed] = self._mu
        for index, (group, modality) in enumerate(
            zip(self.optimizer.param_groups, self._group_modalities, strict=True)
        ):
            if modality is None or new[modality] == old[modality]:
                continue
            current = group["lr"]
            value = _lr_value(current)
            unscaled = self._unscaled[index]
            if unscaled is None or value != self._written[index]:
                unscaled = value / old[modality]
            lr = unscaled * new[modality]
            if isinstance(current, torch.Tensor):
                if _shared_tensor(current, self.optimizer):
                    group["lr"] = torch.tensor(lr, dtype=current.dtype, device=current.device)
                else:
                    current.fill_(lr)  # in place, as torch schedulers do
            else:
                group["lr"] = lr
            self._unscaled[index], self._written[index] = unscaled, _lr_value(group["lr"])
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
        )
        self._history.append(decision)
        return decision

    def state_dict(self) -> dict[str, Any]:
        """Return the scheduler state as builtins only (no tensors, no optimizer).

        The LRs themselves are in the optimizer's state dict: save and restore both.
        """
        return {
            "tau": self._tau,
            "mu": self._mu,
            "reset_other": self._reset_other,
            "modalities": list(self._modalities),
            "factors": dict(self._factors),
            "history": [d.to_dict() for d in self._history],
            "last_epoch": int(self.last_epoch),
            "_step_count": int(self._step_count),
            "_last_lr": [_lr_value(lr) for lr in self._last_lr],
            "base_lrs": [_lr_value(lr) for lr in self.base_lrs],
            "written": list(self._written),
            "unscaled": list(self._unscaled),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; the modalities must match this scheduler's.

        Load the optimizer's state dict (which holds the LRs) first, then this one.
        """
        modalities = tuple(state_dict["modalities"])
        if modalities != self._modalities:
            raise ValueError(
                f"state_dict is for modalities {list(modalities)}, this scheduler has "
                f"{list(self._modalities)}"
            )
        tau = _check_tau(state_dict["tau"])
        mu = _check_mu(state_dict["mu"])
        reset_other = bool(state_dict["reset_other"])
        factors = {str(k): float(v) for k, v in state_dict["factors"].items()}
        if set(factors) != set(self._modalities) or any(
            v not in (1.0, mu) for v in factors.values()
        ):
            raise ValueError(f"state_dict factors must be 1 or mu={mu} per modality: {factors}")
        history = [Decision.from_dict(d) for d in state_dict["history"]]
        n_groups = len(self._group_modalities)
        written = list(state_dict.get("written", [None] * n_groups))
        unscaled = list(state_dict.get("unscaled", [None] * n_groups))
        if len(written) != n_groups or len(unscaled) != n_groups:
            raise ValueError(
                f"state_dict is for {len(written)} param groups, this optimizer has {n_groups}"
            )
        self._written = [None if v is None else float(v) for v in written]
        self._unscaled = [None if v is None else float(v) for v in unscaled]
        self._tau, self._mu, self._reset_other = tau, mu, reset_other
        self._factors = {m: factors[m] for m in self._modalities}
        self._history = history
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict["_step_count"])
        self._last_lr = [float(v) for v in state_dict["_last_lr"]]
        self.base_lrs = [float(v) for v in state_dict["base_lrs"]]
