"""MILES in the Hugging Face ``Trainer``: a ``TrainerCallback`` that decides in ``on_evaluate``.

Install with ``pip install 'miles-lr[hf]'``. Three pieces, all optional but the callback::

    model = FusionForTrainer(miles.JointFusionModel(encoders, num_classes=5))
    optimizer = torch.optim.AdamW(miles.modality_param_groups(model.model), lr=1e-3)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(..., eval_strategy="epoch", remove_unused_columns=False),
        train_dataset=train,  # items: {"audio": ..., "image": ..., "labels": ...}
        eval_dataset=val,
        optimizers=(optimizer, None),  # HF adds its own schedule (linear by default)
        compute_metrics=head_metrics(model.model.modalities, num_classes=5),
        callbacks=[MILESCallback(tau=0.2, mu=0.5)],
    )

* **Metrics**: :func:`head_metrics` is a ``compute_metrics`` that scores the fused head and every
  unimodal head with :class:`miles.HeadMetrics` (HF gathers the predictions of every process
  first, so all ranks agree). It expects the model's outputs after ``loss`` in the order
  ``fused, <modality 1>, <modality 2>, ...``, which is what :class:`FusionForTrainer` returns. HF
  prefixes the names with ``eval_``; the callback reads ``eval_fused`` and ``eval_head/<m>``
  (``fused_key``, ``head_key``), whoever computed them.
* **Timing**: ``on_evaluate`` runs after each evaluation during training (``eval_strategy``);
  the decision sets the LRs from the next optimizer step on.
* **Schedules**: HF steps its scheduler after every optimizer step. The callback removes
  MILES's factors in ``on_optimizer_step`` (just before that) and puts them back in
  ``on_step_end`` (just after), so the schedule (HF's warm-up/cosine or yours) sees the LRs it
  would have alone and every group trains at ``schedule x factor``.
* **Checkpoints**: the callback is an HF ``ExportableState``: MILES's state is written into every
  checkpoint's ``trainer_state.json`` and read back by ``train(resume_from_checkpoint=...)``.
* **Logging**: each decision's :meth:`miles.Decision.scalars` are added to the evaluation's
  ``metrics`` (returned by ``evaluate()`` and seen by later callbacks) and to
  ``trainer.state.log_history``. A callback cannot call ``Trainer.log``, which is what feeds the
  reporting integrations (TensorBoard, W&B, ...): pass ``log=trainer.log`` (e.g.
  ``trainer.add_callback(MILESCallback(log=trainer.log))``) to send them there too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ModuleNotFoundError as exc:  # pragma: no cover - exercised only without the extra
    raise ModuleNotFoundError(
        "miles.integrations.hf needs transformers: pip install 'miles-lr[hf]'"
    ) from exc

from miles.integrations.metric_keys import MetricKeys
from miles.models.fusion import FusionOutput
from miles.models.losses import head_losses
from miles.scheduler import MILES, check_options

__all__ = ["FusionForTrainer", "MILESCallback", "head_metrics"]


class FusionForTrainer(nn.Module):
    """A fusion model in the HF ``Trainer``'s calling convention.

    ``forward(labels=None, **inputs)`` runs ``model(inputs)`` (a :class:`JointFusionModel` or
    any module returning a ``FusionOutput``) and returns ``{"loss": L_fused + sum_m L_m (when
    labels are given), "fused": logits, "<modality>": logits, ...}``. Batches are dicts with one
    key per modality and ``labels``; set ``remove_unused_columns=False`` in ``TrainingArguments``
    (HF would otherwise drop the modality keys, which ``forward`` takes as ``**inputs``).
    """

    #: The losses are batch means: HF must scale them for gradient accumulation itself (it would
    #: otherwise read ``**inputs`` as accepting ``num_items_in_batch``).
    accepts_loss_kwargs = False

    def __init__(self, model: nn.Module, *, multilabel: bool = False) -> None:
        super().__init__()
        self.model = model
        self.multilabel = multilabel

    def forward(self, labels: Tensor | None = None, **inputs: Tensor) -> dict[str, Tensor]:
        inputs.pop("num_items_in_batch", None)
        out = self.model(inputs)
        if not isinstance(out, FusionOutput):
            raise TypeError(f"the wrapped model must return a FusionOutput, got {type(out)}")
        result: dict[str, Tensor] = {}
        if labels is not None:
            losses = head_losses(out, labels, multilabel=self.multilabel)
            result["loss"] = torch.stack(list(losses.values())).sum()
        result["fused"] = out.fused
        result.update(out.unimodal)
        return result


def head_metrics(
    modalities: Sequence[str],
    num_classes: int,
    metric: str = "accuracy",
    *,
    multilabel: bool = False,
    threshold: float = 0.5,
) -> Callable[[Any], dict[str, float]]:
    """A ``compute_metrics`` giving ``fused`` and ``head/<m>`` (HF adds the ``eval_`` prefix).

    The predictions must be the model's outputs after ``loss``, in the order
    ``(fused, *modalities)``; the metric is :class:`miles.HeadMetrics`'s (one definition for
    every loop).
    """
    from miles.metrics import HeadMetrics  # torchmetrics: loaded only when used

    names = tuple(modalities)

    def compute(eval_pred: Any) -> dict[str, float]:
        predictions = eval_pred.predictions
        if not isinstance(predictions, (tuple, list)) or len(predictions) != 1 + len(names):
            got = len(predictions) if isinstance(predictions, (tuple, list)) else "one array"
            raise ValueError(
                f"head_metrics expects {1 + len(names)} predictions (fused, {', '.join(names)}) "
                f"after the loss, got {got}: return {{'loss', 'fused', *modalities}} from forward"
            )
        heads = HeadMetrics(
            names,
            num_classes,
            metric,
            multilabel=multilabel,
            threshold=threshold,
            sync_on_compute=False,  # HF already gathered every process's predictions
        )
        logits = [torch.as_tensor(p) for p in predictions]
        heads.update(
            dict(zip(("fused", *names), logits, strict=True)), torch.as_tensor(eval_pred.label_ids)
        )
        return heads.compute().as_log_dict(prefix="")

    return compute


class MILESCallback(TrainerCallback, ExportableState):
    """Step MILES after every evaluation of an HF ``Trainer.train``; see the module docstring.

    Args:
        tau: as for :class:`miles.MILES`, and so are ``mu``, ``reset_other``, ``mode``,
            ``scale`` and ``sync``.
        estimator: ``"heads"`` reads ``head_key`` per modality, ``"ablation"`` ``without_key``.
        fused_key: the evaluation metric name of the fused head; ``head_key`` and
            ``without_key`` those of each head and each ablation (``{modality}`` is filled in).
        log: a function given each decision's scalars, e.g. ``trainer.log``.
        log_prefix: prefix of the decision scalars.
        miles_state: a MILES state dict to start from (HF sets it when it restores callbacks).
    """

    def __init__(
        self,
        tau: float = 0.2,
        mu: float = 0.5,
        reset_other: bool = False,
        *,
        mode: str = "max",
        scale: float | None = None,
        sync: str = "check",
        estimator: str = "heads",
        fused_key: str = "eval_fused",
        head_key: str = "eval_head/{modality}",
        without_key: str = "eval_without/{modality}",
        log: Callable[[dict[str, float]], Any] | None = None,
        log_prefix: str = "miles/",
        miles_state: Mapping[str, Any] | None = None,
    ) -> None:
        self._options = check_options(tau, mu, reset_other, mode=mode, scale=scale, sync=sync)
        self.keys = MetricKeys(fused_key, head_key, without_key, estimator)
        self.log = log
        self.log_prefix = log_prefix
        self.miles_state = miles_state
        self.scheduler: MILES | None = None
        self._training = False

    # ------------------------------------------------------------------ HF ExportableState
    def state(self) -> dict[str, Any]:
        """What HF writes into ``trainer_state.json`` with every checkpoint (JSON only)."""
        return {
            "args": {
                **self._options,
                "estimator": self.keys.estimator,
                "fused_key": self.keys.fused,
                "head_key": self.keys.head,
                "without_key": self.keys.without,
                "log_prefix": self.log_prefix,
            },
            "attributes": {
                "miles_state": (
                    self.scheduler.state_dict() if self.scheduler is not None else self.miles_state
                )
            },
        }

    def _saved_state(self, state: Any) -> Mapping[str, Any] | None:
        """MILES's state from the resumed checkpoint's trainer state, if any."""
        if self.miles_state is not None:
            return self.miles_state
        stored = getattr(state, "stateful_callbacks", {}).get(type(self).__name__)
        if isinstance(stored, list):
            stored = stored[0] if stored else None
        if not isinstance(stored, Mapping):
            return None
        saved = stored.get("attributes", {}).get("miles_state")
        return saved if isinstance(saved, Mapping) else None

    # ------------------------------------------------------------------ training events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        optimizer = kwargs.get("optimizer")
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise RuntimeError("MILESCallback needs the Trainer's optimizer at on_train_begin")
        try:
            self.scheduler = MILES(optimizer, **self._options)
        except ValueError as exc:
            raise ValueError(
                f"{exc}. With the HF Trainer, pass an optimizer built on modality-tagged groups: "
                "Trainer(..., optimizers=(torch.optim.AdamW(miles.modality_param_groups(model)), "
                "None)), or miles.param_groups_by_prefix(model, {...}) for any model"
            ) from exc
        saved = self._saved_state(state)
        if saved is not None:
            self.scheduler.load_state_dict(saved)
        self.miles_state = None
        self._training = True

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.scheduler is not None:
            self.scheduler.unscale()  # HF steps its schedule next

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.scheduler is not None:
            self.scheduler.reapply()

    def on_evaluate(
        self,
        args: Any,
        state: Any,
        control: Any,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        scheduler = self.scheduler
        if scheduler is None or metrics is None or not self._training:
            return  # an evaluation outside train(): nothing to schedule
        decision = self.keys.step(scheduler, lambda key: self._read(metrics, key))
        scalars = decision.scalars(prefix=self.log_prefix)
        metrics.update(scalars)
        state.log_history.append({**scalars, "step": state.global_step})
        if self.log is not None:
            self.log(dict(scalars))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._training = False
        if self.scheduler is not None:
            self.scheduler.reapply()

    def _read(self, metrics: Mapping[str, float], key: str) -> float:
        if key not in metrics:
            raise KeyError(
                f"MILESCallback found no {key!r} among the evaluation metrics {sorted(metrics)}: "
                "pass compute_metrics=miles.integrations.hf.head_metrics(...) (or your own, "
                "returning 'fused' and 'head/<modality>'), or set fused_key/head_key"
            )
        return metrics[key]
