"""Fused and per-head validation metrics (torchmetrics), the numbers MILES decides from.

Use :class:`HeadMetrics` in your own validation loop: ``update`` per batch, ``compute`` at the end,
then ``scheduler.step(**scores.as_step_kwargs())``. It is a torchmetrics wrapper metric: every
head's metric keeps its own states, which are summed across DDP ranks on ``compute`` (options such
as ``sync_on_compute``, ``process_group`` or ``dist_sync_fn`` are forwarded to each of them), so
every rank takes the same scheduler decision.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

try:
    import torchmetrics
    from torchmetrics import classification as tmc
    from torchmetrics.wrappers.abstract import WrapperMetric
except ModuleNotFoundError as exc:  # pragma: no cover - exercised only without the extra
    raise ModuleNotFoundError(
        "miles.metrics needs torchmetrics: pip install 'miles-lr[train]'"
    ) from exc

from miles.models import FusionOutput, JointFusionModel

METRICS = ("accuracy", "f1_micro", "f1_macro")

#: The key of the fused head's logits in a dict output, and of its metric in logs.
FUSED_KEY = "fused"


def make_metric(
    metric: str,
    num_classes: int,
    *,
    multilabel: bool = False,
    threshold: float = 0.5,
    **metric_options: Any,
) -> torchmetrics.Metric:
    """One torchmetrics object for a head: accuracy (micro), or F1 micro/macro.

    ``metric_options`` (``sync_on_compute``, ``process_group``, ``dist_sync_fn``, ...) go to the
    torchmetrics constructor.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if multilabel:
        if metric == "accuracy":
            return tmc.MultilabelAccuracy(
                num_labels=num_classes, threshold=threshold, average="micro", **metric_options
            )
        return tmc.MultilabelF1Score(
            num_labels=num_classes,
            threshold=threshold,
            average=_f1_average(metric),
            **metric_options,
        )
    if metric == "accuracy":
        return tmc.MulticlassAccuracy(num_classes=num_classes, average="micro", **metric_options)
    return tmc.MulticlassF1Score(
        num_classes=num_classes, average=_f1_average(metric), **metric_options
    )


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

    def as_log_dict(self, prefix: str = "val/") -> dict[str, float]:
        """``{prefix + "fused": ..., prefix + "head/<m>": ...}``: the keys the callbacks read."""
        out = {f"{prefix}{FUSED_KEY}": float(self.fused)}
        out.update({f"{prefix}head/{m}": float(v) for m, v in self.unimodal.items()})
        return out


Outputs = FusionOutput | Mapping[str, Tensor]


class HeadMetrics(WrapperMetric):
    """Accumulates one metric per head over a validation pass (a torchmetrics wrapper metric).

    Args:
        modalities: the unimodal heads to track.
        num_classes: classes (or labels, multilabel).
        metric: ``"accuracy"``, ``"f1_micro"`` or ``"f1_macro"``.
        multilabel: targets are 0/1 vectors and logits are thresholded after a sigmoid.
        threshold: the multilabel threshold on probabilities.
        metric_options: torchmetrics options given to every head's metric: ``sync_on_compute``,
            ``process_group``, ``dist_sync_fn``, ``compute_on_cpu``, ...

    ``update(output, target)`` takes a :class:`~miles.models.fusion.FusionOutput` or a dict
    ``{"fused": logits, "<modality>": logits, ...}`` (other keys, e.g. ``"loss"``, are ignored);
    ``compute()`` returns :class:`HeadScores`; ``forward`` returns the batch's scores and
    accumulates.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        modalities: Sequence[str],
        num_classes: int,
        metric: str = "accuracy",
        *,
        multilabel: bool = False,
        threshold: float = 0.5,
        **metric_options: Any,
    ) -> None:
        super().__init__()
        if isinstance(modalities, str) or len(modalities) == 0:
            raise ValueError(f"HeadMetrics needs a list of modalities, got {modalities!r}")
        if FUSED_KEY in modalities:
            raise ValueError(f"{FUSED_KEY!r} is the fused head's key; rename that modality")
        self.modalities = tuple(modalities)
        self.metric_name = metric
        self.multilabel = multilabel

        def build() -> torchmetrics.Metric:
            return make_metric(
                metric, num_classes, multilabel=multilabel, threshold=threshold, **metric_options
            )

        self.fused: torchmetrics.Metric = build()
        self.heads = nn.ModuleDict({m: build() for m in self.modalities})

    def _head(self, modality: str) -> torchmetrics.Metric:
        return cast(torchmetrics.Metric, self.heads[modality])

    def _prep(self, logits: Tensor) -> Tensor:
        logits = logits.detach()
        return torch.sigmoid(logits) if self.multilabel else logits

    def _split(self, output: Outputs) -> tuple[Tensor, dict[str, Tensor]]:
        """(fused logits, {modality: logits}) from a FusionOutput or a dict of logits."""
        if isinstance(output, FusionOutput):
            fused, unimodal = output.fused, dict(output.unimodal)
        elif isinstance(output, Mapping):
            if FUSED_KEY not in output:
                raise ValueError(
                    f"output has no {FUSED_KEY!r} logits; has {list(output)} (give "
                    "{'fused': logits, '<modality>': logits, ...} or a FusionOutput)"
                )
            fused, unimodal = output[FUSED_KEY], dict(output)
        else:
            raise TypeError(
                f"output must be a FusionOutput or a dict of logits, got {type(output).__name__}"
            )
        missing = [m for m in self.modalities if m not in unimodal]
        if missing:
            raise ValueError(f"output has no unimodal head {missing[0]!r}; has {list(unimodal)}")
        return fused, {m: unimodal[m] for m in self.modalities}

    def update(self, output: Outputs, target: Tensor) -> None:
        """Add one batch: a ``FusionOutput`` or ``{"fused": logits, "<modality>": logits}``."""
        fused, unimodal = self._split(output)
        self.fused.update(self._prep(fused), target)
        for m, logits in unimodal.items():
            self._head(m).update(self._prep(logits), target)

    def update_logits(self, fused: Tensor, unimodal: Mapping[str, Tensor], target: Tensor) -> None:
        """Deprecated: use ``update({"fused": fused, **unimodal}, target)``."""
        warnings.warn(
            "HeadMetrics.update_logits is deprecated: use update({'fused': fused, **unimodal}, "
            "target)",
            DeprecationWarning,
            stacklevel=2,
        )
        self.update({**unimodal, FUSED_KEY: fused}, target)

    def forward(self, output: Outputs, target: Tensor) -> HeadScores:
        """Scores of this batch alone; the batch is also accumulated for :meth:`compute`."""
        fused, unimodal = self._split(output)
        return HeadScores(
            fused=float(self.fused(self._prep(fused), target)),
            unimodal={m: float(self._head(m)(self._prep(x), target)) for m, x in unimodal.items()},
        )

    def compute(self) -> HeadScores:
        """Scores over everything seen since the last reset (synced across ranks)."""
        return HeadScores(
            fused=float(self.fused.compute()),
            unimodal={m: float(self._head(m).compute()) for m in self.modalities},
        )

    def reset(self) -> None:
        self.fused.reset()
        for m in self.modalities:
            self._head(m).reset()
        super().reset()


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
