"""Options of the MILES decision beyond Algorithm 1: remedies, reference-aware and pairwise rules.

The paper lists robustness to initialization (over-penalising the dominant modality) and more than
two modalities as open questions (Guerra-Manzanares and Shamout, arXiv 2510.17394, conclusion).
These options answer them as *measurable* variants; with every option at its default
(:attr:`MILESOptions.is_default`) :class:`miles.scheduler.MILES` takes Algorithm 1's code path
unchanged, bit for bit (the tests compare decisions, learning rates and state dicts).

Remedies against acting on noise (all in epochs, i.e. decisions):

* ``warmup = k``: the first ``k`` decisions leave every modality at its base rate (reason
  ``"warm-up"``); the first epoch MILES can slow is ``k + 2``.
* ``smoothing = beta``: an exponential moving average of the validation metrics MILES reads,
  ``s_t = (1 - beta) x_t + beta s_(t-1)`` (fused and every unimodal/ablated metric), so ``u`` and
  ``delta`` are computed on smoothed metrics. ``beta = 0`` is no smoothing.
* ``release_tau``: hysteresis. A modality slowed by the previous decision stays slowed (reason
  ``"held"``) while ``delta > release_tau`` and it still has the largest ``u``, although
  ``delta <= tau``; it is released only at ``delta <= release_tau`` (``<= tau``).
* ``min_duration = d``: a floor on how long a slow-down lasts: once slowed, a modality stays
  slowed for at least ``d`` epochs; a "balanced"/"all-negative" decision before that is
  overridden (reason ``"held"``). ``d = 1`` is Algorithm 1.

Rules:

* ``reference = "unimodal"`` (with ``references = {m: metric of m's unimodal model}``) or
  ``"best"`` (each head's best value so far): *reference-aware* MILES. Each head is first measured
  against its own reference, ``r_m = M(head_m) / ref_m`` (the share of its own potential it has
  reached), and ``u_m = 1 - max_(k != m) r_k``, i.e. Eq. 4 with every head rescaled so that
  reaching its reference counts as the fused metric. Two modalities that differ in how
  informative they are (not in speed) then give ``delta ~ 0`` once both reach their references,
  instead of a permanent ``delta = (M_A - M_B) / M_fused > tau`` that keeps the stronger one
  slowed every epoch. Heads estimator and scores (``mode="max"``) only.
* ``pairwise = True`` (heads estimator): the two-modality rule applied to every pair of heads;
  the pair with the largest gap decides. ``delta = (max_m M_m - min_m M_m) / M_fused`` and the
  best head's modality is slowed (``"all-negative"`` when every head beats the fused one). With
  two modalities it decides exactly as Algorithm 1. With ``N > 2`` the default generalisation
  (``u_m`` against the best *other* head) measures the best head against the *second* best, so a
  third modality far behind never triggers it; the pairwise rule measures it against the worst.
  The recorded ``u`` stay the default ones; ``delta`` is the pairwise one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from miles.utilization import _scores, conditional_utilization, decide, imbalance
from miles.validation import (
    check_bool,
    check_choice,
    check_int,
    check_mapping,
    check_number,
    check_positive,
)

__all__ = ["REFERENCES", "MILESOptions", "OptionsState", "decide_with_options"]

#: what each head is measured against before ``delta``: nothing (Algorithm 1), its unimodal
#: model's metric, or its own best so far
REFERENCES = ("none", "unimodal", "best")


@dataclass(frozen=True)
class MILESOptions:
    """The decision options (see the module docstring); the defaults are Algorithm 1."""

    warmup: int = 0
    smoothing: float = 0.0
    release_tau: float | None = None
    min_duration: int = 1
    reference: str = "none"
    references: dict[str, float] | None = field(default=None, hash=False)
    pairwise: bool = False

    def __post_init__(self) -> None:
        check_int("warmup", self.warmup, minimum=0)
        check_number("smoothing", self.smoothing, low=0, high=1, high_open=True)
        if self.release_tau is not None:
            check_number("release_tau", self.release_tau, low=0)
        check_int("min_duration", self.min_duration, minimum=1)
        check_choice("reference", self.reference, REFERENCES)
        check_bool("pairwise", self.pairwise)
        if self.reference == "unimodal":
            if self.references is None:
                raise ValueError(
                    "reference='unimodal' needs references={modality: metric of its unimodal "
                    "model} (on the metric MILES reads, e.g. validation accuracy)"
                )
            refs = check_mapping("references", self.references, check_positive)
            object.__setattr__(self, "references", refs)
        elif self.references is not None:
            raise ValueError(
                f"references are only read with reference='unimodal', not "
                f"reference={self.reference!r}"
            )

    @property
    def is_default(self) -> bool:
        """Every option off: MILES then runs Algorithm 1's own code path."""
        return self == MILESOptions()

    def check_for(self, tau: float, mode: str, modalities: tuple[str, ...] | None) -> None:
        """Refuse options that do not fit the scheduler they are given to (``modalities``:
        ``None`` before they are known)."""
        if self.release_tau is not None and self.release_tau > tau:
            raise ValueError(f"release_tau ({self.release_tau}) must be <= tau ({tau})")
        if self.reference != "none" and mode != "max":
            raise ValueError("reference-aware MILES needs scores (mode='max')")
        if self.references is not None and modalities is not None:
            missing = [m for m in modalities if m not in self.references]
            extra = [m for m in self.references if m not in modalities]
            if missing or extra:
                raise ValueError(
                    f"references must name exactly the modalities {list(modalities)}; "
                    f"missing {missing}, unknown {extra}"
                )

    def describe(self) -> dict[str, Any]:
        """The options that differ from Algorithm 1's (empty by default)."""
        default = asdict(MILESOptions())
        return {k: v for k, v in asdict(self).items() if v != default[k]}

    @classmethod
    def from_value(cls, value: MILESOptions | Mapping[str, Any] | None) -> MILESOptions:
        if value is None:
            return cls()
        if isinstance(value, MILESOptions):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"options must be a MILESOptions or a mapping, got {value!r}")
        known = {f for f in asdict(cls())}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown MILES options {unknown}; known: {sorted(known)}")
        return cls(**dict(value))


@dataclass
class OptionsState:
    """What the options remember between decisions (saved in the scheduler's state dict)."""

    decisions: int = 0
    smoothed: dict[str, float] | None = None
    best: dict[str, float] = field(default_factory=dict)
    held: str | None = None
    streak: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OptionsState:
        if not isinstance(data, Mapping):
            raise ValueError(f"options state must be a mapping, got {data!r}")
        try:
            smoothed = data["smoothed"]
            return cls(
                decisions=check_int("decisions", data["decisions"], minimum=0),
                smoothed=None
                if smoothed is None
                else {str(k): float(v) for k, v in smoothed.items()},
                best={str(k): float(v) for k, v in data["best"].items()},
                held=None if data["held"] is None else str(data["held"]),
                streak=check_int("streak", data["streak"], minimum=0),
            )
        except (KeyError, AttributeError, TypeError) as exc:
            raise ValueError(f"options state is malformed: {exc!r}") from None


def _smooth(
    options: MILESOptions, state: OptionsState, fused: float, metrics: Mapping[str, float]
) -> tuple[float, dict[str, float]]:
    """The EMA of ``{"": fused, **metrics}`` (the raw values themselves when ``smoothing = 0``)."""
    current = {"": fused, **metrics}
    if options.smoothing == 0.0:
        return fused, dict(metrics)
    beta = options.smoothing
    if state.smoothed is None:
        state.smoothed = dict(current)
    else:
        state.smoothed = {k: (1 - beta) * v + beta * state.smoothed[k] for k, v in current.items()}
    values = dict(state.smoothed)
    return values.pop(""), values


def _referenced(
    options: MILESOptions, state: OptionsState, metrics: Mapping[str, float]
) -> dict[str, float]:
    """Each head over its own reference (``r_m``)."""
    if options.reference == "unimodal":
        assert options.references is not None
        return {m: v / options.references[m] for m, v in metrics.items()}
    for m, v in metrics.items():
        state.best[m] = max(v, state.best.get(m, v))
    return {m: (v / state.best[m] if state.best[m] > 0 else 1.0) for m, v in metrics.items()}


def decide_with_options(
    options: MILESOptions,
    state: OptionsState,
    *,
    fused: float,
    estimator: str,
    metrics: Mapping[str, float],
    tau: float,
    mode: str,
    scale: float | None,
) -> tuple[dict[str, float], float, str | None, str]:
    """One decision under ``options``: ``(u, delta, slowed, reason)``; updates ``state``.

    ``metrics`` are the unimodal heads' (``estimator="heads"``) or the ablated fused metrics
    (``"ablation"``), already validated by the scheduler.
    """
    if options.reference != "none" and estimator != "heads":
        raise ValueError("reference-aware MILES reads the unimodal heads: use estimator 'heads'")
    if options.pairwise and estimator != "heads":
        raise ValueError(
            "pairwise MILES compares the unimodal heads; with the ablation estimator delta "
            "already compares every pair of u"
        )
    state.decisions += 1
    fused, values = _smooth(options, state, fused, metrics)
    kind = "unimodal" if estimator == "heads" else "without"
    if options.reference != "none":
        values = _referenced(options, state, values)
        fused, scale = 1.0, math.inf
    u = conditional_utilization(fused, **{kind: values}, mode=mode, scale=scale)
    if options.pairwise:
        scores = _scores(values, mode)
        fused_score = _scores({"": fused}, mode)[""]
        ratio = {m: s / fused_score for m, s in scores.items()}
        delta = max(ratio.values()) - min(ratio.values())
        if delta <= tau:
            slowed, reason = None, "balanced"
        elif all(r > 1 for r in ratio.values()):
            slowed, reason = None, "all-negative"
        else:
            slowed, reason = max(ratio, key=lambda m: ratio[m]), "slowed"
    else:
        delta = imbalance(u)
        slowed, reason = decide(u, tau)

    if state.decisions <= options.warmup:
        slowed, reason = None, "warm-up"
    elif slowed is None and state.held is not None:
        top = max(u, key=lambda m: u[m])
        hysteresis = (
            reason == "balanced"
            and options.release_tau is not None
            and delta > options.release_tau
            and top == state.held
        )
        if hysteresis or state.streak < options.min_duration:
            slowed, reason = state.held, "held"
    if slowed is None:
        state.held, state.streak = None, 0
    else:
        state.streak = state.streak + 1 if slowed == state.held else 1
        state.held = slowed
    return u, delta, slowed, reason
