"""Fusion modules registered by name (``build_fusion("concat", sizes, num_classes)``).

Importing this package registers the built-in fusions ``concat`` and ``sum``.
"""

from miles.models.fusions.base import (
    Fusion,
    available_fusions,
    build_fusion,
    fusion_class,
    register_fusion,
)
from miles.models.fusions.concat import ConcatFusion
from miles.models.fusions.sum import SumFusion

__all__ = [
    "ConcatFusion",
    "Fusion",
    "SumFusion",
    "available_fusions",
    "build_fusion",
    "fusion_class",
    "register_fusion",
]
