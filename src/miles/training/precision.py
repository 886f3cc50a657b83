"""Numerical precision and gradient clipping of a training step, in one place.

:class:`Precision` is what the step primitives of :class:`~miles.strategies.base.StrategyContext`
delegate to, so the default step and every method's own ``training_step`` get the same settings:

* ``"32"``: plain float32, no autocast, no scaler: exactly the loop without this class.
* ``"bf16-mixed"``: the forward pass and the losses run under ``torch.autocast`` with bfloat16.
  bfloat16 has float32's range, so no loss scaling is needed.
* ``"16-mixed"``: autocast with float16 and a ``torch.amp.GradScaler`` per optimizer. The scaled
  gradients are unscaled right after ``backward``, *before* a strategy's ``on_after_backward``
  hook, so gradient modulation (OGM, ...) sees the true gradients; the optimizer then steps
  through the scaler, which skips a step whose gradients hold an inf or a NaN (and lowers the
  scale). Skipped steps are counted in :attr:`Precision.skipped_steps`.

Gradient clipping (``grad_clip_norm``) clips the global norm of an optimizer's gradients just
before it steps, after unscaling. The names follow Lightning's ``precision`` flag.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from miles.validation import check_choice, check_positive, check_str

__all__ = ["PRECISIONS", "Precision", "check_precision"]

#: the accepted ``precision`` values and the autocast dtype of each (``None``: no autocast)
PRECISIONS: dict[str, torch.dtype | None] = {
    "32": None,
    "bf16-mixed": torch.bfloat16,
    "16-mixed": torch.float16,
}


def check_precision(value: Any) -> str:
    """A valid precision name (a str: YAML's bare ``32`` is an int, quote it)."""
    if isinstance(value, int) and not isinstance(value, bool):
        raise TypeError(
            f"precision must be a str, one of {list(PRECISIONS)}, got int: {value!r} "
            '(write precision: "32" in YAML)'
        )
    return check_choice("precision", check_str("precision", value), PRECISIONS)


class Precision:
    """Autocast, loss scaling and clipping for the step primitives.

    Args:
        precision: ``"32"``, ``"bf16-mixed"`` or ``"16-mixed"``.
        device: where the model runs (autocast's device type; the scaler's device).
        grad_clip_norm: clip the global gradient norm of each optimizer to this before it steps
            (``None``: no clipping).
    """

    def __init__(
        self,
        precision: str = "32",
        device: torch.device | str = "cpu",
        grad_clip_norm: float | None = None,
    ) -> None:
        self.precision = check_precision(precision)
        self.device = torch.device(device)
        self.dtype = PRECISIONS[self.precision]
        self.grad_clip_norm = (
            None if grad_clip_norm is None else check_positive("grad_clip_norm", grad_clip_norm)
        )
        #: optimizer steps the scaler skipped because a gradient was not finite
        self.skipped_steps = 0
        self._scalers: weakref.WeakKeyDictionary[Optimizer, torch.amp.GradScaler] = (
            weakref.WeakKeyDictionary()
        )
        #: optimizers whose gradients were unscaled since their last step
        self._unscaled: weakref.WeakSet[Optimizer] = weakref.WeakSet()

    @property
    def scales_loss(self) -> bool:
        """True for ``"16-mixed"``: gradients go through a ``GradScaler``."""
        return self.precision == "16-mixed"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward pass's and the losses' context: ``torch.autocast`` or nothing."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scaler(self, optimizer: Optimizer) -> torch.amp.GradScaler | None:
        """The scaler of ``optimizer`` (one per optimizer: copies trained on the side keep the
        run's scale untouched), or ``None`` without loss scaling."""
        if not self.scales_loss:
            return None
        scaler = self._scalers.get(optimizer)
        if scaler is None:
            scaler = self._scalers[optimizer] = torch.amp.GradScaler(self.device.type)
        return scaler

    def backward(self, loss: Tensor, optimizer: Optimizer) -> None:
        """``loss.backward()``; with a scaler, scaled, then ``optimizer``'s gradients unscaled.

        A ``GradScaler`` unscales once per step, so with ``"16-mixed"`` a second backward before
        the optimizer steps is refused: add the losses and call it once.
        """
        scaler = self.scaler(optimizer)
        if scaler is None:
            loss.backward()
            return
        if optimizer in self._unscaled:
            raise RuntimeError(
                "backward was called twice before the optimizer stepped, with precision "
                "'16-mixed': the gradient scaler unscales once per step. Add the losses and call "
                "ctx.backward once per optimizer step (or use bf16-mixed, which needs no scaler); "
                "a backward for another optimizer's parameters (a side model) must name it: "
                "ctx.backward(loss, optimizer)"
            )
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        self._unscaled.add(optimizer)

    def step(self, optimizer: Optimizer) -> None:
        """Clip (when set), then step ``optimizer`` (through its scaler, which may skip it)."""
        if self.grad_clip_norm is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm)
        scaler = self.scaler(optimizer)
        if scaler is None or optimizer not in self._unscaled:
            optimizer.step()  # no scaled backward went into these gradients
            return
        self._unscaled.discard(optimizer)
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        if scaler.get_scale() < scale:  # update() lowers the scale exactly when it skipped
            self.skipped_steps += 1

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self, optimizer: Optimizer) -> dict[str, Any]:
        """The scaler state of ``optimizer`` (empty without loss scaling): builtins only."""
        scaler = self.scaler(optimizer)
        return {} if scaler is None else {"scaler": dict(scaler.state_dict())}

    def load_state_dict(self, optimizer: Optimizer, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned for ``optimizer``."""
        scaler = self.scaler(optimizer)
        saved = state.get("scaler")
        if scaler is not None and saved:
            scaler.load_state_dict(dict(saved))
