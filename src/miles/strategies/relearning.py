"""Diagnosing & Re-learning (Wei, Li, Feng, Hu, ECCV 2024) as a trainer strategy.

Reference: Y. Wei, S. Li, R. Feng, D. Hu, "Diagnosing and Re-learning for Balanced Multimodal
Learning", ECCV 2024 (arXiv 2407.09705; Sec. 3.2-3.3, Eq. 1-6, Alg. 1), and the authors' code
(github.com/GeWu-Lab/Diagnosing_Relearning_ECCV2024, ``code/ours.py`` and ``code/script/ours.sh``,
read at commit 59b5787).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from miles.strategies.base import EvalResult, StrategyContext
from miles.strategies.joint import Joint
from miles.strategies.registry import register_strategy
from miles.validation import check_non_negative, check_positive_int

__all__ = ["Relearning", "kmeans", "minmax_scale", "purity", "reinit_strength"]


def minmax_scale(x: Tensor, low: float = -1.0, high: float = 1.0) -> Tensor:
    """Scale each column of ``x`` to ``[low, high]`` (scikit-learn's ``MinMaxScaler``: a constant
    column maps to ``low``)."""
    lo, hi = x.min(dim=0).values, x.max(dim=0).values
    span = hi - lo
    span = torch.where(span == 0, torch.ones_like(span), span)
    return low + (x - lo) / span * (high - low)


def _plus_plus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding: each new centre drawn with probability proportional to the squared
    distance to the nearest centre chosen so far."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [x[first]]
    nearest = ((x - x[first]) ** 2).sum(dim=1)
    for _ in range(1, k):
        total = float(nearest.sum())
        if total > 0:
            pick = int(torch.multinomial(nearest / total, 1, generator=generator))
        else:  # every point coincides with a centre: any point will do
            pick = int(torch.randint(n, (1,), generator=generator))
        centers.append(x[pick])
        nearest = torch.minimum(nearest, ((x - x[pick]) ** 2).sum(dim=1))
    return torch.stack(centers)


def kmeans(
    x: Tensor,
    k: int,
    *,
    seed: int = 0,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
) -> Tensor:
    """Cluster labels ``(N,)`` of the rows of ``x`` by k-means (Lloyd's algorithm, k-means++
    seeding), the best of ``n_init`` seedings by inertia.

    Deterministic for a given ``seed`` and never touches the global random stream. Stops when the
    centres move less than ``tol`` times the data's mean variance (scikit-learn's rule). A cluster
    left empty keeps its previous centre.
    """
    check_positive_int("k", k)
    x = x.detach().double()
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least k = {k} rows, got {x.shape[0]}")
    generator = torch.Generator().manual_seed(seed)
    threshold = tol * float(x.var(dim=0, unbiased=False).mean())
    best_labels, best_inertia = None, math.inf
    for _ in range(n_init):
        centers = _plus_plus(x, k, generator)
        for _ in range(max_iter):
            labels = torch.cdist(x, centers).argmin(dim=1)
            sums = torch.zeros_like(centers).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=k).unsqueeze(1)
            moved = torch.where(counts > 0, sums / counts.clamp(min=1), centers)
            shift = float(((moved - centers) ** 2).sum())
            centers = moved
            if shift <= threshold:
                break
        distances = torch.cdist(x, centers)
        labels = distances.argmin(dim=1)
        inertia = float((distances.gather(1, labels.unsqueeze(1)) ** 2).sum())
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    assert best_labels is not None
    return best_labels


def purity(labels: Tensor, clusters: Tensor) -> float:
    """Eq. 3: ``(1/N) sum_clusters max_class |cluster ∩ class|`` (each cluster votes its majority
    class; the share of rows whose class is their cluster's vote)."""
    if labels.shape != clusters.shape or labels.dim() != 1:
        raise ValueError(
            f"labels and clusters must be equal-length 1-D tensors, got {tuple(labels.shape)} "
            f"and {tuple(clusters.shape)}"
        )
    total = 0
    for c in torch.unique(clusters):
        total += int(torch.bincount(labels[clusters == c]).max())
    return total / labels.numel()


def reinit_strength(gap: float, lam: float) -> float:
    """Eq. 5: ``alpha = tanh(lambda * g)``."""
    return math.tanh(lam * gap)


@register_strategy("relearning")
class Relearning(Joint):
    """Diagnose each encoder by the purity gap of its features, then softly re-initialise it.

    Every ``every`` epochs, for each modality ``k`` (Alg. 1):

    1. Latents of the whole training part and of the validation set, from one eval-mode, no-grad
       pass each (``ctx.data.collect``).
    2. Each set is scaled to ``[-1, 1]`` per feature (the authors' ``MinMaxScaler``, fitted per set)
       and clustered by k-means into as many clusters as classes (:func:`kmeans`, seeded like the
       authors' ``random_state=0``); purity ``P`` (Eq. 3, :func:`purity`).
    3. Gap ``g_k = |P_train - P_val|`` (Eq. 4) and strength ``alpha_k = tanh(lambda * g_k)``
       (Eq. 5).
    4. Every parameter of encoder ``k`` becomes ``(1 - alpha_k) theta + alpha_k theta_init``
       (Eq. 6), ``theta_init`` its value when the fit started. A well-learnt (over-fitting)
       encoder has a large gap and is re-initialised more. Buffers (BatchNorm statistics), the
       heads and the optimizer state are left as they are, as in the authors' code.

    The loss is the fused loss alone (the paper's joint training); the unimodal heads train on
    detached latents as probes (``uses_aux_losses = False``). Readouts: the fused head predicts;
    the unimodal columns are the probe heads.

    When: the authors' loop re-initialises after training and evaluating 0-based epoch ``t`` when
    ``t % H == 0 and t > 0``, at most ``reinit_num`` times; i.e. after our (1-based) epochs
    ``H + 1, 2H + 1, ...``. We run the diagnosis and the re-initialisation at the *start* of the
    next epoch, on the same weights: the epoch's validation score and the best-epoch checkpoint
    then hold the weights that were scored, as in the authors' code (they save the best model
    before re-initialising). The record of the epoch that starts with a re-initialisation holds
    the purities, gaps and strengths.

    Args:
        lam: ``lambda`` of Eq. 5. Default 3: the paper's value for CREMA-D and the authors'
            script (7 for Kinetics-Sounds and UCF-101, 8 for CMU-MOSI). ``lam = 0`` is exactly
            ``joint`` (the diagnosis still runs, on its own random stream).
        every: ``H``, epochs between diagnoses. Default 20: the paper (5 for CMU-MOSI) and the
            authors' script. With fewer than ``H + 2`` epochs nothing is re-initialised: set it
            to the run's budget (BalanceBenchmark: 15 of 30 epochs).
        max_reinits: at most this many re-initialisations. Default 3: the authors' script
            (``--reinit_num 3``; the paper's Alg. 1 has no limit).

    Departures from the authors' code: k-means is our own (k-means++ seeding, best inertia of
    10 seedings, scikit-learn's stopping rule; scikit-learn is not a dependency), so cluster
    assignments need not match scikit-learn's draws; the training features come from a fixed-order
    pass (theirs: the shuffled training loader in eval mode; k-means does not depend on row order
    beyond its seeding); any number of modalities (theirs: two). The optimiser is the run's
    (theirs: SGD, lr 0.002, momentum 0.9, weight decay 1e-4, batch 64, 90 epochs; the paper says
    lr 1e-3). The paper's "Ours†" variant with unimodal heads and losses is not offered.
    BalanceBenchmark: ``H = 15``, ``reinit_num = 2``, and it re-initialises after training but
    before validating the epoch; it selects parameters by the modality's name, which in our model
    would also catch the unimodal heads.

    Not supported: multilabel tasks (purity needs one class per sample).
    """

    name = "relearning"
    uses_aux_losses = False

    def __init__(self, lam: float = 3.0, every: int = 20, max_reinits: int = 3) -> None:
        self.lam = check_non_negative("lam", lam)
        self.every = check_positive_int("every", every)
        self.max_reinits = check_positive_int("max_reinits", max_reinits)
        self._init: dict[str, Tensor] | None = None
        self._reinits = 0
        self._pending: dict[str, Any] = {}

    def on_fit_start(self, ctx: StrategyContext) -> None:
        if ctx.multilabel:
            raise ValueError(
                "relearning does not support multilabel tasks: purity needs one class per sample"
            )
        if ctx.data is None:
            raise ValueError("relearning needs ctx.data (the trainer provides it)")
        if self._init is None:  # a fresh fit: the encoders' initial parameters (Eq. 6)
            self._init = {
                f"{m}.{name}": p.detach().clone()
                for m, encoder in ctx.model.encoders.items()
                for name, p in encoder.named_parameters()
            }

    def diagnoses_before(self, epoch: int) -> bool:
        """Whether the diagnosis runs before (1-based) ``epoch``: after the authors' 0-based epoch
        ``t = epoch - 2`` with ``t % H == 0 and t > 0``, within ``max_reinits``."""
        t = epoch - 2
        return t > 0 and t % self.every == 0 and self._reinits < self.max_reinits

    def diagnose(self, ctx: StrategyContext) -> dict[str, Any]:
        """Purities, gaps and strengths of every modality from the current weights."""
        assert ctx.data is not None
        k = ctx.model.num_classes
        train = ctx.data.collect("train", ctx.model)
        val = ctx.data.collect("val", ctx.model)
        out: dict[str, dict[str, float]] = {"purity_train": {}, "purity_val": {}, "gap": {}}
        out["alpha"] = {}
        for m in ctx.model.modalities:
            p_train = purity(train.target, kmeans(minmax_scale(train.latents[m]), k))
            p_val = purity(val.target, kmeans(minmax_scale(val.latents[m]), k))
            gap = abs(p_train - p_val)
            out["purity_train"][m], out["purity_val"][m], out["gap"][m] = p_train, p_val, gap
            out["alpha"][m] = reinit_strength(gap, self.lam)
        return out

    def reinitialise(self, ctx: StrategyContext, alphas: Mapping[str, float]) -> None:
        """Eq. 6 on every parameter of each encoder (in place: the optimizer keeps its state)."""
        assert self._init is not None
        with torch.no_grad():
            for m, encoder in ctx.model.encoders.items():
                alpha = alphas[m]
                if alpha == 0:
                    continue
                for name, p in encoder.named_parameters():
                    init = self._init[f"{m}.{name}"].to(p.device)
                    p.mul_(1.0 - alpha).add_(init, alpha=alpha)

    def on_epoch_start(self, ctx: StrategyContext, epoch: int) -> None:
        self._pending = {}
        if not self.diagnoses_before(epoch):
            return
        report = self.diagnose(ctx)
        self.reinitialise(ctx, report["alpha"])
        self._reinits += 1
        self._pending = {**report, "reinit": self._reinits}

    def on_epoch_end(
        self, ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None
    ) -> dict[str, Any]:
        return dict(self._pending)

    def state_dict(self) -> dict[str, Any]:
        if self._init is None:
            return {}
        return {"init": dict(self._init), "reinits": self._reinits}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self._init = dict(state["init"])
        self._reinits = int(state["reinits"])

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        return {**info, "lam": self.lam, "every": self.every, "max_reinits": self.max_reinits}
