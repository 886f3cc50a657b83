"""Joint-fusion models, encoders, parameter groups and losses."""

from miles.models.fusion import FUSIONS, FusionOutput, JointFusionModel
from miles.models.losses import FUSED, head_losses, task_loss
from miles.models.param_groups import modality_param_groups, param_groups_by_modality

__all__ = [
    "FUSED",
    "FUSIONS",
    "FusionOutput",
    "JointFusionModel",
    "head_losses",
    "modality_param_groups",
    "param_groups_by_modality",
    "task_loss",
]
