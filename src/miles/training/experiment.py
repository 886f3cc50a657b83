"""One experiment from a declarative config: dataset x fusion x strategy x seed -> ``RunResult``.

This is what ``miles train --config`` and ``miles demo`` run, so a YAML file and the Python API
describe exactly the same thing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from miles.models.fusion import JointFusionModel
from miles.models.fusions import available_fusions
from miles.strategies.registry import build_strategy
from miles.training.distributed import is_main_process
from miles.training.trainer import RunResult, Trainer, TrainerConfig
from miles.validation import check_choice, check_mapping, check_positive_int, check_str


@dataclass
class ExperimentConfig:
    """A registered dataset, a fusion, a registered strategy and the trainer settings."""

    dataset: str = "fsdd-mnist"
    dataset_params: dict[str, Any] = field(default_factory=dict)
    fusion: str = "concat"
    latent_dim: int = 64
    strategy: str = "miles"
    strategy_params: dict[str, Any] = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    out_dir: str | None = None

    def __post_init__(self) -> None:
        check_str("dataset", self.dataset)
        check_str("strategy", self.strategy)
        for name in ("dataset_params", "strategy_params"):  # keyword arguments, by name
            check_mapping(name, getattr(self, name), lambda _k, v: v, allow_empty=True)
        check_choice("fusion", self.fusion, available_fusions())
        check_positive_int("latent_dim", self.latent_dim)
        if isinstance(self.out_dir, os.PathLike):
            self.out_dir = os.fspath(self.out_dir)  # to_dict() stays JSON
        if self.out_dir is not None:
            check_str("out_dir", self.out_dir)
        if isinstance(self.trainer, dict):
            self.trainer = TrainerConfig(**self.trainer)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ExperimentConfig:
        """Build from a parsed YAML/JSON mapping; unknown keys are an error, not ignored."""
        if not isinstance(raw, dict):
            raise TypeError(f"config must be a mapping, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; expected some of {sorted(known)}")
        trainer_raw = raw.get("trainer", {})
        if not isinstance(trainer_raw, dict):
            raise TypeError("config key 'trainer' must be a mapping")
        trainer_known = {f.name for f in fields(TrainerConfig)}
        bad = sorted(set(trainer_raw) - trainer_known)
        if bad:
            raise ValueError(
                f"unknown trainer keys {bad}; expected some of {sorted(trainer_known)}"
            )
        return cls(**{**raw, "trainer": TrainerConfig(**trainer_raw)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_readouts(model: JointFusionModel, data: Any, config: ExperimentConfig) -> dict[str, Any]:
    """The readouts every method reports (:func:`miles.readouts.readouts`): a linear probe per
    modality on the frozen encoders and the fused-head slice, at the chosen epoch (the weights
    ``Trainer.fit`` leaves in the model), scored on the test split (validation without one).

    It reads nothing of the strategy: identical encoders give identical readouts.
    """
    from miles.data import collate_multimodal
    from miles.readouts import readouts

    test, split = (data.test, "test") if data.test is not None else (data.val, "val")
    return readouts(
        model,
        data.train,
        test,
        metric=data.metric,
        multilabel=data.multilabel,
        seed=config.trainer.seed,
        collate_fn=collate_multimodal,
        device=config.trainer.device,
        batch_size=config.trainer.eval_batch_size,
        split=split,
    )


def run_experiment(
    config: ExperimentConfig,
    *,
    data: Any = None,
    resume: bool = False,
    overwrite: bool = False,
    force: bool = False,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Build dataset (unless ``data`` is given), model and strategy from ``config`` and train.

    The model is initialised right after ``torch.manual_seed(seed)``, so every strategy with the
    same seed starts from the same weights. After training, :func:`run_readouts` measures the
    probe and slice readouts at the chosen epoch (``result.extra["readouts"]``). ``on_epoch_end``
    is passed to the :class:`~miles.training.trainer.Trainer` (called with each epoch's history
    row).

    With ``config.out_dir``, the run folder is locked and checked against ``config`` *before*
    anything is built (``resume``, ``overwrite`` and ``force`` as in
    :meth:`~miles.training.trainer.Trainer.fit`), so resuming under another strategy, learning
    rate or seed says so, naming the settings that differ.
    """
    if config.out_dir is None:
        if resume or overwrite:
            raise ValueError("resume=True and overwrite=True need config.out_dir")
        return _run(config, data, on_epoch_end)
    from miles.training.run_folder import RunFolder

    folder = RunFolder(config.out_dir)
    if not is_main_process():  # rank 0 of a distributed run checks and locks the folder
        return _run(config, data, on_epoch_end, resume=resume)
    with folder.lock():
        folder.open(config.to_dict(), resume=resume, overwrite=overwrite, force=force)
        return _run(config, data, on_epoch_end, resume=resume)


def _run(
    config: ExperimentConfig,
    data: Any,
    on_epoch_end: Callable[[dict[str, Any]], None] | None,
    *,
    resume: bool = False,
) -> RunResult:
    """Build and train (the run folder, if any, is locked and checked)."""
    from miles.data import build_dataset, collate_multimodal

    if data is None:
        data = build_dataset(config.dataset, **config.dataset_params)
    strategy = build_strategy(config.strategy, **config.strategy_params)
    torch.manual_seed(config.trainer.seed)
    model = JointFusionModel(
        data.build_encoders(config.latent_dim), data.num_classes, config.fusion
    )
    trainer = Trainer(
        model,
        strategy,
        config.trainer,
        metric=data.metric,
        multilabel=data.multilabel,
        out_dir=config.out_dir,
        collate_fn=collate_multimodal,
        on_epoch_end=on_epoch_end,
        settings=config.to_dict(),
    )
    result = trainer.fit(data.train, data.val, data.test, resume=resume)
    result.extra.update(
        {"dataset": config.dataset, "fusion": config.fusion, "modalities": list(data.modalities)}
    )
    result.extra["readouts"] = run_readouts(model, data, config)
    if config.out_dir is not None and is_main_process():  # under torchrun: rank 0 writes
        from miles.fileio import write_json

        write_json(Path(config.out_dir) / "result.json", result.to_dict())
        write_json(Path(config.out_dir) / "config.json", config.to_dict())
    return result
