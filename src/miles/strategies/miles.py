"""MILES as a trainer strategy: a thin adapter over the standalone :class:`miles.MILES`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from miles.metrics import ablated_fused_scores, make_metric
from miles.options import MILESOptions
from miles.scheduler import MILES, _check_mu
from miles.strategies.base import EvalResult, StrategyContext
from miles.strategies.joint import JointAux
from miles.strategies.registry import register_strategy
from miles.utilization import _check_tau
from miles.validation import check_bool, check_choice

ESTIMATORS = ("heads", "ablation")
ABLATION_FILLS = ("mean", "zeros")
#: where the metrics of Eq. 4 come from: validation (the paper's tables) or the training set
#: (its Table VI ablation)
METRIC_SOURCES = ("validation", "training")


@register_strategy("miles")
class MILESStrategy(JointAux):
    """Joint+aux training whose per-modality learning rates MILES sets after every validation.

    Args:
        tau: imbalance threshold on ``delta = max u - min u``.
        mu: factor applied to the dominant modality's base learning rate.
        reset_other: reset the other modalities to the base rate when one is slowed. ``False``
            (default) is Alg. 1 literally (lines 13-20 set only the dominant modality's rate);
            ``True`` is the "one modality slowed at a time" reading of the text. ``miles compare``
            reports both.
        estimator: ``"heads"`` (the paper: unimodal head metrics) or ``"ablation"`` (the fused
            head re-run with one modality's latent replaced by its validation mean).
        ablation_fill: what replaces the latent for the ablation estimator: ``"mean"`` or
            ``"zeros"``.
        head_follows_encoder: slow each unimodal head together with its encoder (default) or
            keep the heads at the base rate.
        aux_weights: ``w_m`` of the auxiliary losses (1 in the paper).
        metrics: ``"validation"`` (default; the paper's Tables II and III) or ``"training"``:
            the utilization rates (Eq. 4) from training-set metrics, the paper's Table VI
            ablation ("computing the conditional utilization rates (Eq. 4) using the training set
            performance metrics instead of the validation set metrics"). The paper does not say
            how they were measured; ours is a separate eval-mode pass over the training part
            after each epoch (the validation pass's code, no shuffling, the run's random streams
            untouched). The best epoch is still chosen on validation.
        warmup: decisions skipped at the start (:class:`miles.options.MILESOptions`, like
            every option below; all off by default, which is Algorithm 1 bit for bit).
        smoothing: EMA weight of the previous metrics (0: none).
        release_tau: hysteresis: a slowed modality stays slowed until ``delta`` falls to it.
        min_duration: the fewest epochs a slow-down lasts (1: Algorithm 1).
        reference: ``"none"``, ``"unimodal"`` (with ``references``) or ``"best"``: each head
            measured against its own reference before ``delta``.
        references: ``{modality: metric of its unimodal model}`` for ``reference="unimodal"``.
        pairwise: the pairwise rule for N > 2 modalities (heads estimator).
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
        metrics: str = "validation",
        warmup: int = 0,
        smoothing: float = 0.0,
        release_tau: float | None = None,
        min_duration: int = 1,
        reference: str = "none",
        references: dict[str, float] | None = None,
        pairwise: bool = False,
    ) -> None:
        # Checked here, not at on_fit_start, so a bad config fails before any training.
        super().__init__(aux_weights)
        self.metrics = check_choice("metrics", metrics, METRIC_SOURCES)
        if metrics == "training" and estimator == "ablation":
            raise ValueError(
                "metrics='training' reads the heads on the training set; the ablation estimator "
                "needs validation latents (use estimator='heads')"
            )
        self.tau, self.mu = _check_tau(tau), _check_mu(mu)
        self.reset_other = check_bool("reset_other", reset_other)
        self.head_follows_encoder = check_bool("head_follows_encoder", head_follows_encoder)
        self.estimator = check_choice("estimator", estimator, ESTIMATORS)
        self.ablation_fill = check_choice("ablation_fill", ablation_fill, ABLATION_FILLS)
        self.needs_latents = estimator == "ablation"
        self.options = MILESOptions(
            warmup=warmup,
            smoothing=smoothing,
            release_tau=release_tau,
            min_duration=min_duration,
            reference=reference,
            references=references,
            pairwise=pairwise,
        )
        if estimator != "heads" and (reference != "none" or pairwise):
            raise ValueError(
                "reference-aware and pairwise MILES read the unimodal heads: use estimator='heads'"
            )
        self.options.check_for(self.tau, "max", None)
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
            options=self.options,
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
        extra: dict[str, Any] = {}
        if self.metrics == "training":
            val = self._training_metrics(ctx)
            extra["training_metrics"] = {"fused": val.fused, "unimodal": dict(val.unimodal)}
        if val.fused <= 0:
            # u is undefined when the fused metric is 0 (e.g. F1 in the first epoch): keep factors.
            self.scheduler.skip()
            return {"decision": None, "note": "fused metric is 0: no decision", **extra}
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
        return {"decision": decision.to_dict(), **extra}

    @staticmethod
    def _training_metrics(ctx: StrategyContext) -> EvalResult:
        """Every head's metric over the training part, in eval mode, unshuffled, with the run's
        random streams untouched (Table VI)."""
        import torch

        from miles.training.copies import in_order

        if ctx.train_loader is None:
            raise RuntimeError("metrics='training' needs ctx.train_loader (the trainer gives it)")
        with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
            return ctx.evaluate(in_order(ctx.train_loader))

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
            **({"metrics": self.metrics} if self.metrics != "validation" else {}),
            **self.options.describe(),  # nothing for Algorithm 1: its results are unchanged
        }
