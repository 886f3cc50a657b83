"""What every study config shares: a base experiment, an output folder, a settings check.

A study config is a dataclass holding ``base``, the :class:`ExperimentConfig` every run of the
study starts from (dataset and its parameters, latent size, trainer settings), plus the few fields
the study varies (methods, fusions, seeds, a swept value...). Each run is ``base`` with those
fields replaced, so a budget is written once, in the same shape as a ``miles train`` config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from miles.studies.checks import check_base
from miles.studies.runner import IGNORED_SETTINGS, check_same_settings
from miles.training.experiment import ExperimentConfig
from miles.training.trainer import TrainerConfig

__all__ = ["StudyConfig", "quiet_base"]

C = TypeVar("C", bound="StudyConfig")


def quiet_base(**trainer: Any) -> ExperimentConfig:
    """A base experiment whose trainer draws no progress bars (studies print their own lines)."""
    return ExperimentConfig(trainer=TrainerConfig(**({"progress": False} | trainer)))


@dataclass
class StudyConfig:
    """Base of every study config: ``base`` experiment and ``out_dir``."""

    base: ExperimentConfig = field(default_factory=quiet_base)
    out_dir: str = "study-out"

    #: fields that may differ between invocations sharing ``out_dir`` (they only add runs)
    EXTENDABLE: ClassVar[tuple[str, ...]] = ("out_dir",)

    def __post_init__(self) -> None:
        check_base(self.base)

    def run_config(self, **changes: Any) -> ExperimentConfig:
        """``base`` with ``changes``; trainer fields (``seed``, ``lr``, ``optimizer``, ...) go to
        the trainer."""
        trainer_fields = {f.name for f in dataclasses.fields(TrainerConfig)}
        trainer_changes = {k: changes.pop(k) for k in list(changes) if k in trainer_fields}
        trainer = dataclasses.replace(self.base.trainer, **trainer_changes)
        return dataclasses.replace(self.base, trainer=trainer, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], raw: dict[str, Any]) -> C:
        """Rebuild from :meth:`to_dict` (as stored in the study's JSON)."""
        raw = dict(raw)
        raw["base"] = ExperimentConfig.from_dict(dict(raw["base"]))
        return cls(**raw)

    def check_folder(self, filename: str, what: str) -> None:
        """Refuse an output folder whose study was started under other settings."""
        settings = {k: v for k, v in self.to_dict().items() if k not in self.EXTENDABLE}
        check_same_settings(
            Path(self.out_dir) / filename,
            settings,
            what=what,
            ignore=[f"base.{key}" for key in IGNORED_SETTINGS],
        )
