"""MILES in PyTorch Lightning: a ``Callback`` that decides after every validation.

Install with ``pip install 'miles-lr[lightning]'``. Your ``LightningModule`` does three ordinary
things; the callback does the rest::

    class Fusion(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = miles.JointFusionModel(encoders, num_classes=5)
            self.heads = miles.HeadMetrics(self.model.modalities, num_classes=5)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return sum(miles.head_losses(self.model(x), y).values())

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.heads.update(self.model(x), y)

        def on_validation_epoch_end(self):  # 1. log the fused and per-head validation metrics
            self.log_dict(self.heads.compute().as_log_dict("val/"))
            self.heads.reset()

        def configure_optimizers(self):  # 2. param groups tagged by modality
            opt = torch.optim.AdamW(miles.modality_param_groups(self.model), lr=1e-3)
            return opt  # 3. with any LR scheduler you like, or none

    L.Trainer(callbacks=[MILESCallback(tau=0.2, mu=0.5)]).fit(Fusion(), train, val)

What the callback does:

* **Metrics**: after each validation (``on_validation_end``, once Lightning has reduced the epoch's
  logged values), it reads ``trainer.callback_metrics[fused_key]`` and, per modality,
  ``head_key.format(modality=m)`` (defaults ``val/fused``, ``val/head/<m>``: what
  ``HeadScores.as_log_dict("val/")`` logs). Under DDP the values must be the same on every rank
  (``HeadMetrics`` syncs its states; or ``self.log(..., sync_dist=True)``); MILES refuses
  per-rank values (see :mod:`miles.integrations.distributed`).
* **Timing**: the decision is taken right after validation and sets the LRs of the *next*
  epoch's batches (Lightning steps epoch-interval schedulers before validation, so stepping
  MILES as a scheduler would be one epoch late). Sanity-check validation is ignored.
* **Schedules**: MILES is built on ``trainer.optimizers[optimizer_index]`` at ``on_fit_start``.
  Any schedule you return from ``configure_optimizers`` (per step or per epoch) keeps working:
  MILES removes its factors right after each optimizer step (a torch optimizer post-step hook),
  Lightning steps your schedule on the LRs it would have alone, and MILES puts the factors back
  at ``on_train_batch_end`` (and before the next optimizer step). A step that 16-bit AMP's
  gradient scaler skips runs no post-step hook: the schedule then steps on the scaled LRs, which
  :meth:`miles.MILES.reapply` reads as an absolute write (exact for LambdaLR-style schedules).
* **Checkpoints**: MILES's state is the callback's ``state_dict``, saved in Lightning's checkpoint
  and restored on ``fit(ckpt_path=...)``, so a resumed run takes the same decisions.
* **Logging**: each decision's :meth:`miles.Decision.scalars` (``miles/u/<m>``, ``miles/delta``,
  ``miles/factor/<m>``, ``miles/lr/<group>``, ...) go to every logger of the trainer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
except ModuleNotFoundError as exc:  # pragma: no cover - exercised only without the extra
    raise ModuleNotFoundError(
        "miles.integrations.lightning needs Lightning: pip install 'miles-lr[lightning]'"
    ) from exc

from miles.integrations.metric_keys import MetricKeys
from miles.scheduler import MILES, check_options

__all__ = ["MILESCallback"]


class MILESCallback(Callback):
    """Step MILES after every validation of a Lightning ``fit``; see the module docstring.

    Args:
        tau: as for :class:`miles.MILES`, and so are ``mu``, ``reset_other``, ``mode``,
            ``scale`` and ``sync``.
        estimator: ``"heads"`` reads ``head_key`` per modality; ``"ablation"`` reads
            ``without_key`` (the fused metric with that modality ablated).
        fused_key: the logged metric name of the fused head; ``head_key`` and ``without_key``
            those of each head and each ablation (``{modality}`` is filled in).
        optimizer_index: which of the trainer's optimizers MILES schedules.
        log_prefix: prefix of the logged decision scalars; ``None`` logs nothing.
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
        fused_key: str = "val/fused",
        head_key: str = "val/head/{modality}",
        without_key: str = "val/without/{modality}",
        optimizer_index: int = 0,
        log_prefix: str | None = "miles/",
    ) -> None:
        # Checked now, so a bad value fails before training rather than after the first epoch.
        self._options = check_options(tau, mu, reset_other, mode=mode, scale=scale, sync=sync)
        self.keys = MetricKeys(fused_key, head_key, without_key, estimator)
        self.optimizer_index = optimizer_index
        self.log_prefix = log_prefix
        self.scheduler: MILES | None = None
        self._pending: Mapping[str, Any] | None = None
        self._hooks: list[Any] = []

    # ------------------------------------------------------------------ setup and teardown
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = trainer.optimizers
        if not 0 <= self.optimizer_index < len(optimizers):
            raise RuntimeError(
                f"MILESCallback schedules optimizer {self.optimizer_index}, but "
                f"configure_optimizers returned {len(optimizers)}"
            )
        optimizer = optimizers[self.optimizer_index]
        self.scheduler = MILES(optimizer, **self._options)
        if self._pending is not None:
            self.scheduler.load_state_dict(self._pending)
            self._pending = None
        scheduler = self.scheduler
        self._hooks = [
            optimizer.register_step_pre_hook(lambda *_: scheduler.reapply()),
            optimizer.register_step_post_hook(lambda *_: scheduler.unscale()),
        ]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self.scheduler is not None:
            self.scheduler.reapply()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if self.scheduler is not None:
            self.scheduler.reapply()  # after Lightning stepped the schedules of this batch

    # ------------------------------------------------------------------ the decision
    def _read(self, trainer: pl.Trainer, key: str) -> Any:
        metrics = trainer.callback_metrics
        if key not in metrics:
            raise RuntimeError(
                f"MILESCallback found no {key!r} among the logged metrics {sorted(metrics)}: log "
                "the fused and per-head validation metrics in your LightningModule, e.g. "
                "self.log_dict(head_metrics.compute().as_log_dict('val/')) in "
                "on_validation_epoch_end, or set fused_key/head_key"
            )
        return metrics[key]

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or self.scheduler is None:
            return
        decision = self.keys.step(self.scheduler, lambda key: self._read(trainer, key))
        if self.log_prefix is not None:
            scalars = decision.scalars(prefix=self.log_prefix)
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=trainer.global_step)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        if self.scheduler is not None:
            return {"scheduler": self.scheduler.state_dict()}
        return {"scheduler": self._pending} if self._pending is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("scheduler")
        if state is None:
            return
        if self.scheduler is None:
            self._pending = state  # Lightning restores callbacks before building optimizers
        else:
            self.scheduler.load_state_dict(state)
