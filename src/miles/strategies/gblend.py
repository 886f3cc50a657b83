"""Gradient-Blending (G-Blend, online variant) as a trainer strategy.

Wang, Tran & Feiszli, "What Makes Training Multi-Modal Classification Networks Hard?", CVPR 2020
(arXiv 1905.12681). One of the baselines of the MILES paper.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from miles.models.fusion import FusionOutput
from miles.models.losses import FUSED
from miles.strategies.base import EvalResult, StrategyContext
from miles.strategies.joint import JointAux
from miles.strategies.registry import register_strategy
from miles.validation import check_choice, check_fraction, check_positive, check_positive_int

NORMALIZATIONS = ("sum-to-one", "sum-to-heads")


def _check_losses(name: str, losses: Mapping[str, float], heads: list[str]) -> None:
    if sorted(losses) != sorted(heads):
        raise ValueError(f"{name} has heads {sorted(losses)}, expected {sorted(heads)}")
    for head, value in losses.items():
        if not math.isfinite(value):
            raise ValueError(f"{name}[{head!r}] must be finite, got {value!r}")


def gblend_weights(
    train_prev: Mapping[str, float],
    train_now: Mapping[str, float],
    holdout_prev: Mapping[str, float],
    holdout_now: Mapping[str, float],
    *,
    eps: float = 1e-8,
    total: float = 1.0,
    uniform_floor: float = 0.0,
) -> dict[str, float]:
    """G-Blend weights of every head from its losses at two checkpoints ``prev`` -> ``now``.

    Per head ``h`` (the paper's Sec. 3.3-3.4, with ``L*`` estimated on the held-out set ``V``)::

        O     = L_holdout - L_train                 overfitting at a checkpoint
        dG    = L_holdout(prev) - L_holdout(now)    generalisation gained (> 0 is good)
        dO    = O(now) - O(prev)                    overfitting gained
        w_h  ~ max(dG, 0) / max(dO ** 2, eps)       "w* = dG / (Z dO^2)", i.e. OGR^2-based

    then rescaled so the weights sum to ``total`` (1 in the paper). Why the guards: a head whose
    held-out loss did not improve (``dG <= 0``) would get a zero or negative weight from the
    formula; we clip it at 0 (the head is dropped until the next estimate). ``dO ~ 0`` means no
    measurable overfitting: ``eps`` keeps the ratio finite, so such a head takes (almost) all the
    weight, which is the formula's limit. If no head improved at all, the weights are uniform.

    ``uniform_floor = f`` in ``[0, 1]`` mixes the result with the uniform weights,
    ``w = f * total / H + (1 - f) * w_GBlend``: every head keeps at least ``f`` times its uniform
    share, the sum stays ``total`` and the order of the heads is unchanged (``0``: the paper).
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
    check_positive("eps", eps)
    check_positive("total", total)
    check_fraction("uniform_floor", uniform_floor, one=True)
    raw: dict[str, float] = {}
    for h in heads:
        gain = holdout_prev[h] - holdout_now[h]
        over_prev = holdout_prev[h] - train_prev[h]
        over_now = holdout_now[h] - train_now[h]
        d_over = over_now - over_prev
        raw[h] = max(gain, 0.0) / max(d_over * d_over, eps)
    uniform = total / len(heads)
    z = sum(raw.values())
    if not z > 0 or not math.isfinite(z):
        return dict.fromkeys(heads, uniform)
    if uniform_floor == 0.0:
        return {h: total * r / z for h, r in raw.items()}
    keep = 1.0 - uniform_floor
    return {h: uniform_floor * uniform + keep * (total * r / z) for h, r in raw.items()}


@register_strategy("gblend")
class GBlend(JointAux):
    """Online Gradient-Blending: the loss is ``sum_h w_h L_h`` over the fused head and every
    unimodal head, with ``w_h`` re-estimated every ``super_epoch`` epochs from each head's
    overfitting-to-generalization behaviour (Wang et al., CVPR 2020, Eq. "w* = dG / (Z dO^2)").

    How the weights are estimated (see :func:`gblend_weights`): ``L*`` is approximated by the loss
    on a held-out slice ``V`` of the *training* set (``holdout_fraction``; the trainer splits it
    off, seeded, and the model never trains on it). At checkpoints ``n = 0, k, 2k, ...`` we store,
    per head, the held-out loss and the training loss, both measured the same way: a clean
    no-grad pass in eval mode, over ``ctx.holdout_loader`` and over ``ctx.train_probe_loader`` (a
    fixed slice of the training part as large as ``V``). At ``n > 0`` the held-out losses are the
    trainer's own end-of-epoch pass (the ``holdout`` result of ``on_epoch_end``); checkpoint 0 is
    the untrained model, measured before the first epoch. Measurement biases that are the same at
    both checkpoints (eval mode, sampling of the slices) cancel in ``dG`` and ``dO``. The weights
    used during epochs ``n+1 .. n+k`` come from checkpoints ``n-k`` and ``n``. Before the first
    estimate (the first super-epoch) the weights are uniform. Our extra passes run inside
    ``torch.random.fork_rng`` so they do not change the run's random stream.

    Deviations from the paper, and why:

    * The paper's online G-Blend (and the tsai, MultiBench and BalanceBenchmark implementations)
      estimates the weights at the *start* of every super-epoch by training a copy of each uni-modal
      network and of the multi-modal network for ``k`` epochs on ``T' = T \\ V``. We instead read
      the OGR off the trajectory of the model being trained: our model already has one head per
      modality, and the strategy interface gives no training loader to train probe copies (and it
      would cost ``M + 1`` extra trainings per super-epoch). Hence the first super-epoch is uniform,
      and the OGRs are measured under the blended loss itself. A head whose weight falls to 0 stops
      training, so its ``dG`` stays ~0 and it tends to stay out until the fused/other heads stop
      generalising (the probe copies of the paper would re-test it from scratch); ``uniform_floor``
      prevents that.
    * Normalisation: the paper constrains ``sum_h w_h = 1`` (Proposition 2; its printed ``Z`` has
      a stray factor 1/2, and public implementations normalise to 1). That is our default
      ``normalize="sum-to-one"``; then uniform weights are ``1/H`` for ``H`` heads, i.e. joint+aux
      with the loss scaled by ``1/H`` (nearly irrelevant with Adam, a ``1/H`` learning rate with
      SGD). ``normalize="sum-to-heads"`` rescales to ``sum = H``: uniform weights are exactly 1,
      i.e. ``joint+aux`` bit-for-bit, comparable with the other baselines at the same LR.

    Args:
        super_epoch: ``k``, epochs between weight estimates. We could not retrieve the paper's
            value from our sources; 5 is the online default of the public tsai implementation
            (MultiBench uses 20, BalanceBenchmark makes it a setting). Must be ``>= 1``.
        holdout_fraction: share of the training set held out as ``V`` (tsai: 0.1; MultiBench:
            0.08). Must be in ``(0, 1)``.
        normalize: ``"sum-to-one"`` (paper) or ``"sum-to-heads"`` (uniform = joint+aux).
        eps: floor on ``dO^2`` (``dO ~ 0`` would divide by zero; 1e-8 as in tsai).
        uniform_floor: ``f`` in ``[0, 1]``: every head's weight is at least ``f`` times its
            uniform share (the estimate is mixed with the uniform weights, see
            :func:`gblend_weights`). Default ``0.0``, the paper, where a head whose held-out loss
            did not improve gets weight 0, the fused head included: its gradient then only comes
            through the encoders, although its validation metric picks the best epoch. A value
            like ``0.1`` keeps every head, the fused one in particular, training. ``1.0`` is
            uniform weights throughout.

    Uses the auxiliary unimodal losses (``uses_aux_losses = True``): every head's loss is in the
    blend, with G-Blend's weights (``JointAux``'s ``aux_weights`` are not used). Works with any
    number of modalities and with multilabel targets (BCE per head). Needs the trainer to hold
    out data (``ctx.holdout_loader`` and ``ctx.train_probe_loader``) and attached unimodal heads;
    raises otherwise. Note that it trains on ``1 - holdout_fraction`` of the training set, as in
    the paper.
    """

    name = "gblend"
    uses_aux_losses = True

    def __init__(
        self,
        super_epoch: int = 5,
        holdout_fraction: float = 0.1,
        normalize: str = "sum-to-one",
        eps: float = 1e-8,
        uniform_floor: float = 0.0,
    ) -> None:
        super().__init__()  # joint+aux: attached heads; the loss is G-Blend's own
        self.super_epoch = check_positive_int("super_epoch", super_epoch)
        self.holdout_fraction = check_fraction("holdout_fraction", holdout_fraction, zero=False)
        self.normalize = check_choice("normalize", normalize, NORMALIZATIONS)
        self.eps = check_positive("eps", eps)
        self.uniform_floor = check_fraction("uniform_floor", uniform_floor, one=True)
        self._heads: list[str] = []
        self._restored = False  # load_state_dict gave weights for on_fit_start to keep
        self._reset()

    # -- helpers -----------------------------------------------------------------------------------
    def _reset(self) -> None:
        """Forget everything learnt in a previous fit (a resumed fit reloads it afterwards)."""
        self.weights: dict[str, float] = {}
        # losses at the last checkpoint (None until checkpoint 0 is taken)
        self._ref_epoch: int | None = None
        self._ref_train: dict[str, float] = {}
        self._ref_holdout: dict[str, float] = {}
        self._last_estimate: int | None = None

    def _total(self, n_heads: int) -> float:
        return 1.0 if self.normalize == "sum-to-one" else float(n_heads)

    def _uniform(self) -> dict[str, float]:
        n = len(self._heads)
        return {h: self._total(n) / n for h in self._heads}

    @staticmethod
    def _per_head(result: EvalResult) -> dict[str, float]:
        """``{head: mean loss}`` of one evaluation pass, fused first."""
        return {FUSED: float(result.loss), **{m: float(v) for m, v in result.unimodal_loss.items()}}

    def _clean_losses(self, ctx: StrategyContext, loader: Any) -> dict[str, float]:
        """Per-head mean loss of ``loader`` (``ctx.evaluate``: eval mode, no grad), without
        touching the global RNG (DataLoader iterators draw a seed from it; the run must not depend
        on our extra passes)."""
        if loader is None:
            raise ValueError(
                "G-Blend needs ctx.holdout_loader and ctx.train_probe_loader (holdout_fraction > 0)"
            )
        with torch.random.fork_rng(devices=[]):
            return self._per_head(ctx.evaluate(loader))

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
        if sorted(self.weights) != sorted(self._heads):  # e.g. a state restored for another model
            raise ValueError(
                f"G-Blend weights are for heads {sorted(self.weights)}, the model has "
                f"{sorted(self._heads)}"
            )
        if self._ref_epoch is None:
            # checkpoint 0, the untrained model (taken here, not in on_fit_start: a resumed run
            # restores it instead)
            self._ref_train = self._clean_losses(ctx, ctx.train_probe_loader)
            self._ref_holdout = self._clean_losses(ctx, ctx.holdout_loader)
            self._ref_epoch = epoch - 1

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
        record: dict[str, Any] = {"weights": dict(self.weights), "estimated": False}
        if epoch % self.super_epoch != 0:
            return record
        if holdout is None:
            raise RuntimeError("G-Blend: the trainer passed no held-out evaluation")
        if self._ref_epoch is None:
            raise RuntimeError("G-Blend: on_epoch_start was not called (no checkpoint 0)")
        train_now = self._clean_losses(ctx, ctx.train_probe_loader)
        hold_now = self._per_head(holdout)
        new = gblend_weights(
            self._ref_train,
            train_now,
            self._ref_holdout,
            hold_now,
            eps=self.eps,
            total=self._total(len(hold_now)),
            uniform_floor=self.uniform_floor,
        )
        record.update(
            estimated=True,
            from_epoch=self._ref_epoch,
            train_prev=dict(self._ref_train),
            train_now=train_now,
            holdout_prev=dict(self._ref_holdout),
            holdout_now=hold_now,
            next_weights=dict(new),
        )
        self.weights = new
        self._ref_epoch, self._ref_train, self._ref_holdout = epoch, train_now, hold_now
        self._last_estimate = epoch
        return record

    # -- persistence -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": dict(self.weights),
            "ref_epoch": self._ref_epoch,
            "ref_train": dict(self._ref_train),
            "ref_holdout": dict(self._ref_holdout),
            "last_estimate": self._last_estimate,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"weights", "ref_epoch", "ref_train", "ref_holdout", "last_estimate"}
        if set(state) != expected:
            raise ValueError(f"GBlend state must have keys {sorted(expected)}, got {sorted(state)}")
        self.weights = {str(k): float(v) for k, v in state["weights"].items()}
        self._ref_epoch = None if state["ref_epoch"] is None else int(state["ref_epoch"])
        self._ref_train = {str(k): float(v) for k, v in state["ref_train"].items()}
        self._ref_holdout = {str(k): float(v) for k, v in state["ref_holdout"].items()}
        last = state["last_estimate"]
        self._last_estimate = None if last is None else int(last)
        self._restored = True

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(
            super_epoch=self.super_epoch,
            holdout_fraction=self.holdout_fraction,
            normalize=self.normalize,
            eps=self.eps,
            uniform_floor=self.uniform_floor,
        )
        return info
