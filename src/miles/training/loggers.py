"""Where each epoch's numbers go besides the history: CSV, TensorBoard, Weights & Biases.

Every logger receives the same flat ``{name: float}`` view of an epoch (:func:`epoch_scalars`):

* ``train/loss`` and ``train/loss_<head>``, ``val/loss``, ``val/fused`` and ``val/<modality>``;
* ``lr/<group>``: the learning rate each param group trained at (groups are named by modality,
  ``shared`` for the fusion layer and fused head);
* MILES's decision as :meth:`miles.Decision.scalars` gives it: ``miles/u/<m>``, ``miles/delta``,
  ``miles/factor/<m>``, ``miles/slowed/<m>``, ``miles/lr/<group>`` (the rates for the next
  epoch), ...; any other strategy's numeric record values as ``strategy/<key>``;
* ``selection_score`` and ``time/epoch_s``.

Loggers are picked by name (``TrainerConfig.loggers``, ``--logger csv,tensorboard``) from a
registry; :func:`register_logger` adds one. The trainer runs them on rank 0 only, and a resumed
run drops what a logger had recorded past the checkpoint it resumes from.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from miles.extras import MissingExtraError, require
from miles.registry import Registry

__all__ = [
    "CSVLogger",
    "Logger",
    "TensorBoardLogger",
    "WandbLogger",
    "available_loggers",
    "check_loggers",
    "epoch_scalars",
    "register_logger",
    "start_loggers",
]

_LOGGERS: Registry[type[Logger]] = Registry("logger")


def register_logger(name: str) -> Any:
    """Class decorator: make a :class:`Logger` subclass available under ``name``."""
    return _LOGGERS.register(name)


def available_loggers() -> list[str]:
    return _LOGGERS.names()


def check_loggers(names: Any) -> list[str]:
    """A list of registered logger names, each at most once."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise TypeError(f"loggers must be a list of names, got {type(names).__name__}: {names!r}")
    for name in names:
        _LOGGERS.get(name)
    if len(set(names)) != len(names):
        raise ValueError(f"loggers lists a name twice: {list(names)}")
    return list(names)


class Logger:
    """One destination for the epochs' scalars; every hook of the base does nothing.

    Args:
        out_dir: the run's folder (file loggers write under it).
        first_epoch: the first epoch this fit trains (> 1 when resuming: anything recorded for
            that epoch or later belongs to the interrupted fit and is dropped).
        config: the run's settings (hyper-parameters), for loggers that record them.
    """

    def __init__(self, out_dir: Path, *, first_epoch: int = 1, config: Mapping[str, Any]) -> None:
        self.out_dir = Path(out_dir)
        self.first_epoch = first_epoch
        self.config = dict(config)

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        """Record one epoch's scalars (``step``: the epoch)."""

    def close(self) -> None:
        """Flush and release what the logger holds."""


@register_logger("csv")
class CSVLogger(Logger):
    """``metrics.csv``: one row per epoch, one column per scalar (columns added as they appear;
    the file is rewritten atomically each epoch, so it is always complete)."""

    file_name = "metrics.csv"

    def __init__(self, out_dir: Path, *, first_epoch: int = 1, config: Mapping[str, Any]) -> None:
        super().__init__(out_dir, first_epoch=first_epoch, config=config)
        self.path = self.out_dir / self.file_name
        self.rows: list[dict[str, Any]] = []
        if first_epoch > 1 and self.path.is_file():
            with self.path.open(newline="", encoding="utf-8") as fh:
                self.rows = [r for r in csv.DictReader(fh) if int(r["epoch"]) < first_epoch]

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        self.rows.append({"epoch": step, **scalars})
        columns: list[str] = []
        for row in self.rows:
            columns.extend(c for c in row if c not in columns)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)


@register_logger("tensorboard")
class TensorBoardLogger(Logger):
    """TensorBoard event files in ``out_dir/tensorboard`` (``tensorboard --logdir OUT``); the
    hyper-parameters go to the text tab."""

    def __init__(self, out_dir: Path, *, first_epoch: int = 1, config: Mapping[str, Any]) -> None:
        super().__init__(out_dir, first_epoch=first_epoch, config=config)
        require("tensorboard", what="the tensorboard logger")
        from torch.utils.tensorboard import SummaryWriter

        purge = first_epoch if first_epoch > 1 else None
        self.writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=purge)
        if first_epoch == 1:
            lines = "\n".join(f"    {k}: {v!r}" for k, v in self.config.items())
            self.writer.add_text("config", lines, 0)

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@register_logger("wandb")
class WandbLogger(Logger):
    """A Weights & Biases run (``wandb`` must be installed and logged in, or ``WANDB_MODE``
    set); its files go under ``out_dir``, and a resumed fit continues the same W&B run."""

    def __init__(self, out_dir: Path, *, first_epoch: int = 1, config: Mapping[str, Any]) -> None:
        super().__init__(out_dir, first_epoch=first_epoch, config=config)
        try:
            import wandb
        except ModuleNotFoundError as exc:
            raise MissingExtraError(
                "the wandb logger needs wandb, which is not installed: pip install wandb"
            ) from exc
        id_file = self.out_dir / "wandb_id.txt"
        run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else None
        self.run = wandb.init(dir=str(self.out_dir), config=self.config, id=run_id, resume="allow")
        if run_id is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(str(self.run.id), encoding="utf-8")

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        self.run.finish()


def start_loggers(
    names: Sequence[str], out_dir: Path, *, first_epoch: int, config: Mapping[str, Any]
) -> list[Logger]:
    """Build the named loggers for a fit starting at ``first_epoch``."""
    return [
        _LOGGERS.get(name)(out_dir, first_epoch=first_epoch, config=config)
        for name in check_loggers(list(names))
    ]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: history-row prefixes and the logger names they become
_ROW_PREFIXES = {"train_": "train/", "val_": "val/", "lr_": "lr/"}


def epoch_scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The flat numeric view of one history row (see the module docstring for the names)."""
    from miles.scheduler import Decision

    out: dict[str, float] = {}
    for key, value in row.items():
        prefix = next((p for p in _ROW_PREFIXES if key.startswith(p)), None)
        if prefix is not None and _number(value):
            out[_ROW_PREFIXES[prefix] + key.removeprefix(prefix)] = float(value)
    if _number(row.get("selection_score")):
        out["selection_score"] = float(row["selection_score"])
    if _number(row.get("time_s")):
        out["time/epoch_s"] = float(row["time_s"])
    record = row.get("strategy") or {}
    decision = record.get("decision")
    if isinstance(decision, Mapping):
        out.update(Decision.from_dict(decision).scalars("miles/"))
    for key, value in record.items():
        if key != "decision" and _number(value):
            out[f"strategy/{key}"] = float(value)
    return out
