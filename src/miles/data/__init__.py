"""Datasets as named, paired modalities behind one registry.

Importing this package registers the built-in datasets, so ``build_dataset("fsdd-mnist")`` works
right after ``import miles.data``.
"""

from miles.data import fsdd_mnist  # registers "fsdd-mnist"
from miles.data.base import (
    DatasetSplits,
    MissingDataPackageError,
    MultimodalDataset,
    collate_multimodal,
)
from miles.data.registry import available_datasets, build_dataset, register_dataset

__all__ = [
    "DatasetSplits",
    "MissingDataPackageError",
    "MultimodalDataset",
    "available_datasets",
    "build_dataset",
    "collate_multimodal",
    "fsdd_mnist",
    "register_dataset",
]
