"""Fusion modules registered by name (``build_fusion("concat", sizes, num_classes)``).

Importing this package registers the built-in fusions: ``concat`` and ``sum`` (additive: the
fused logits split into one share per modality), ``gated`` (additive given its gates), ``film``
and ``attention`` (learnable, not additive).
"""

from miles.models.fusions.attention import AttentionFusion
from miles.models.fusions.base import (
    Fusion,
    available_fusions,
    build_fusion,
    fusion_class,
    register_fusion,
)
from miles.models.fusions.concat import ConcatFusion
from miles.models.fusions.film import FiLMFusion
from miles.models.fusions.gated import GatedFusion
from miles.models.fusions.sum import SumFusion

__all__ = [
    "AttentionFusion",
    "ConcatFusion",
    "FiLMFusion",
    "Fusion",
    "GatedFusion",
    "SumFusion",
    "available_fusions",
    "build_fusion",
    "fusion_class",
    "register_fusion",
]
