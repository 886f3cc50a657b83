"""Modality valuation and re-sampling (Wei, Feng, Wang, Hu, CVPR 2024): what both variants share.

Reference: Y. Wei et al. (Wei, Feng, Wang, Hu), "Enhancing Multimodal Cooperation via Sample-level
Modality Valuation", CVPR 2024 (arXiv 2309.06255), and the authors' code
(github.com/GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation: ``code/sample_level.py``,
``code/modality_level.py``, ``code/datasets/dataloader.py``, ``code/models/models.py``; read at
commits 077648e / 01f7e56). The strategies are :mod:`miles.strategies.valuation_sample` and
:mod:`miles.strategies.valuation_modality`.

After an epoch, every training sample is valued: the fused head predicts from all modalities and
from every subset (the other latents zeroed, the authors' ``exec_drop``), a coalition ``S`` is
worth ``v(S) = |S|`` if its prediction is right and 0 otherwise, and each modality's
contribution is its Shapley value. The next epoch trains on the training set plus extra rows
that repeat samples with only the low-contributing modality kept (a
:class:`~miles.strategies.data.TrainPlan` with keep masks), so that modality has to carry the
fused prediction on them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from miles.models.fusion import JointFusionModel
from miles.strategies.base import EvalResult, StrategyContext
from miles.strategies.data import TrainPlan
from miles.strategies.joint import Joint
from miles.validation import check_positive_int

__all__ = ["Resampling", "shapley_values"]


@torch.no_grad()
def shapley_values(
    model: JointFusionModel, latents: Mapping[str, Tensor], target: Tensor
) -> Tensor:
    """``(N, M)`` float64 Shapley values of the modalities (``model.modalities`` order), per sample.

    ``v(S) = |S| * 1[argmax fused(S) == y]`` with ``fused(S)`` the fused head on the latents of
    ``S`` and zeros for the others, ``v({}) = 0``; ``phi_m = sum_{S not containing m}
    |S|! (M - |S| - 1)! / M! * (v(S + m) - v(S))``. For two modalities this is the authors'
    ``(v_a + v_all - v_v) / 2``, with values in ``{-0.5, 0, 0.5, 1, 1.5}``.
    """
    names = model.modalities
    n_mod = len(names)
    n = int(target.shape[0])
    zero = torch.zeros(n, dtype=torch.float64, device=target.device)  # exact for small |S|
    worth: dict[tuple[int, ...], Tensor] = {(): zero}
    for size in range(1, n_mod + 1):
        for members in itertools.combinations(range(n_mod), size):
            kept = {
                m: latents[m] if j in members else torch.zeros_like(latents[m])
                for j, m in enumerate(names)
            }
            right = model.fused_logits(kept).argmax(dim=1) == target
            worth[members] = size * right.to(torch.float64)
    phi = torch.zeros(n, n_mod, dtype=torch.float64, device=target.device)
    for j in range(n_mod):
        others = [k for k in range(n_mod) if k != j]
        for size in range(n_mod):
            weight = math.factorial(size) * math.factorial(n_mod - size - 1) / math.factorial(n_mod)
            for members in itertools.combinations(others, size):
                with_j = tuple(sorted((*members, j)))
                phi[:, j] += weight * (worth[with_j] - worth[members])
    return phi


class Resampling(Joint):
    """Joint training whose epochs after ``warmup`` train on a re-sampled set built from values.

    After each epoch from ``warmup`` on, every training sample is valued
    (:func:`shapley_values`, one eval-mode pass over the training part) and :meth:`plan` turns
    the values into the next epoch's :class:`~miles.strategies.data.TrainPlan`. The loss is the
    fused loss alone (the authors' ``criterion(out, label)``); rows whose keep mask drops a
    modality have its latent zeroed before the fused head (``ctx.forward``). The unimodal heads
    train on detached, unmasked latents as probes (``uses_aux_losses = False``). Readouts: the
    fused head with every modality; the unimodal columns are the probe heads.

    The plan is part of the strategy's state, so a resumed run trains on the same rows.
    """

    uses_aux_losses = False

    def __init__(self, warmup: int = 5) -> None:
        self.warmup = check_positive_int("warmup", warmup)
        self._plan: TrainPlan | None = None

    def plan(
        self, ctx: StrategyContext, values: Tensor, epoch: int
    ) -> tuple[TrainPlan | None, dict[str, Any]]:
        """The next epoch's plan from the values ``(N, M)`` (``None``: the plain training set)
        and what to record about it."""
        raise NotImplementedError

    def on_fit_start(self, ctx: StrategyContext) -> None:
        if ctx.multilabel:
            raise ValueError(
                f"{self.name} does not support multilabel tasks: its values need one class"
            )
        if ctx.data is None:
            raise ValueError(f"{self.name} needs ctx.data (the trainer provides it)")
        ctx.data.set_train_plan(self._plan)  # a resumed run trains on the saved plan

    def on_epoch_end(
        self, ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None
    ) -> dict[str, Any]:
        assert ctx.data is not None
        record: dict[str, Any] = {
            "rows": ctx.data.size("train") if self._plan is None else int(self._plan.rows.numel())
        }
        if epoch < self.warmup:
            return record
        collected = ctx.data.collect("train", ctx.model)
        values = shapley_values(ctx.model, collected.latents, collected.target)
        self._plan, info = self.plan(ctx, values, epoch)
        ctx.data.set_train_plan(self._plan)
        names = ctx.model.modalities
        record["value_mean"] = {m: float(values[:, j].mean()) for j, m in enumerate(names)}
        return {**record, **info}

    def state_dict(self) -> dict[str, Any]:
        return {} if self._plan is None else {"plan": self._plan.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._plan = TrainPlan.from_state(state["plan"]) if state else None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "warmup": self.warmup}
