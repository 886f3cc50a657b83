"""Modality-level valuation and re-sampling (Wei, Feng, Wang, Hu, CVPR 2024).

Reference: Y. Wei et al. (Wei, Feng, Wang, Hu), "Enhancing Multimodal Cooperation via Sample-level
Modality Valuation", CVPR 2024 (arXiv 2309.06255), and the authors' code
(github.com/GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation, ``code/modality_level.py`` and
``AV_KS_Dataset_modality_level`` in ``code/datasets/dataloader.py``, read at commit 077648e). What
the two variants share is in :mod:`miles.strategies.valuation`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from miles.strategies.base import StrategyContext
from miles.strategies.data import TrainPlan
from miles.strategies.registry import register_strategy
from miles.strategies.valuation import Resampling
from miles.validation import check_fraction, check_non_negative

__all__ = ["ModalityValuation", "extra_rows"]

#: added to the run's seed (and the epoch) for the subset and row draws
STREAM_OFFSET = 104729


def extra_rows(gaps: Sequence[float], alpha: float, n: int) -> int:
    """``int((max gap - min gap) * 2/3 * alpha * N)``; for two modalities the authors'
    ``func='linear'`` count ``int(|gap_a - gap_b| / 3 * 2 * alpha * N)``."""
    return int((max(gaps) - min(gaps)) / 3 * 2 * alpha * n)


@register_strategy("valuation-modality")
class ModalityValuation(Resampling):
    """Add training rows in which only the less-contributing modality is kept.

    After each epoch from ``warmup`` on: every training sample is valued (Shapley values of the
    fused prediction, :func:`~miles.strategies.valuation.shapley_values`); the mean value of each
    modality over a random subset ``Z`` of ``part_ratio * N`` samples (drawn with replacement)
    gives ``gap_m = 1 - mean phi_m``; the next epoch trains on every sample once plus
    ``int(|gap_a - gap_b| * 2/3 * alpha * N)`` samples drawn with replacement, each once more with
    only the modality of the larger gap kept (the other latent zeroed before the fused head).
    With more than two modalities (the authors define two) the count uses the largest minus the
    smallest gap and the modality of the largest gap is kept alone.
    See :class:`~miles.strategies.valuation.Resampling` for the loss and the readouts.

    Args:
        warmup: the first re-sampled epoch is ``warmup + 1``. Default 5 (the authors'
            ``--warmup``).
        part_ratio: ``|Z| / N``. Default 0.2 (the authors' ``--part_ratio``).
        alpha: scale of the number of extra rows. Default 1 (the authors' ``--alpha``;
            BalanceBenchmark's 0.5 is unused by its dataset builder). ``alpha = 0`` is exactly
            ``joint`` (no extra row; the values are still computed).

    The draws use a stream of their own, seeded from the run's seed and the epoch (theirs:
    NumPy's global generator). Departures from the authors' code: more than two modalities as
    above (theirs: two); the values come from one eval-mode pass over the training part;
    the optimiser is the run's (theirs: SGD 1e-3, momentum 0.9, weight decay 1e-4, StepLR(30,
    0.1), 60 epochs, batch 64). BalanceBenchmark: ``v(S) = 1[correct]``, raw inputs zeroed, twice
    the authors' count of draws and each drawn sample added twice (once masked, once plain).
    """

    name = "valuation-modality"

    def __init__(self, warmup: int = 5, part_ratio: float = 0.2, alpha: float = 1.0) -> None:
        super().__init__(warmup)
        self.part_ratio = check_fraction("part_ratio", part_ratio, zero=False, one=True)
        self.alpha = check_non_negative("alpha", alpha)

    def plan(
        self, ctx: StrategyContext, values: Tensor, epoch: int
    ) -> tuple[TrainPlan | None, dict[str, Any]]:
        assert ctx.data is not None
        names = ctx.model.modalities
        n = int(values.shape[0])
        generator = torch.Generator().manual_seed(ctx.data.seed + STREAM_OFFSET + epoch)
        subset = torch.randint(n, (int(n * self.part_ratio),), generator=generator)
        means = values.cpu()[subset].mean(dim=0) if len(subset) else values.cpu().mean(dim=0)
        gaps = {m: 1.0 - float(means[j]) for j, m in enumerate(names)}
        count = extra_rows(list(gaps.values()), self.alpha, n)
        # the largest gap is kept alone (a tie goes to the later modality: the authors' else)
        weak = max(range(len(names)), key=lambda j: (gaps[names[j]], j))
        info = {"gap": gaps, "extra_rows": count, "trained_alone": names[weak] if count else None}
        if count == 0:
            return None, info
        drawn = torch.randint(n, (count,), generator=generator)
        alone = torch.zeros(count, len(names), dtype=torch.bool)
        alone[:, weak] = True
        rows = torch.cat([torch.arange(n), drawn])
        keep = torch.cat([torch.ones(n, len(names), dtype=torch.bool), alone])
        return TrainPlan(rows, keep, names), info
