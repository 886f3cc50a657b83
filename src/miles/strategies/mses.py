"""MSES: modality-specific early stopping (Fujimori et al., ACPR 2019), a MILES baseline."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from miles.models.fusion import JointFusionModel
from miles.strategies.base import EvalResult, StrategyContext
from miles.strategies.joint import JointAux
from miles.strategies.registry import register_strategy
from miles.validation import check_bool, check_non_negative, check_positive_int

_STATE_KEYS = (
    "best",
    "best_epoch",
    "wait",
    "frozen_at",
    "restored",
    "pending_restore",
    "snapshots",
)


@register_strategy("mses")
class MSES(JointAux):
    """Joint+aux training in which each encoder is early-stopped on its own validation curve.

    Source: Fujimori et al., "Modality-Specific Learning Rate Control for Multimodal
    Classification", ACPR 2019, cited as MSES by MILES (arXiv 2510.17394); we could read only its
    abstract. The paper trains modality-specific classifiers together with the multimodal one
    (multitask learning, i.e. our auxiliary unimodal heads, ``uses_aux_losses = True``), uses each
    modality's classifier to detect when that modality stops generalising, and stops training that
    modality's sub-network separately while the rest goes on ("learning rate control": the
    modality's learning rate drops to zero).

    Mechanism here: after every validation, modality ``m``'s unimodal head metric is compared with
    its best so far. An epoch improves ``m`` when ``metric > best + min_delta``; after
    ``patience`` consecutive epochs without improvement encoder ``m`` has converged and is frozen
    with ``model.freeze(m)``: no gradients for encoder ``m`` and its head, and its BatchNorm
    running statistics fixed (the model keeps frozen encoders in eval mode). The freeze takes
    effect from the next epoch and is stored in the model's extra state, so it survives resumption.
    The fused head and the unfrozen encoders keep training.

    Args:
        patience: epochs without improvement before a modality is frozen (>= 1). Our default 5:
            neither MILES nor the abstract of Fujimori et al. give a value (MILES tuned each
            baseline by random search).
        min_delta: an improvement must exceed this (>= 0, in metric units). Default 0.
        restore_best: when ``m`` is frozen, reload encoder ``m``'s and head ``m``'s weights and
            BatchNorm buffers from its best validation epoch, as classical early stopping returns
            the best model rather than the overfitted last one. Default ``False``: the paper's
            "learning rate control" reading is that the modality's learning rate drops to zero,
            i.e. its weights stay where they are; reloading older weights would also hand the
            fused head, trained on later latents, latents it has not seen. When enabled, the
            reload happens at the start of the next epoch (so each saved checkpoint matches its
            validation row); when training stops right after the last freeze, that last reload
            never happens, and the trainer's best-epoch weights are what gets tested. Costs one
            extra copy of each encoder in memory and in ``last.pt``.
        stop_when_all_frozen: end training once every encoder is frozen. Default ``True``: the
            paper trains "until all parts have converged"; the remaining part, the fused linear
            head, is early-stopped by the trainer's best-epoch selection on the fused metric.

    Design choices where the paper (as available to us) is silent:
        * The convergence signal is the unimodal head's validation *metric* (the only per-head
          validation signal ``EvalResult`` carries); the paper may use the per-head loss.
        * A NaN metric counts as "no improvement".
        * The first validation always sets the best (the best starts undefined).

    Not supported: metrics where lower is better (all of ours are higher-is-better).
    """

    name = "mses"
    uses_aux_losses = True
    unused_parameters = True  # the frozen parts get no gradient (matters under DDP)

    def __init__(
        self,
        patience: int = 5,
        min_delta: float = 0.0,
        restore_best: bool = False,
        stop_when_all_frozen: bool = True,
    ) -> None:
        super().__init__()  # joint+aux with every auxiliary weight 1
        self.patience = check_positive_int("patience", patience)
        self.min_delta = check_non_negative("min_delta", min_delta)
        self.restore_best = check_bool("restore_best", restore_best)
        self.stop_when_all_frozen = check_bool("stop_when_all_frozen", stop_when_all_frozen)
        self._reset()

    def _reset(self) -> None:
        """Fresh counters (a checkpoint, when resuming, is loaded after ``configure_model``)."""
        self._modalities: tuple[str, ...] = ()
        self.best: dict[str, float | None] = {}
        self.best_epoch: dict[str, int] = {}
        self.wait: dict[str, int] = {}
        self.frozen_at: dict[str, int] = {}
        self.restored: dict[str, int] = {}
        #: frozen at the end of the last epoch, best weights reloaded at the start of the next one
        self.pending_restore: list[str] = []
        self._restored_now: list[str] = []
        # modality -> {"encoder": state, "head": state}, taken at that modality's best epoch
        self.snapshots: dict[str, dict[str, dict[str, Tensor]]] = {}

    # -- setup -----------------------------------------------------------------------------------
    def configure_model(self, model: JointFusionModel) -> None:
        super().configure_model(model)  # joint+aux: the unimodal heads train the encoders
        self._reset()
        self._track(model.modalities)

    def on_fit_start(self, ctx: StrategyContext) -> None:
        self._track(ctx.model.modalities)

    def _track(self, modalities: tuple[str, ...]) -> None:
        """Start counters for the model's modalities (keeps counters loaded from a checkpoint)."""
        self._modalities = tuple(modalities)
        for m in modalities:
            self.best.setdefault(m, None)
            self.best_epoch.setdefault(m, 0)
            self.wait.setdefault(m, 0)

    # -- per epoch -------------------------------------------------------------------------------
    def on_epoch_start(self, ctx: StrategyContext, epoch: int) -> None:
        """Reload the best weights of modalities frozen at the previous epoch's end.

        Done here rather than in ``on_epoch_end`` so that the weights the trainer saves for an
        epoch (best and last checkpoints) are the ones its validation row was measured with.
        """
        for m in self.pending_restore:
            snap = self.snapshots.pop(m)  # m never trains again: the copy is no longer needed
            ctx.model.encoders[m].load_state_dict(snap["encoder"])
            ctx.model.heads[m].load_state_dict(snap["head"])
            self.restored[m] = self.best_epoch[m]
            self._restored_now.append(m)
        self.pending_restore = []

    def on_epoch_end(
        self, ctx: StrategyContext, epoch: int, val: EvalResult, holdout: EvalResult | None
    ) -> dict[str, Any]:
        model = ctx.model
        if self._modalities != model.modalities:
            self._track(model.modalities)
        missing = [m for m in model.modalities if m not in val.unimodal]
        if missing:
            raise ValueError(
                f"mses: validation has no unimodal metric for {missing}; got {sorted(val.unimodal)}"
            )
        newly_frozen: list[str] = []
        for m in model.modalities:
            if m in self.frozen_at:
                continue
            value = float(val.unimodal[m])
            best = self.best[m]
            if not math.isnan(value) and (best is None or value > best + self.min_delta):
                self.best[m], self.best_epoch[m], self.wait[m] = value, epoch, 0
                if self.restore_best:
                    self.snapshots[m] = {
                        "encoder": _clone(model.encoders[m].state_dict()),
                        "head": _clone(model.heads[m].state_dict()),
                    }
                continue
            self.wait[m] += 1
            if self.wait[m] >= self.patience:
                model.freeze(m)
                self.frozen_at[m] = epoch
                newly_frozen.append(m)
                if self.restore_best and m in self.snapshots:
                    self.pending_restore.append(m)
        restored, self._restored_now = self._restored_now, []
        return {
            "frozen": sorted(self.frozen_at),
            "newly_frozen": newly_frozen,
            "restored": restored,
            "wait": dict(self.wait),
            "best_epoch": dict(self.best_epoch),
        }

    def should_stop(self) -> bool:
        """All encoders converged (and frozen): only the fused head would still train."""
        return (
            self.stop_when_all_frozen
            and bool(self._modalities)
            and all(m in self.frozen_at for m in self._modalities)
        )

    # -- resumption ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "best": dict(self.best),
            "best_epoch": dict(self.best_epoch),
            "wait": dict(self.wait),
            "frozen_at": dict(self.frozen_at),
            "restored": dict(self.restored),
            "pending_restore": list(self.pending_restore),
            "snapshots": {
                m: {part: dict(state) for part, state in parts.items()}
                for m, parts in self.snapshots.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) != set(_STATE_KEYS):
            raise ValueError(
                f"MSES state must have keys {sorted(_STATE_KEYS)}, got {sorted(state)}"
            )
        self.best = {m: None if v is None else float(v) for m, v in state["best"].items()}
        self.best_epoch = {m: int(v) for m, v in state["best_epoch"].items()}
        self.wait = {m: int(v) for m, v in state["wait"].items()}
        self.frozen_at = {m: int(v) for m, v in state["frozen_at"].items()}
        self.restored = {m: int(v) for m, v in state["restored"].items()}
        self.pending_restore = [str(m) for m in state["pending_restore"]]
        self._restored_now = []
        self.snapshots = {
            m: {part: dict(s) for part, s in parts.items()}
            for m, parts in state["snapshots"].items()
        }
        self._modalities = tuple(self.best)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "patience": self.patience,
            "min_delta": self.min_delta,
            "restore_best": self.restore_best,
            "stop_when_all_frozen": self.stop_when_all_frozen,
        }


def _clone(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached copies, so later optimizer steps do not change the snapshot."""
    with torch.no_grad():
        return {k: v.detach().clone() for k, v in state.items()}
