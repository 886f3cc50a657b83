"""OPM: on-the-fly prediction modulation (Wei, Hu, Du, Wen, TPAMI 2024), as a trainer strategy.

Reference: Y. Wei, D. Hu, H. Du, J.-R. Wen, "On-the-fly Modulation for Balanced Multimodal
Learning", IEEE TPAMI 2024 (arXiv 2410.11582; Sec. 3.2.1, Eq. 6-8, Alg. 1), and the authors' code
(github.com/GeWu-Lab/BML_TPAMI2024, ``code/models/Classifier.py``: ``Modality_drop``, ``calcu_q``,
``Classifier.forward``; ``code/main.py``: ``train``; ``code/scripts/train_opm.sh``; read at commit
8db168f).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from miles.models.fusion import FusionOutput, JointFusionModel
from miles.models.losses import FUSED, task_loss
from miles.strategies.base import EvalResult, StepOutput, StrategyContext
from miles.strategies.onthefly import OnTheFly, discrepancy, mean_ratios, unimodal_scores
from miles.strategies.registry import register_strategy
from miles.strategies.streams import OwnStream
from miles.validation import check_fraction, check_non_negative, check_non_negative_int

__all__ = ["OPM", "drop_probability", "feature_scale"]

#: added to the run's seed for OPM's own random stream (the drop decisions)
STREAM_OFFSET = 7919


def drop_probability(ratio: float, q_base: float, lam: float) -> float:
    """Eq. 8: ``q = min(q_base (1 + lam * tanh(rho - 1)), 1)`` when ``rho > 1``, else 0."""
    if not ratio > 1:
        return 0.0
    return min(q_base * (1.0 + lam * discrepancy(ratio)), 1.0)


def feature_scale(q: Mapping[str, float], sizes: Mapping[str, int]) -> float:
    """``1 / (1 - theta)`` with ``theta = sum_m d_m q_m / sum_m d_m``: the authors rescale every
    kept feature by it, so the fused input keeps its expected size (inverted dropout)."""
    theta = sum(sizes[m] * q[m] for m in q) / sum(sizes[m] for m in q)
    return 1.0 / (1.0 - theta)


@register_strategy("opm")
class OPM(OnTheFly):
    """Drop the dominant modality's features at random, more often the more it dominates.

    Per training step, on the current batch (the authors' code; the paper says "at the last
    iteration"):

    1. Scores ``s_m = sum_i softmax(W_m z_m,i + b / M)[y_i]`` (Eq. 6, each modality's share of the
       fused head, no gradient) and ratios ``rho_m = 1/(M-1) sum_{j != m} s_m / s_j`` (Eq. 7).
    2. Drop probabilities ``q_m = min(q_base (1 + lam tanh(rho_m - 1)), 1)`` for ``rho_m > 1``,
       0 otherwise (Eq. 8): only a leading modality is ever dropped.
    3. With probability ``p_exe`` the drop is executed for this batch: each sample keeps modality
       ``m`` with probability ``1 - q_m`` (a dropped latent is zeroed), every latent is divided by
       ``1 - theta``, ``theta = sum_m d_m q_m / sum_m d_m`` (``d_m`` the latent sizes), samples that
       lost every modality leave the batch (no sample left: no update for this batch), and the
       fused head predicts from the result.

    The loss is the fused cross-entropy of that prediction (the authors' ``loss_fn(out, label)``;
    their unimodal losses are computed but not optimised); the unimodal heads train on detached,
    undropped latents as probes, as in :class:`~miles.strategies.joint.Joint`
    (``uses_aux_losses = False``). Nothing is dropped in the first ``warmup`` epochs, nor ever at
    evaluation: the fused head predicts from every modality. Readouts: the fused head; the
    unimodal columns are the probe heads.

    Args:
        q_base: ``q_base`` of Eq. 8. Default 0.5: the authors' ``--q_base`` default and
            ``train_opm.sh`` (their ``config.py`` says 0.4, overridden; BalanceBenchmark uses 0.4).
            ``q_base = 0`` is exactly ``joint``.
        lam: ``lambda`` of Eq. 8. Default 0.5 (``--lam``, ``train_opm.sh``; BalanceBenchmark's
            ``alpha`` 0.5).
        p_exe: probability that a batch is modulated at all. Default 0.7 (``--p_exe``; not in the
            paper). ``p_exe = 0`` is exactly ``joint``.
        warmup: epochs trained without dropping first. Default 6: the authors' ``main.py``
            (``warm_up = 1 if epoch <= 5``, 0-based; not in the paper; BalanceBenchmark has none).

    The drops draw from OPM's own random stream, seeded from the run's seed and saved with the
    strategy's state (resuming is exact; a setting that never drops trains exactly like
    ``joint``).

    Departures from the authors' code: the scores use the fusion's per-modality share, so concat
    and sum fusion are supported (theirs: concat, split at the 512th column); more than two
    modalities use Eq. 7 (their ``calcu_q`` handles two; BalanceBenchmark divides ``s_m`` by the
    *sum* of the others); the optimiser is the run's (theirs: AdamW 5e-5, weight decay 0.01,
    StepLR(40, 0.1), 100 epochs, batch 32; the paper: SGD 1e-3, momentum 0.9). Their
    ``Modality_drop`` has a stray ``]`` (a syntax error as committed); its intent is unambiguous.
    BalanceBenchmark divides by ``1 - theta + 1e-5`` and, outside its modulation window, does not
    back-propagate at all.

    Not supported: multilabel tasks (the score needs one true class), non-additive fusions.
    """

    name = "opm"

    def __init__(
        self, q_base: float = 0.5, lam: float = 0.5, p_exe: float = 0.7, warmup: int = 6
    ) -> None:
        self.q_base = check_fraction("q_base", q_base, one=True)
        self.lam = check_non_negative("lam", lam)
        self.p_exe = check_fraction("p_exe", p_exe, one=True)
        self.warmup = check_non_negative_int("warmup", warmup)
        self._stream = OwnStream(STREAM_OFFSET)
        self._epoch = 0
        self._reset_stats()

    # -- setup -----------------------------------------------------------------------------------
    def on_fit_start(self, ctx: StrategyContext) -> None:
        super().on_fit_start(ctx)
        if ctx.data is None:
            raise ValueError("opm needs ctx.data (the trainer provides it)")
        self._stream.start(ctx.data.seed)

    def on_epoch_start(self, ctx: StrategyContext, epoch: int) -> None:
        self._epoch = epoch
        self._reset_stats()

    def _reset_stats(self) -> None:
        self._q_sum: dict[str, float] = {}
        self._batches = 0
        self._executed = 0
        self._skipped = 0
        self._rows = 0
        self._dropped: dict[str, int] = {}

    # -- the mechanism ---------------------------------------------------------------------------
    def probabilities(
        self, model: JointFusionModel, latents: Mapping[str, Tensor], target: Tensor
    ) -> dict[str, float]:
        """``q_m`` of every modality for this batch (Eq. 6-8)."""
        ratios = mean_ratios(unimodal_scores(model, latents, target))
        return {m: drop_probability(r, self.q_base, self.lam) for m, r in ratios.items()}

    def draw(self, q: Mapping[str, float], batch_size: int) -> Tensor | None:
        """Keep mask ``(batch, M)`` for an executed drop, or ``None`` (not executed this batch)."""
        generator = self._stream.generator
        executed = float(torch.rand((), generator=generator)) >= 1.0 - self.p_exe
        if not executed:
            return None
        keep_p = torch.tensor([1.0 - q[m] for m in q]).expand(batch_size, len(q))
        return torch.bernoulli(keep_p, generator=generator).bool()

    def training_step(self, ctx: StrategyContext, batch: Mapping[str, Any]) -> StepOutput:
        model = ctx.model
        output = ctx.forward(batch)
        losses = dict(ctx.head_losses(output, batch))
        target = batch["target"]
        size = int(target.shape[0])
        q = self.probabilities(model, output.latents, target)
        self._batches += 1
        for m, value in q.items():
            self._q_sum[m] = self._q_sum.get(m, 0.0) + value
        keep = self.draw(q, size) if self._epoch > self.warmup else None
        if keep is not None:
            self._executed += 1
            self._rows += size
            for j, m in enumerate(model.modalities):
                self._dropped[m] = self._dropped.get(m, 0) + int((~keep[:, j]).sum())
            if any(value > 0 for value in q.values()):  # else nothing is dropped or rescaled
                rows = keep.any(dim=1)
                if not bool(rows.any()):  # every sample lost every modality: no update
                    self._skipped += 1
                    return StepOutput(
                        losses[FUSED].detach(), {k: v.detach() for k, v in losses.items()}, size
                    )
                losses[FUSED] = self._dropped_loss(ctx, output, target, keep, rows, q)
        loss = self.loss(losses, output, batch)
        ctx.zero_grad()
        ctx.backward(loss)
        self.on_after_backward(ctx, output, batch)
        ctx.optimizer_step()
        return StepOutput(loss.detach(), {k: v.detach() for k, v in losses.items()}, size)

    def _dropped_loss(
        self,
        ctx: StrategyContext,
        output: FusionOutput,
        target: Tensor,
        keep: Tensor,
        rows: Tensor,
        q: Mapping[str, float],
    ) -> Tensor:
        """The fused loss of the kept samples, from dropped and rescaled latents."""
        model = ctx.model
        keep = keep.to(target.device)
        rows = rows.to(target.device)
        scale = feature_scale(q, model.latent_sizes)
        latents = {
            m: output.latents[m][rows] * keep[rows, j].unsqueeze(1).to(output.latents[m].dtype)
            for j, m in enumerate(model.modalities)
        }
        fused = model.fused_logits({m: z * scale for m, z in latents.items()})
        return task_loss(fused, target[rows], multilabel=ctx.multilabel)

    # -- records and state -----------------------------------------------------------------------
    def on_epoch_end(
        self, ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None
    ) -> dict[str, Any]:
        n = max(self._batches, 1)
        rows = max(self._rows, 1)
        return {
            "active": epoch > self.warmup,
            "q_mean": {m: v / n for m, v in self._q_sum.items()},
            "executed_fraction": self._executed / n,
            "dropped_fraction": {m: v / rows for m, v in self._dropped.items()},
            "skipped_batches": self._skipped,
        }

    def state_dict(self) -> dict[str, Any]:
        return self._stream.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._stream.load_state_dict(state)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "q_base": self.q_base,
            "lam": self.lam,
            "p_exe": self.p_exe,
            "warmup": self.warmup,
        }
