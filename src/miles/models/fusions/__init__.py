"""Fusion modules registered by name (``build_fusion("concat", sizes, num_classes)``).

Importing this package registers the built-in fusions ``concat`` and ``sum`` (one linear head
over the fused latents), and the readouts some balancing methods install: ``uncertainty`` (MLA),
``boosted-sum`` (ReconBoost) and ``mmtm`` (Greedy).
"""

from miles.models.fusions.base import (
    Fusion,
    PerModalityFusion,
    available_fusions,
    build_fusion,
    fusion_class,
    register_fusion,
)
from miles.models.fusions.boosted_sum import BoostedSumFusion
from miles.models.fusions.concat import ConcatFusion
from miles.models.fusions.mmtm import MMTMFusion
from miles.models.fusions.shared_head import SharedHeadFusion
from miles.models.fusions.sum import SumFusion
from miles.models.fusions.uncertainty import UncertaintyFusion, entropy_weights

__all__ = [
    "BoostedSumFusion",
    "ConcatFusion",
    "Fusion",
    "MMTMFusion",
    "PerModalityFusion",
    "SharedHeadFusion",
    "SumFusion",
    "UncertaintyFusion",
    "available_fusions",
    "build_fusion",
    "entropy_weights",
    "fusion_class",
    "register_fusion",
]
