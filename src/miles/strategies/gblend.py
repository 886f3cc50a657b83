"""Gradient-Blending (G-Blend) as a trainer strategy: online (Alg. 3), offline (Alg. 2), and our
earlier trajectory estimator as a named option.

Wang, Tran & Feiszli, "What Makes Training Multi-Modal Classification Networks Hard?", CVPR 2020
(arXiv 1905.12681). One of the baselines of the MILES paper. Equations and algorithm steps are
mapped to the functions below in ``docs/baselines.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from miles.models.fusion import FusionOutput
from miles.models.losses import FUSED
from miles.strategies.base import EvalResult, StrategyContext
from miles.strategies.joint import JointAux
from miles.strategies.registry import register_strategy
from miles.validation import (
    check_choice,
    check_fraction,
    check_positive,
    check_positive_int,
)

NORMALIZATIONS = ("sum-to-one", "sum-to-heads")
#: how an estimate is made: per-head copies, at epoch 0 and then every super-epoch (the paper's
#: online G-Blend, Alg. 3); once at epoch 0 with copies trained for the whole run (Alg. 2); or
#: read off the blended model's own trajectory (ours, before copies existed; not the paper)
MODES = ("online", "offline", "trajectory")
#: what a negative generalisation ``G`` (held-out loss went up) gives: weight 0 (ours), the
#: signed ratio of Prop. 1 (the paper: "w_k in R"), or ``|G|`` (BalanceBenchmark)
NEGATIVE = ("clamp", "signed", "abs")

__all__ = [
    "MODES",
    "NEGATIVE",
    "NORMALIZATIONS",
    "GBlend",
    "estimate_with_copies",
    "gblend_weights",
]


def _check_losses(name: str, losses: Mapping[str, float], heads: list[str]) -> None:
    if sorted(losses) != sorted(heads):
        raise ValueError(f"{name} has heads {sorted(losses)}, expected {sorted(heads)}")
    for head, value in losses.items():
        if not math.isfinite(value):
            raise ValueError(f"{name}[{head!r}] must be finite, got {value!r}")


def ogr_terms(
    train_prev: Mapping[str, float],
    train_now: Mapping[str, float],
    holdout_prev: Mapping[str, float],
    holdout_now: Mapping[str, float],
) -> dict[str, dict[str, float]]:
    """``{"G": {head: G}, "dO": {head: dO}}`` over one window ``N -> N + n`` (Sec. 2.2, Eq. 3).

    ``O = L^V - L^T`` (overfitting), ``G = L^V_N - L^V_{N+n}`` (generalisation gained: the
    held-out loss *decrease*), ``dO = O_{N+n} - O_N``.
    """
    heads = list(holdout_now)
    if not heads:
        raise ValueError("need at least one head")
    for name, losses in (
        ("train_prev", train_prev),
        ("train_now", train_now),
        ("holdout_prev", holdout_prev),
        ("holdout_now", holdout_now),
    ):
        _check_losses(name, losses, heads)
    gain = {h: holdout_prev[h] - holdout_now[h] for h in heads}
    d_over = {h: (holdout_now[h] - train_now[h]) - (holdout_prev[h] - train_prev[h]) for h in heads}
    return {"G": gain, "dO": d_over}


def gblend_weights(
    train_prev: Mapping[str, float],
    train_now: Mapping[str, float],
    holdout_prev: Mapping[str, float],
    holdout_now: Mapping[str, float],
    *,
    eps: float = 1e-8,
    total: float = 1.0,
    uniform_floor: float = 0.0,
    negative: str = "clamp",
) -> dict[str, float]:
    """G-Blend weights of every head from its losses at two checkpoints ``prev`` -> ``now``.

    Per head ``h`` (Prop. 1, Eq. 6, with ``L*`` estimated on the held-out set ``V``; see
    :func:`ogr_terms` for ``G`` and ``dO``)::

        w_h ~ G / max(dO ** 2, eps)                  "w* = <grad L*, v> / (Z sigma^2)"

    then divided by their sum and multiplied by ``total`` (1 in the paper: its constraint
    ``sum_k w_k = 1``; the printed ``Z`` has a stray factor 1/2, every published weight vector sums
    to 1). ``negative`` says what a head whose held-out loss went *up* (``G < 0``) gets:
    ``"clamp"`` (default, ours) weight 0 until the next estimate, since a negative weight would
    make its loss an ascent direction; ``"signed"`` the paper's literal signed ratio (Prop. 1
    allows ``w in R``); ``"abs"`` ``|G| / dO^2`` (BalanceBenchmark). If the ratios sum to 0 or
    less (no head generalised), the weights are uniform (ours). ``dO ~ 0`` (no measurable
    overfitting) is floored at ``eps``: such a head takes (almost) all the weight, the formula's
    limit.

    ``uniform_floor = f`` in ``[0, 1]`` mixes the result with the uniform weights,
    ``w = f * total / H + (1 - f) * w_GBlend`` (ours; ``0``: the paper).
    """
    terms = ogr_terms(train_prev, train_now, holdout_prev, holdout_now)
    heads = list(holdout_now)
    check_positive("eps", eps)
    check_positive("total", total)
    check_fraction("uniform_floor", uniform_floor, one=True)
    check_choice("negative", negative, NEGATIVE)
    raw: dict[str, float] = {}
    for h in heads:
        gain, d_over = terms["G"][h], terms["dO"][h]
        if negative == "clamp":
            gain = max(gain, 0.0)
        elif negative == "abs":
            gain = abs(gain)
        raw[h] = gain / max(d_over * d_over, eps)
    uniform = total / len(heads)
    z = sum(raw.values())
    if not z > 0 or not math.isfinite(z):
        return dict.fromkeys(heads, uniform)
    if uniform_floor == 0.0:
        return {h: total * r / z for h, r in raw.items()}
    keep = 1.0 - uniform_floor
    return {h: uniform_floor * uniform + keep * (total * r / z) for h, r in raw.items()}


def _head_loss(head: str) -> Any:
    def loss(
        losses: Mapping[str, Tensor], output: FusionOutput, batch: Mapping[str, Any]
    ) -> Tensor:
        return losses[head]

    return loss


def estimate_with_copies(
    ctx: StrategyContext, *, epochs: int, seed: int
) -> dict[str, dict[str, float]]:
    """The losses of Alg. 1 (``GB_Estimate(phi_N, n)``) from the run's current checkpoint.

    For each head ``i`` (the fused head, then every modality): a copy of the current model
    (``phi_N``) is trained with head ``i``'s loss alone for ``epochs`` (``n``) epochs on the
    training part ``T`` (``ctx.train_loader``, without the held-out ``V``), with a fresh optimizer
    built like the run's (:func:`~miles.training.copies.train_copy`, seeded ``seed + i``). The
    copy of a unimodal head trains that modality's encoder and classifier (its loss reaches
    nothing else); the copy of the fused head is the naive multimodal network. Then, per head,
    the mean loss on ``T'`` (``ctx.train_probe_loader``) and on ``V`` (``ctx.holdout_loader``),
    eval mode, at ``phi_N`` (the run's model) and after training (head ``i``'s copy).

    Returns ``{"train_prev", "train_now", "holdout_prev", "holdout_now"}``, each ``{head: loss}``,
    for :func:`gblend_weights`. The run's model, optimizer and random streams are untouched.
    """
    from miles.training.copies import mean_head_losses, train_copy

    if ctx.holdout_loader is None or ctx.train_probe_loader is None:
        raise ValueError(
            "G-Blend needs a held-out slice V of the training set (holdout_fraction > 0); the "
            "trainer gave no ctx.holdout_loader / ctx.train_probe_loader"
        )
    heads = [FUSED, *ctx.model.modalities]
    train_prev = mean_head_losses(ctx, ctx.train_probe_loader)
    holdout_prev = mean_head_losses(ctx, ctx.holdout_loader)
    train_now: dict[str, float] = {}
    holdout_now: dict[str, float] = {}
    for i, head in enumerate(heads):
        copy = train_copy(ctx, _head_loss(head), epochs=epochs, seed=seed + i)
        train_now[head] = mean_head_losses(ctx, ctx.train_probe_loader, model=copy)[head]
        holdout_now[head] = mean_head_losses(ctx, ctx.holdout_loader, model=copy)[head]
    return {
        "train_prev": {h: train_prev[h] for h in heads},
        "train_now": train_now,
        "holdout_prev": {h: holdout_prev[h] for h in heads},
        "holdout_now": holdout_now,
    }


@register_strategy("gblend")
class GBlend(JointAux):
    """Gradient-Blending: ``L = sum_h w_h L_h`` over the fused head and every unimodal head (Eq. 7),
    the weights from each head's overfitting-to-generalization ratio (Prop. 1).

    **Estimating the weights** (``mode``):

    * ``"online"`` (default; the paper's Alg. 3, its best result): at the start of epoch 1 (from
      the initial checkpoint, epoch 0) and then every ``super_epoch`` epochs after a first,
      longer super-epoch of ``warmup_epochs`` (estimates from the checkpoints of epochs 0, 10,
      15, 20, ...: "an initial super-epoch size of 10 (for warmup), and a super-epoch size of 5
      thereafter", Sec. 3.3, Fig. 5), the weights come from :func:`estimate_with_copies` (Alg. 1:
      one copy per head trained alone for the coming super-epoch's length ``n`` on ``T``, scored
      on ``T'`` and on a held-out ``V``) and are fixed for that super-epoch. Since every head is
      re-tested by its own copy, a head with weight 0 is not stuck at 0: its next estimate does
      not depend on its blended weight.
    * ``"offline"`` (Alg. 2): one estimate at epoch 0, copies trained for ``offline_epochs``
      (default: the run's length, Alg. 2's literal ``N``; it costs ``(heads + 1) x N`` epochs),
      weights fixed for the whole run.
    * ``"trajectory"`` (ours, **not the paper**; kept only as a named option): the same schedule,
      but ``G`` and ``dO`` are read off the blended model's own trajectory between two
      checkpoints (held-out loss from the trainer's end-of-epoch pass, training loss on ``T'``),
      uniform weights until the first estimate. A head whose weight reaches 0 stops learning,
      so its ``G`` stays ``<= 0`` and its weight 0: an absorbing state ``uniform_floor`` avoids.

    ``V`` is a seeded ``holdout_fraction`` of the training set held out by the trainer: neither
    the run nor the copies train on it (the paper: 8 % on Kinetics); ``T'`` is a fixed slice of
    the training part as large as ``V`` (the paper: "a subset of training set"). Losses are mean
    per-sample losses in eval mode. The copies' optimizer is the run's kind and settings at its
    base learning rate, with a fresh state (the paper is silent; BalanceBenchmark also starts
    fresh). Copies train with their own seeded shuffling and a forked random state, so the run is
    changed only by the weights.

    **Normalisation**: ``"sum-to-one"`` (default: the paper's ``sum_k w_k = 1``); uniform weights
    are then ``1/H``, i.e. ``joint+aux`` with the loss scaled by ``1/H`` (almost the same under
    Adam, a ``1/H`` learning rate under SGD). ``"sum-to-heads"`` rescales to ``sum = H``: uniform
    weights are exactly 1, ``joint+aux`` bit for bit.

    Args:
        mode: ``"online"``, ``"offline"`` or ``"trajectory"`` (see above).
        warmup_epochs: length of the first super-epoch, whose weights are estimated at epoch 0;
            10 (the paper).
        super_epoch: length of every later super-epoch; 5 (the paper).
        offline_epochs: epochs each copy trains in ``"offline"`` mode; ``None``: the run's
            epochs (Alg. 2 literally).
        holdout_fraction: share of the training set held out as ``V``, in ``(0, 1)``; 0.08 (the
            paper's Kinetics value; 13 % on mini-AudioSet).
        normalize: ``"sum-to-one"`` or ``"sum-to-heads"``.
        negative: what a head with ``G < 0`` gets: ``"clamp"`` (0; ours, default), ``"signed"``
            (the paper) or ``"abs"`` (BalanceBenchmark); see :func:`gblend_weights`.
        eps: floor on ``dO^2`` (1e-8).
        uniform_floor: ``f`` in ``[0, 1]``: every head keeps at least ``f`` times its uniform
            share (ours; 0 is the paper, 1 uniform weights throughout).

    Every estimate is in the history (``G``, ``dO``, the losses and the weights). Works with any
    number of modalities and with multilabel targets (BCE per head). The unimodal heads must be
    attached (it is ``joint+aux`` with its own weights).
    """

    name = "gblend"
    uses_aux_losses = True

    def __init__(
        self,
        mode: str = "online",
        warmup_epochs: int = 10,
        super_epoch: int = 5,
        offline_epochs: int | None = None,
        holdout_fraction: float = 0.08,
        normalize: str = "sum-to-one",
        negative: str = "clamp",
        eps: float = 1e-8,
        uniform_floor: float = 0.0,
    ) -> None:
        super().__init__()  # joint+aux: attached heads; the loss is G-Blend's own
        self.mode = check_choice("mode", mode, MODES)
        self.warmup_epochs = check_positive_int("warmup_epochs", warmup_epochs)
        self.super_epoch = check_positive_int("super_epoch", super_epoch)
        self.offline_epochs = (
            None if offline_epochs is None else check_positive_int("offline_epochs", offline_epochs)
        )
        self.holdout_fraction = check_fraction("holdout_fraction", holdout_fraction, zero=False)
        self.normalize = check_choice("normalize", normalize, NORMALIZATIONS)
        self.negative = check_choice("negative", negative, NEGATIVE)
        self.eps = check_positive("eps", eps)
        self.uniform_floor = check_fraction("uniform_floor", uniform_floor, one=True)
        self._heads: list[str] = []
        self._restored = False  # load_state_dict gave weights for on_fit_start to keep
        self._pending: dict[str, Any] | None = None  # this epoch's estimate, for its record
        self._reset()

    # -- schedule ----------------------------------------------------------------------------------
    def estimate_length(self, checkpoint: int, run_epochs: int) -> int | None:
        """Epochs the copies train when estimating from the checkpoint of epoch ``checkpoint``
        (0: the initial model), ``None`` when no estimate is taken there.

        Online: ``warmup_epochs`` at 0, ``super_epoch`` at ``warmup + k * super_epoch``; offline:
        ``offline_epochs`` (or ``run_epochs``) at 0; trajectory: never (it estimates at the end
        of those epochs, without copies).
        """
        if self.mode == "offline":
            return (self.offline_epochs or run_epochs) if checkpoint == 0 else None
        if self.mode == "trajectory":
            return None
        if checkpoint == 0:
            return self.warmup_epochs
        if (
            checkpoint >= self.warmup_epochs
            and (checkpoint - self.warmup_epochs) % self.super_epoch == 0
        ):
            return self.super_epoch
        return None

    def _trajectory_point(self, epoch: int) -> bool:
        """Epoch ``warmup + k * super_epoch`` (``k >= 0``): where a later super-epoch starts (the
        online checkpoints after 0; trajectory mode estimates at the end of these epochs)."""
        return epoch >= self.warmup_epochs and (epoch - self.warmup_epochs) % self.super_epoch == 0

    # -- helpers -----------------------------------------------------------------------------------
    def _reset(self) -> None:
        """Forget everything learnt in a previous fit (a resumed fit reloads it afterwards)."""
        self.weights: dict[str, float] = {}
        # trajectory mode: losses at the last checkpoint (None until checkpoint 0 is taken)
        self._ref_epoch: int | None = None
        self._ref_train: dict[str, float] = {}
        self._ref_holdout: dict[str, float] = {}

    def _total(self, n_heads: int) -> float:
        return 1.0 if self.normalize == "sum-to-one" else float(n_heads)

    def _uniform(self) -> dict[str, float]:
        n = len(self._heads)
        return {h: self._total(n) / n for h in self._heads}

    def _weights_from(self, losses: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
        """The estimate's record: its losses, ``G``, ``dO`` and the weights they give."""
        new = gblend_weights(
            losses["train_prev"],
            losses["train_now"],
            losses["holdout_prev"],
            losses["holdout_now"],
            eps=self.eps,
            total=self._total(len(self._heads)),
            uniform_floor=self.uniform_floor,
            negative=self.negative,
        )
        terms = ogr_terms(
            losses["train_prev"], losses["train_now"], losses["holdout_prev"], losses["holdout_now"]
        )
        return {**{k: dict(v) for k, v in losses.items()}, **terms, "weights": new}

    # -- hooks -----------------------------------------------------------------------------------
    def on_fit_start(self, ctx: StrategyContext) -> None:
        if ctx.holdout_loader is None or ctx.train_probe_loader is None:
            raise ValueError(
                "G-Blend needs a held-out slice of the training set (holdout_fraction > 0); "
                "the trainer gave no ctx.holdout_loader / ctx.train_probe_loader"
            )
        if ctx.model.detach_unimodal_heads:
            raise ValueError(
                "G-Blend blends the unimodal losses into the encoders' gradients; the model has "
                "detach_unimodal_heads=True"
            )
        self._heads = [FUSED, *ctx.model.modalities]
        if not self._restored:  # a fresh fit starts over, even when this object trained before
            self._reset()
            self.weights = self._uniform()
        self._restored = False

    def on_epoch_start(self, ctx: StrategyContext, epoch: int) -> None:
        from miles.training.copies import mean_head_losses

        if sorted(self.weights) != sorted(self._heads):  # e.g. a state restored for another model
            raise ValueError(
                f"G-Blend weights are for heads {sorted(self.weights)}, the model has "
                f"{sorted(self._heads)}"
            )
        self._pending = None
        if self.mode == "trajectory":
            if self._ref_epoch is None:  # checkpoint 0 (a resumed run restores it instead)
                assert ctx.train_probe_loader is not None and ctx.holdout_loader is not None
                self._ref_train = mean_head_losses(ctx, ctx.train_probe_loader)
                self._ref_holdout = mean_head_losses(ctx, ctx.holdout_loader)
                self._ref_epoch = epoch - 1
            return
        length = self.estimate_length(epoch - 1, ctx.epochs)
        if length is None:
            return
        seed = (ctx.seed * 100_003 + epoch) * 101
        record = self._weights_from(estimate_with_copies(ctx, epochs=length, seed=seed))
        record.update(checkpoint=epoch - 1, copy_epochs=length)
        self.weights = dict(record["weights"])
        self._pending = record

    def loss(
        self, losses: Mapping[str, Tensor], output: FusionOutput, batch: Mapping[str, Any]
    ) -> Tensor:
        """``sum_h w_h L_h`` (fused first, then modalities: the base class's summation order)."""
        w = self.weights
        total = w[FUSED] * losses[FUSED]
        for h, value in losses.items():
            if h != FUSED:
                total = total + w[h] * value
        return total

    def on_epoch_end(
        self, ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None
    ) -> dict[str, Any]:
        from miles.training.copies import mean_head_losses

        record: dict[str, Any] = {"weights": dict(self.weights), "estimated": False}
        if self._pending is not None:  # online / offline: estimated for this epoch, at its start
            record.update(estimated=True, estimate=self._pending)
            self._pending = None
            return record
        if self.mode != "trajectory" or not self._trajectory_point(epoch):
            return record
        if holdout is None:
            raise RuntimeError("G-Blend: the trainer passed no held-out evaluation")
        if self._ref_epoch is None:
            raise RuntimeError("G-Blend: on_epoch_start was not called (no checkpoint 0)")
        assert ctx.train_probe_loader is not None
        now_train = mean_head_losses(ctx, ctx.train_probe_loader)
        now_holdout = {FUSED: float(holdout.loss), **holdout.unimodal_loss}
        estimate = self._weights_from(
            {
                "train_prev": self._ref_train,
                "train_now": {h: now_train[h] for h in self._heads},
                "holdout_prev": self._ref_holdout,
                "holdout_now": {h: float(now_holdout[h]) for h in self._heads},
            }
        )
        estimate.update(checkpoint=self._ref_epoch, applies_from=epoch + 1)
        record.update(estimated=True, estimate=estimate)
        self.weights = dict(estimate["weights"])
        self._ref_epoch = epoch
        self._ref_train = dict(estimate["train_now"])
        self._ref_holdout = dict(estimate["holdout_now"])
        return record

    # -- persistence -------------------------------------------------------------------------------
    _STATE = ("weights", "ref_epoch", "ref_train", "ref_holdout")

    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": dict(self.weights),
            "ref_epoch": self._ref_epoch,
            "ref_train": dict(self._ref_train),
            "ref_holdout": dict(self._ref_holdout),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) != set(self._STATE):
            raise ValueError(
                f"GBlend state must have keys {sorted(self._STATE)}, got {sorted(state)}"
            )
        self.weights = {str(k): float(v) for k, v in state["weights"].items()}
        self._ref_epoch = None if state["ref_epoch"] is None else int(state["ref_epoch"])
        self._ref_train = {str(k): float(v) for k, v in state["ref_train"].items()}
        self._ref_holdout = {str(k): float(v) for k, v in state["ref_holdout"].items()}
        self._restored = True

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(
            mode=self.mode,
            warmup_epochs=self.warmup_epochs,
            super_epoch=self.super_epoch,
            holdout_fraction=self.holdout_fraction,
            normalize=self.normalize,
            negative=self.negative,
            eps=self.eps,
            uniform_floor=self.uniform_floor,
        )
        if self.mode == "offline":
            info["offline_epochs"] = self.offline_epochs
        return info
