"""miles: balanced multimodal learning around MILES, the Modality-Informed Learning ratE Scheduler.

``import miles`` needs torch alone: the scheduler, its functional twins and the models load eagerly;
the trainer, metrics and datasets (torchmetrics, numpy, tqdm) load on first use. The Lightning and
Hugging Face callbacks live in :mod:`miles.integrations` and are imported from there.

Reference: A. Guerra-Manzanares and F. E. Shamout, "MILES: Modality-Informed Learning Rate
Scheduler for Balancing Multimodal Learning", arXiv 2510.17394, 2025.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

with warnings.catch_warnings():
    # torch warns when it is imported without NumPy, which the core install (torch alone) lacks
    # and nothing imported here needs: `miles` there says one line (which extra to install)
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch  # noqa: F401

from miles._lazy import lazy_attributes
from miles.models import (
    FusionOutput,
    JointFusionModel,
    head_losses,
    modality_param_groups,
    param_groups_by_modality,
)
from miles.models.adapters import HFEncoder
from miles.models.param_groups import param_groups_by_prefix, split_weight_decay
from miles.scheduler import MILES, Decision, check_composable
from miles.utilization import conditional_utilization, decide, imbalance

__version__ = "0.1.0"

_LAZY = {
    "HeadMetrics": "miles.metrics",
    "HeadScores": "miles.metrics",
    "ablated_fused_scores": "miles.metrics",
    "Trainer": "miles.training.trainer",
    "TrainerConfig": "miles.training.trainer",
    "RunResult": "miles.results",
    "ExperimentConfig": "miles.training.experiment",
    "run_experiment": "miles.training.experiment",
    "Strategy": "miles.strategies",
    "build_strategy": "miles.strategies",
    "register_strategy": "miles.strategies",
    "build_dataset": "miles.data",
}

if TYPE_CHECKING:
    from miles.data import build_dataset
    from miles.metrics import HeadMetrics, HeadScores, ablated_fused_scores
    from miles.results import RunResult
    from miles.strategies import Strategy, build_strategy, register_strategy
    from miles.training.experiment import ExperimentConfig, run_experiment
    from miles.training.trainer import Trainer, TrainerConfig


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "MILES",
    "Decision",
    "ExperimentConfig",
    "FusionOutput",
    "HFEncoder",
    "HeadMetrics",
    "HeadScores",
    "JointFusionModel",
    "RunResult",
    "Strategy",
    "Trainer",
    "TrainerConfig",
    "ablated_fused_scores",
    "build_dataset",
    "build_strategy",
    "check_composable",
    "conditional_utilization",
    "decide",
    "head_losses",
    "imbalance",
    "modality_param_groups",
    "param_groups_by_modality",
    "param_groups_by_prefix",
    "register_strategy",
    "run_experiment",
    "split_weight_decay",
]
