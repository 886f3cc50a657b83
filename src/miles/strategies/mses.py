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
    "fused_best",
    "fused_wait",
)


@register_strategy("mses")
class MSES(JointAux):
    """Joint+aux training in which each encoder is early-stopped on its own validation curve.

    Source: Fujimori, Endo, Kawai, Mochizuki, "Modality-Specific Learning Rate Control for
    Multimodal Classification", ACPR 2019 (LNCS pp. 412-422), cited as MSES by MILES (arXiv
    2510.17394) and MSLR. Its body was not available to us; what is known: it trains
    modality-specific classifiers together with the multimodal one (multitask learning, i.e. our
    auxiliary unimodal heads, ``uses_aux_losses = True``) "to detect overfitting in each modality
    and carry out early stopping separately" (abstract), with one global learning rate; MSLR
    (Sec. 2.3.1) describes it as "choosing the best saved parameters for the overfit modalities
    and stopping training"; MILES (Sec. II-C): "The training continues until all parts of the
    network have converged."

    Mechanism here: after every validation, modality ``m``'s unimodal head metric is compared with
    its best so far. An epoch improves ``m`` when ``metric > best + min_delta``; after
    ``patience`` consecutive epochs without improvement ``m`` has converged: encoder ``m`` and its
    head are frozen with ``model.freeze(m)`` (no gradients; the model keeps frozen modules in
    eval mode, so BatchNorm running statistics no longer move) and, with ``restore_best``
    (default), their weights and buffers are reloaded from ``m``'s best epoch, bit for bit. The
    reload happens at the start of the next epoch, so each saved checkpoint matches its
    validation row. The fused head and the unfrozen encoders keep training; once every encoder
    is frozen, the fused head trains on until it too has gone ``patience`` epochs without
    improving its validation metric (counted from the first epoch after the last freeze, the
    first with every restored encoder in place), and the run ends there
    (``stop_when_converged``).

    Args:
        patience: epochs without improvement before a part (an encoder, then the fused head) has
            converged (>= 1). Our default 5: neither MILES nor the abstract give a value (MILES
            tuned each baseline by random search).
        min_delta: an improvement must exceed this (>= 0, in metric units). Default 0.
        restore_best: reload a converged modality's best-epoch weights (default ``True``, MSLR's
            reading: "the best saved parameters"); ``False`` freezes it where it is (the
            modality's learning rate simply drops to zero). Costs one copy of each branch in
            memory and in ``last.pt`` while it is tracked.
        stop_when_converged: end the run once every encoder is frozen and the fused head has
            converged too (default ``True``); ``False`` trains to the last epoch.

    Design choices where the paper (as available to us) is silent:
        * The convergence signal is each head's validation *metric* (the per-head loss is an
          equally plausible reading).
        * A NaN metric counts as "no improvement"; the first validation always sets the best.
        * The model selection is the trainer's: the best validation fused epoch, as for every
          method.

    Not supported: metrics where lower is better (all of ours are higher-is-better).
    """

    name = "mses"
    uses_aux_losses = True
    unused_parameters = True  # the frozen parts get no gradient (matters under DDP)

    def __init__(
        self,
        patience: int = 5,
        min_delta: float = 0.0,
        restore_best: bool = True,
        stop_when_converged: bool = True,
    ) -> None:
        super().__init__()  # joint+aux with every auxiliary weight 1
        self.patience = check_positive_int("patience", patience)
        self.min_delta = check_non_negative("min_delta", min_delta)
        self.restore_best = check_bool("restore_best", restore_best)
        self.stop_when_converged = check_bool("stop_when_converged", stop_when_converged)
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
        #: the fused head, tracked once every encoder is frozen (``None``: not yet)
        self.fused_best: float | None = None
        self.fused_wait = 0

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
        all_frozen_before = self._all_frozen()
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
        record: dict[str, Any] = {
            "frozen": sorted(self.frozen_at),
            "newly_frozen": newly_frozen,
            "restored": restored,
            "wait": dict(self.wait),
            "best_epoch": dict(self.best_epoch),
        }
        if all_frozen_before:  # only the fused head trained this epoch
            value = float(val.fused)
            best = self.fused_best
            if not math.isnan(value) and (best is None or value > best + self.min_delta):
                self.fused_best, self.fused_wait = value, 0
            else:
                self.fused_wait += 1
            record["fused_wait"] = self.fused_wait
        return record

    def _all_frozen(self) -> bool:
        return bool(self._modalities) and all(m in self.frozen_at for m in self._modalities)

    def should_stop(self) -> bool:
        """Every encoder converged and frozen, and the fused head has converged after them."""
        return self.stop_when_converged and self._all_frozen() and self.fused_wait >= self.patience

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
            "fused_best": self.fused_best,
            "fused_wait": self.fused_wait,
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
        self.fused_best = None if state["fused_best"] is None else float(state["fused_best"])
        self.fused_wait = int(state["fused_wait"])
        self._modalities = tuple(self.best)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "patience": self.patience,
            "min_delta": self.min_delta,
            "restore_best": self.restore_best,
            "stop_when_converged": self.stop_when_converged,
        }


def _clone(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached copies, so later optimizer steps do not change the snapshot."""
    with torch.no_grad():
        return {k: v.detach().clone() for k, v in state.items()}
