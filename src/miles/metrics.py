"""Fused and per-head validation metrics (torchmetrics), the numbers MILES decides from.

Use :class:`HeadMetrics` in your own validation loop: ``update`` per batch, ``compute`` at the end,
then ``scheduler.step(**scores.as_step_kwargs())``. Its torchmetrics states are summed across DDP
ranks on ``compute``, so every rank takes the same scheduler decision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

try:
    import torchmetrics
    from torchmetrics import classification as tmc
except ModuleNotFoundError as exc:  # pragma: no cover - exercised only without the extra
    raise ModuleNotFoundError(
        "miles.metrics needs torchmetrics: pip install 'miles-lr[train]'"
    ) from exc

from miles.models.fusion import FusionOutput, JointFusionModel

METRICS = ("accuracy", "f1_micro", "f1_macro")


def make_metric(
    metric: str, num_classes: int, *, multilabel: bool = False, threshold: float = 0.5
) -> torchmetrics.Metric:
    """One torchmetrics object for a head: accuracy (micro), or F1 micro/macro."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if multilabel:
        if metric == "accuracy":
            return tmc.MultilabelAccuracy(
                num_labels=num_classes, threshold=threshold, average="micro"
            )
        return tmc.MultilabelF1Score(
            num_labels=num_classes, threshold=threshold, average=_f1_average(metric)
        )
    if metric == "accuracy":
        return tmc.MulticlassAccuracy(num_classes=num_classes, average="micro")
    return tmc.MulticlassF1Score(num_classes=num_classes, average=_f1_average(metric))


def _f1_average(metric: str) -> Literal["micro", "macro"]:
    return "micro" if metric == "f1_micro" else "macro"


@dataclass
class HeadScores:
    """Metric of the fused head and of each unimodal head (higher is better)."""

    fused: float
    unimodal: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)

    def as_step_kwargs(self) -> dict[str, Any]:
        """Arguments for ``MILES.step``: ``fused=..., unimodal={...}``."""
        return {"fused": self.fused, "unimodal": dict(self.unimodal)}


class HeadMetrics(nn.Module):
    """Accumulates one metric per head over a validation pass.

    Args:
        modalities: the unimodal heads to track.
        num_classes: classes (or labels, multilabel).
        metric: ``"accuracy"``, ``"f1_micro"`` or ``"f1_macro"``.
        multilabel: targets are 0/1 vectors and logits are thresholded after a sigmoid.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        num_classes: int,
        metric: str = "accuracy",
        *,
        multilabel: bool = False,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        if len(modalities) == 0:
            raise ValueError("HeadMetrics needs at least one modality")
        self.modalities = tuple(modalities)
        self.metric_name = metric
        self.multilabel = multilabel
        self.fused: torchmetrics.Metric = make_metric(
            metric, num_classes, multilabel=multilabel, threshold=threshold
        )
        self.heads = nn.ModuleDict(
            {
                m: make_metric(metric, num_classes, multilabel=multilabel, threshold=threshold)
                for m in self.modalities
            }
        )

    def _prep(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits) if self.multilabel else logits

    def update(self, output: FusionOutput, target: Tensor) -> None:
        """Add one batch of logits (``FusionOutput`` from :class:`JointFusionModel`)."""
        self.update_logits(output.fused, output.unimodal, target)

    def update_logits(self, fused: Tensor, unimodal: Mapping[str, Tensor], target: Tensor) -> None:
        """Add one batch from any model: fused logits and ``{modality: head logits}``."""
        missing = [m for m in self.modalities if m not in unimodal]
        if missing:
            raise ValueError(f"output has no unimodal head {missing[0]!r}; has {list(unimodal)}")
        self.fused.update(self._prep(fused.detach()), target)
        for m in self.modalities:
            self._head(m).update(self._prep(unimodal[m].detach()), target)

    def compute(self) -> HeadScores:
        return HeadScores(
            fused=float(self.fused.compute()),
            unimodal={m: float(self._head(m).compute()) for m in self.modalities},
        )

    def _head(self, modality: str) -> torchmetrics.Metric:
        return cast(torchmetrics.Metric, self.heads[modality])

    def reset(self) -> None:
        self.fused.reset()
        for m in self.modalities:
            self._head(m).reset()


def ablated_fused_scores(
    model: JointFusionModel,
    latents: Mapping[str, Tensor],
    target: Tensor,
    metric: torchmetrics.Metric,
    *,
    fill: str = "mean",
) -> dict[str, float]:
    """``M(model without m)`` by the ablation estimator, for every modality ``m``.

    Re-runs only the fused head on latents cached from one validation pass (no second encoder
    pass), with modality ``m``'s latent replaced by its mean over that pass (``fill="mean"``: the
    head sees a typical but uninformative input) or by zeros (``fill="zeros"``).
    """
    if fill not in ("mean", "zeros"):
        raise ValueError(f"fill must be 'mean' or 'zeros', got {fill!r}")
    scores: dict[str, float] = {}
    with torch.no_grad():
        for m in model.modalities:
            z = latents[m]
            replaced = (
                z.mean(dim=0, keepdim=True).expand_as(z) if fill == "mean" else torch.zeros_like(z)
            )
            edited = {**latents, m: replaced}
            logits = model.fused_logits(edited)
            metric.reset()
            metric.update(torch.sigmoid(logits) if _is_multilabel(metric) else logits, target)
            scores[m] = float(metric.compute())
            metric.reset()
    return scores


def _is_multilabel(metric: torchmetrics.Metric) -> bool:
    return type(metric).__name__.startswith("Multilabel")
