"""Datasets as named, paired modalities behind one registry.

Importing this package registers the built-in datasets, so ``build_dataset("fsdd-mnist")`` works
right after ``import miles.data``, and the preparers of the paper's datasets (``miles prepare``).
Their decoders (soundfile, PyAV, Pillow, transformers) are imported only when used.
"""

from miles.data import (
    basicmotions,
    cremad,
    fsdd_mnist,
    imdb_genres,
    luma,
    mfeat,
    mmimdb,
    regime,
    smnist,
)
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
    "basicmotions",
    "build_dataset",
    "collate_multimodal",
    "cremad",
    "fsdd_mnist",
    "imdb_genres",
    "luma",
    "mfeat",
    "mmimdb",
    "regime",
    "register_dataset",
    "smnist",
]
