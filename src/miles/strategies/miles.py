"""MILES as a trainer strategy: a thin adapter over the standalone :class:`miles.MILES`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from miles.metrics import ablated_fused_scores, make_metric
from miles.scheduler import MILES, _check_mu
from miles.strategies.base import EvalResult, StrategyContext
from miles.strategies.joint import JointAux
from miles.strategies.registry import register_strategy
from miles.utilization import _check_tau
from miles.validation import check_bool, check_choice

ESTIMATORS = ("heads", "ablation")
ABLATION_FILLS = ("mean", "zeros")


@register_strategy("miles")
class MILESStrategy(JointAux):
    """Joint+aux training whose per-modality learning rates MILES sets after every validation.

    Args:
        tau: imbalance threshold on ``delta = max u - min u``.
        mu: factor applied to the dominant modality's base learning rate.
        reset_other: reset the other modalities to the base rate when one is slowed.
        estimator: ``"heads"`` (the paper: unimodal head metrics) or ``"ablation"`` (the fused
            head re-run with one modality's latent replaced by its validation mean).
        ablation_fill: what replaces the latent for the ablation estimator: ``"mean"`` or
            ``"zeros"``.
        head_follows_encoder: slow each unimodal head together with its encoder (default) or
            keep the heads at the base rate.
        aux_weights: ``w_m`` of the auxiliary losses (1 in the paper).
    """

    name = "miles"

    def __init__(
        self,
        tau: float = 0.2,
        mu: float = 0.5,
        reset_other: bool = False,
        estimator: str = "heads",
        ablation_fill: str = "mean",
        head_follows_encoder: bool = True,
        aux_weights: float | dict[str, float] = 1.0,
    ) -> None:
        # Checked here, not at on_fit_start, so a bad config fails before any training.
        super().__init__(aux_weights)
        self.tau, self.mu = _check_tau(tau), _check_mu(mu)
        self.reset_other = check_bool("reset_other", reset_other)
        self.head_follows_encoder = check_bool("head_follows_encoder", head_follows_encoder)
        self.estimator = check_choice("estimator", estimator, ESTIMATORS)
        self.ablation_fill = check_choice("ablation_fill", ablation_fill, ABLATION_FILLS)
        self.needs_latents = estimator == "ablation"
        self.scheduler: MILES | None = None
        #: scheduler state from load_state_dict, loaded into the scheduler on_fit_start builds
        self._restored: dict[str, Any] | None = None

    def on_fit_start(self, ctx: StrategyContext) -> None:
        """Build the scheduler on the (restored, when resuming) optimizer; apply restored state.

        The trainer's base schedule (``ctx.lr_schedule``: warm-up, cosine, ...) becomes the
        scheduler's ``base=``: every group trains at ``schedule x factor``.
        """
        self.scheduler = MILES(
            ctx.optimizer,
            tau=self.tau,
            mu=self.mu,
            reset_other=self.reset_other,
            base=ctx.lr_schedule,
        )
        if self._restored is not None:
            self.scheduler.load_state_dict(self._restored)
            self._restored = None

    def step_lr_schedule(self, ctx: StrategyContext) -> None:
        """One step of the base schedule, taken by MILES with its factors removed."""
        if ctx.lr_schedule is None:
            return
        if self.scheduler is None:
            raise RuntimeError("MILESStrategy.on_fit_start was not called")
        self.scheduler.step()

    def on_epoch_end(
        self, ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None
    ) -> dict[str, Any]:
        if self.scheduler is None:
            raise RuntimeError("MILESStrategy.on_fit_start was not called")
        if val.fused <= 0:
            # u is undefined when the fused metric is 0 (e.g. F1 in the first epoch): keep factors.
            self.scheduler.skip()
            return {"decision": None, "note": "fused metric is 0: no decision"}
        if self.estimator == "heads":
            decision = self.scheduler.step(fused=val.fused, unimodal=val.unimodal)
        else:
            if val.latents is None or val.target is None:
                raise RuntimeError("ablation estimator needs the validation latents")
            metric = make_metric(ctx.metric, ctx.model.num_classes, multilabel=ctx.multilabel)
            without = ablated_fused_scores(
                ctx.model,
                val.latents,
                val.target,
                metric.to(val.target.device),
                fill=self.ablation_fill,
            )
            decision = self.scheduler.step(fused=val.fused, without=without)
        assert decision is not None
        return {"decision": decision.to_dict()}

    def state_dict(self) -> dict[str, Any]:
        if self._restored is not None:  # loaded, not applied yet
            return {"scheduler": dict(self._restored)}
        return {"scheduler": self.scheduler.state_dict()} if self.scheduler is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Keep the scheduler's state; ``on_fit_start`` builds the scheduler and loads it."""
        unknown = sorted(set(state) - {"scheduler"})
        if unknown:
            raise ValueError(f"MILESStrategy state has unexpected keys {unknown}")
        sched_state = state.get("scheduler")
        self._restored = None if sched_state is None else dict(sched_state)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "tau": self.tau,
            "mu": self.mu,
            "reset_other": self.reset_other,
            "estimator": self.estimator,
            **({"ablation_fill": self.ablation_fill} if self.estimator == "ablation" else {}),
        }
