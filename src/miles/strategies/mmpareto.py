"""MMPareto: Pareto integration of multimodal and unimodal gradients (Wei & Hu, ICML 2024).

Reference: Y. Wei, D. Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal
Assistance", ICML 2024 (Sec. 3.3, Eq. 5 and 16, Alg. 1, App. B), and the authors' code
(``GeWu-Lab/MMPareto_ICML2024``, commit ``a339db3``: ``code/MMPareto.py``,
``code/min_norm_solvers.py``, ``code/uniform_baseline.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from miles.models.fusion import JointFusionModel
from miles.models.losses import FUSED
from miles.strategies.base import EvalResult, StepOutput, StrategyContext
from miles.strategies.joint import JointAux
from miles.strategies.registry import register_strategy
from miles.strategies.requirements import batch_dependent, require_modalities
from miles.validation import check_bool, check_positive

#: the closed-form solver's clamps at the ends of the segment (``_min_norm_element_from2``)
EDGE_WEIGHTS = (0.999, 0.001)

Grads = Sequence[Tensor | None]


def _dot(a: Grads, b: Grads) -> float:
    return float(
        sum((x * y).sum() for x, y in zip(a, b, strict=True) if x is not None and y is not None)
    )


def pareto_weights(multimodal: Grads, unimodal: Grads) -> tuple[float, float]:
    """``(alpha_m, alpha_u)`` minimising ``||alpha_m g_m + alpha_u g_u||`` with
    ``alpha_m + alpha_u = 1`` (Eq. 5), the two-vector closed form of the authors' solver: with
    ``g_m`` ahead of the projection (``<g_m, g_u> >= <g_m, g_m>``) ``alpha_m = 0.999``, with
    ``g_u`` ahead ``alpha_m = 0.001``, else ``alpha_m = (g_u - g_m)^T g_u / ||g_m - g_u||^2``.
    Dot products run over every tensor of the encoder."""
    mm, mu, uu = _dot(multimodal, multimodal), _dot(multimodal, unimodal), _dot(unimodal, unimodal)
    if mu >= mm:
        alpha = EDGE_WEIGHTS[0]
    elif mu >= uu:
        alpha = EDGE_WEIGHTS[1]
    else:
        alpha = (uu - mu) / (mm + uu - 2 * mu)
    return alpha, 1.0 - alpha


def cosine(a: Grads, b: Grads) -> float:
    """Cosine similarity of two gradients given tensor by tensor (flattened and concatenated)."""
    norm = (_dot(a, a) * _dot(b, b)) ** 0.5
    return _dot(a, b) / norm if norm > 0 else 0.0


def integrate(
    total: Tensor,
    multimodal: Tensor | None,
    unimodal: Tensor | None,
    weights: tuple[float, float],
    gamma: float,
) -> Tensor:
    """One encoder tensor's new gradient (the authors' per-tensor rule, Eq. 16 as coded):
    ``h = 2 alpha_m g_m + 2 alpha_u g_u``, rescaled up to the total gradient's norm when it is
    smaller (``diff = ||total|| / ||h||``, applied only if ``> 1``), times ``gamma``.

    With equal weights ``h`` is the total gradient itself (``g_m + g_u``, exactly), so it is
    used as is."""
    if weights == (0.5, 0.5):
        return gamma * total if gamma != 1.0 else total
    new = torch.zeros_like(total)
    for w, g in zip(weights, (multimodal, unimodal), strict=True):
        if g is not None:
            new = new + 2 * w * g
    norm = new.norm()
    if norm == 0:
        return gamma * new
    diff = total.norm() / norm
    return gamma * diff * new if diff > 1 else gamma * new


@register_strategy("mmpareto")
class MMPareto(JointAux):
    """MMPareto (Wei & Hu, ICML 2024): conflict-free integration of the multimodal and unimodal
    gradients of every encoder.

    The objective is ``L = L_fused + sum_m L_m`` with trained auxiliary heads (``joint+aux``, the
    authors' ``uniform_baseline.py``). Each step, for every encoder ``m``:

    1. ``g_mm`` = gradient of ``L_fused`` and ``g_u`` = gradient of ``L_m`` on the encoder's
       tensors (the authors' separate backward passes);
    2. if their cosine (over all the encoder's tensors) is positive, ``alpha = (1/2, 1/2)``;
       otherwise the min-norm weights of Eq. 5 (:func:`pareto_weights`), which give a common
       descent direction;
    3. every encoder tensor's gradient becomes ``gamma * h`` with ``h = 2 alpha_mm g_mm +
       2 alpha_u g_u``, first scaled up to the norm of the total gradient when it is smaller
       (:func:`integrate`). Heads and the fusion keep the total gradient.

    The auxiliary heads give the heads column; the fused head predicts.

    Args:
        gamma: the final scale (paper Sec. 4.1: 1.5, hard-coded in the authors' code; named
            ``alpha`` 1.5 in BalanceBenchmark).
        resolve_conflicts: solve Eq. 5 when the gradients conflict (default ``True``, the method).
            ``False`` always uses equal weights, an ablation the authors do not expose; with
            ``gamma = 1`` it is exactly ``joint+aux``.

    Where this departs from the authors' code:

    - With equal weights the new gradient is the total gradient itself; the authors rebuild it
      as ``g_mm + g_u`` from the separate passes and rescale it by the ratio of norms, which
      differs from 1 only by rounding.
    - A tensor whose combined gradient is zero keeps it (the authors would divide by zero).
    - The encoders' tensors are the modules in ``model.encoders``; the authors select them by name
      (``'audio'``/``'visual'`` in the name and no ``'head'``). The conflict test is ``cos > 0`` as
      in the code (the paper writes ``>= 0``).
    - More than two modalities: the same per-encoder rule (the paper's Eq. 1 already sums over
      modalities).
    - Optimizer: the authors use SGD (momentum 0.9, weight decay 1e-4, lr 0.002 in the code and
      1e-3 in App. B, StepLR(30, 0.1)); any of ours works, the schedule is not reproduced.

    BalanceBenchmark's MMPareto (``MMPareto_trainer.py``) trains the unimodal losses on the fused
    head's additive shares (no auxiliary heads), and on a conflict stores the solver's result in
    its loop variable instead of the weights, which stay ``[0, 0]`` (zero combined gradient, then
    a division by zero); as released it calls ``model.Unimodality_Calculate()``, which the
    repository does not define.
    """

    name = "mmpareto"
    single_process = batch_dependent("combination")
    uses_aux_losses = True

    def __init__(self, gamma: float = 1.5, resolve_conflicts: bool = True) -> None:
        super().__init__()
        self.gamma = check_positive("gamma", gamma)
        self.resolve_conflicts = check_bool("resolve_conflicts", resolve_conflicts)
        self._reset_epoch_stats()

    def configure_model(self, model: JointFusionModel) -> None:
        require_modalities(self.name, model)
        super().configure_model(model)

    def on_epoch_start(self, ctx: StrategyContext, epoch: int) -> None:
        self._reset_epoch_stats()

    def _reset_epoch_stats(self) -> None:
        self._sums: dict[str, dict[str, float]] = {"cos": {}, "conflict": {}, "alpha_mm": {}}
        self._batches = 0

    def training_step(self, ctx: StrategyContext, batch: Mapping[str, Any]) -> StepOutput:
        model = ctx.model
        output = ctx.forward(batch)
        losses = ctx.head_losses(output, batch)
        loss = self.loss(losses, output, batch)
        params = {
            m: [p for p in model.encoders[m].parameters() if p.requires_grad]
            for m in model.modalities
        }
        every = [p for m in model.modalities for p in params[m]]
        fused = dict(zip(map(id, every), _grad(losses[FUSED], every), strict=True))
        separate = {m: _grad(losses[m], params[m]) for m in params}
        ctx.zero_grad()
        ctx.backward(loss)
        with torch.no_grad():
            for m, group in params.items():
                self._integrate(m, group, [fused[id(p)] for p in group], separate[m])
        ctx.optimizer_step()
        self._batches += 1
        return StepOutput.of(loss, losses, batch)

    def _integrate(
        self, modality: str, params: Sequence[nn.Parameter], multimodal: Grads, unimodal: Grads
    ) -> None:
        cos = cosine(multimodal, unimodal)
        conflict = self.resolve_conflicts and not cos > 0
        weights = pareto_weights(multimodal, unimodal) if conflict else (0.5, 0.5)
        for p, g_m, g_u in zip(params, multimodal, unimodal, strict=True):
            if p.grad is not None:
                p.grad = integrate(p.grad, g_m, g_u, weights, self.gamma)
        for key, value in (("cos", cos), ("conflict", float(conflict)), ("alpha_mm", weights[0])):
            self._sums[key][modality] = self._sums[key].get(modality, 0.0) + value

    def on_epoch_end(
        self, ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None
    ) -> dict[str, Any]:
        n = max(self._batches, 1)
        return {
            "cos_mean": {m: v / n for m, v in self._sums["cos"].items()},
            "conflict_fraction": {m: v / n for m, v in self._sums["conflict"].items()},
            "alpha_multimodal_mean": {m: v / n for m, v in self._sums["alpha_mm"].items()},
        }

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "gamma": self.gamma,
            "resolve_conflicts": self.resolve_conflicts,
        }


def _grad(loss: Tensor, params: Sequence[nn.Parameter]) -> list[Tensor | None]:
    """``d loss / d p`` for each parameter (``None`` where ``p`` does not reach ``loss``), keeping
    the graph for the total backward pass that follows."""
    if not params:
        return []
    grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
    return list(grads)
