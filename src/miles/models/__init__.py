"""Joint-fusion models, fusion modules, encoders, parameter groups and losses."""

from miles.models.fusion import FUSIONS, FusionOutput, JointFusionModel
from miles.models.fusions import (
    ConcatFusion,
    Fusion,
    SumFusion,
    available_fusions,
    build_fusion,
    register_fusion,
)
from miles.models.losses import FUSED, head_losses, task_loss
from miles.models.param_groups import modality_param_groups, param_groups_by_modality

__all__ = [
    "FUSED",
    "FUSIONS",
    "ConcatFusion",
    "Fusion",
    "FusionOutput",
    "JointFusionModel",
    "SumFusion",
    "available_fusions",
    "build_fusion",
    "head_losses",
    "modality_param_groups",
    "param_groups_by_modality",
    "register_fusion",
    "task_loss",
]
