"""The training loop, checkpoints and history files."""

from miles.training.trainer import RunResult, Trainer, TrainerConfig

__all__ = ["RunResult", "Trainer", "TrainerConfig"]
