"""BasicMotions: smartwatch accelerometer + gyroscope, 4 activities (a tiny sensor-fusion task).

Four students performed four activities wearing a smartwatch; each case is 10 s sampled at 10 Hz
(100 steps) of 3-axis acceleration and 3-axis angular velocity. The UEA archive's files ship
inside ``aeon==1.6.0`` (``aeon/datasets/data/BasicMotions/BasicMotions_{TRAIN,TEST}.ts``) and are
parsed here (:func:`read_ts`) without importing aeon; install with
``pip install --no-deps aeon==1.6.0``.

Modalities: ``accel`` (dimensions 0-2) and ``gyro`` (dimensions 3-5), each a ``(100, 3)`` float32
sequence with a length (all 100), encoded by a :class:`SequenceEncoder`.

Classes: the sorted label names map to indices, ``Badminton 0, Running 1, Standing 2,
Walking 3`` (:data:`CLASSES`).

Split: the official 40 train / 40 test cases (10 per class each); a stratified validation slice
of 2 cases per class (8) is drawn from the official train set by
``numpy.random.default_rng(data_seed)``, so train / val / test = 32 / 8 / 40. The test set never
depends on the seed.

Preprocessing: each of the 6 channels is standardised with the mean/std over all time steps of the
32 training cases only.

It is tiny: meant for smoke tests and quick checks of N-modality code paths, not for ranking
methods (one test case is 2.5 points of accuracy).
"""

from __future__ import annotations

import functools
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
from miles.models.encoders import SequenceEncoder
from miles.validation import check_non_negative_int

__all__ = ["CLASSES", "INSTALL_COMMAND", "build_basicmotions", "load_raw", "make_split", "read_ts"]

NAME = "basicmotions"
PACKAGE = "aeon"
INSTALL_COMMAND = "pip install --no-deps aeon==1.6.0"
CLASSES = ("Badminton", "Running", "Standing", "Walking")
MODALITY_DIMS = {"accel": (0, 1, 2), "gyro": (3, 4, 5)}
SERIES_LENGTH = 100
VAL_PER_CLASS = 2
_FILES = {
    "train": "aeon/datasets/data/BasicMotions/BasicMotions_TRAIN.ts",
    "test": "aeon/datasets/data/BasicMotions/BasicMotions_TEST.ts",
}


def _locate(relative: str) -> Path:
    return locate_package_file(NAME, PACKAGE, relative, INSTALL_COMMAND, lookup=distribution)


def _header_int(header: dict[str, str], key: str, default: int, path: Path) -> int:
    """An integer header value (``@dimensions``, ``@seriesLength``), or ``default`` if absent."""
    if key not in header:
        return default
    try:
        return int(header[key])
    except ValueError:
        raise ValueError(f"{path}: header @{key} must be an integer, got {header[key]!r}") from None


def read_ts(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Parse an equal-length multivariate sktime ``.ts`` file with class labels.

    Lines starting with ``#`` are comments and ``@`` lines are the header up to ``@data``; then each
    case is ``dim0:dim1:...:label`` with every dimension a comma-separated series. ``@dimensions``
    and ``@seriesLength``, when present, are enforced. Timestamps and missing values are not
    supported (BasicMotions has neither).

    Returns:
        ``(values (cases, T, dims) float32, labels)`` with the label strings as written.

    Raises:
        ValueError: no ``@data`` section, no cases, or a malformed case (wrong number of
            dimensions, unequal lengths, a non-number, ``@timeStamps true``); the message names
            the file and the 1-based line.
    """
    path = Path(path)
    header: dict[str, str] = {}
    cases: list[np.ndarray] = []
    labels: list[str] = []
    in_data = False
    with path.open(encoding="utf-8") as handle:
        for lineno, raw in enumerate(handle, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue

            def fail(why: str, at: int = lineno) -> ValueError:
                return ValueError(f"{path}, line {at}: {why}")

            if not in_data:
                if not line.startswith("@"):
                    raise fail(f"expected a '@' header line or '@data', got {line[:40]!r}")
                key, _, value = line[1:].partition(" ")
                key = key.lower()
                if key == "data":
                    in_data = True
                elif key == "timestamps" and value.strip().lower() == "true":
                    raise fail("time-stamped .ts files are not supported")
                else:
                    header[key] = value.strip()
                continue
            parts = line.split(":")
            if len(parts) < 2:
                raise fail("expected 'dim0:...:label' (at least one dimension and a label)")
            *dims, label = parts
            want_dims = _header_int(header, "dimensions", len(dims), path)
            if len(dims) != want_dims or (cases and len(dims) != cases[0].shape[1]):
                raise fail(f"expected {want_dims} dimensions, got {len(dims)}")
            try:
                series = [np.array(d.split(","), dtype=np.float64) for d in dims]
            except ValueError as err:
                raise fail(f"a value is not a number ({err})") from None
            lengths = {len(s) for s in series}
            want_len = _header_int(header, "serieslength", series[0].shape[0], path)
            if lengths != {want_len} or (cases and want_len != cases[0].shape[0]):
                raise fail(f"every dimension must have {want_len} values, got {sorted(lengths)}")
            allowed = header.get("classlabel", "").split()
            if not label.strip() or (allowed[:1] == ["true"] and label.strip() not in allowed[1:]):
                raise fail(f"class label {label.strip()!r} is not one of {allowed[1:]}")
            cases.append(np.stack(series, axis=1))
            labels.append(label.strip())
    if not in_data:
        raise ValueError(f"{path}: no '@data' line")
    if not cases:
        raise ValueError(f"{path}: no cases after '@data'")
    return np.stack(cases).astype(np.float32), labels


@functools.lru_cache(maxsize=8)
def _read_cached(path: str) -> tuple[np.ndarray, np.ndarray]:
    values, names = read_ts(path)
    unknown = sorted(set(names) - set(CLASSES))
    if unknown:
        raise ValueError(f"{path}: unknown class labels {unknown}; expected {list(CLASSES)}")
    if values.shape[1:] != (SERIES_LENGTH, 6):
        raise ValueError(f"{path}: expected (cases, 100, 6) values, got {values.shape}")
    labels = np.array([CLASSES.index(n) for n in names], dtype=np.int64)
    for a in (values, labels):
        a.flags.writeable = False  # shared by every build through the cache
    return values, labels


def load_raw() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train"|"test": (values (40, 100, 6) float32, labels (40,) int64)}``, parsed once.

    Raises:
        MissingDataPackageError: aeon or one of its files is missing; names the install command.
        ValueError: a malformed ``.ts`` file (names the file and line).
    """
    return {split: _read_cached(str(_locate(rel))) for split, rel in _FILES.items()}


def make_split(train_labels: np.ndarray, data_seed: int = 0) -> dict[str, np.ndarray]:
    """Indices into the official train set: ``{"train": ..., "val": ...}``, stratified.

    ``VAL_PER_CLASS`` cases per class go to validation, chosen by a seeded permutation; both parts
    interleave the classes (rank within class, then class).
    """
    rng = np.random.default_rng(data_seed)
    parts: dict[str, list[tuple[int, int, int]]] = {"train": [], "val": []}
    for cls in range(len(CLASSES)):
        members = np.flatnonzero(train_labels == cls)
        if len(members) <= VAL_PER_CLASS:
            raise ValueError(f"class {CLASSES[cls]!r}: only {len(members)} training cases")
        order = members[rng.permutation(len(members))]
        for rank, index in enumerate(order[:VAL_PER_CLASS]):
            parts["val"].append((rank, cls, int(index)))
        for rank, index in enumerate(order[VAL_PER_CLASS:]):
            parts["train"].append((rank, cls, int(index)))
    return {s: np.array([r[2] for r in sorted(rows)], dtype=np.int64) for s, rows in parts.items()}


def _build_encoders(latent_dim: int) -> dict[str, nn.Module]:
    return {m: SequenceEncoder(len(d), latent_dim) for m, d in MODALITY_DIMS.items()}


@register_dataset(NAME)
def build_basicmotions(data_seed: int = 0) -> DatasetSplits:
    """Build the BasicMotions splits (see the module docstring for split and preprocessing).

    Args:
        data_seed: seed of the validation slice carved from the official train set.

    Raises:
        ValueError: a bad ``data_seed`` or a malformed data file.
        MissingDataPackageError: aeon is not installed.
    """
    seed = check_non_negative_int("data_seed", data_seed)
    raw = load_raw()
    train_values, train_labels = raw["train"]
    test_values, test_labels = raw["test"]
    index = make_split(train_labels, seed)

    fit = train_values[index["train"]].reshape(-1, 6).astype(np.float64)
    mean, std = fit.mean(axis=0), fit.std(axis=0)
    std[std == 0] = 1.0

    def make(values: np.ndarray, labels: np.ndarray) -> MultimodalDataset:
        scaled = ((values - mean) / std).astype(np.float32)
        inputs = {
            m: torch.from_numpy(np.ascontiguousarray(scaled[:, :, list(d)]))
            for m, d in MODALITY_DIMS.items()
        }
        return MultimodalDataset(
            inputs, torch.from_numpy(labels.copy()), sequence_modalities=tuple(MODALITY_DIMS)
        )

    splits = {
        "train": make(train_values[index["train"]], train_labels[index["train"]]),
        "val": make(train_values[index["val"]], train_labels[index["val"]]),
        "test": make(test_values, test_labels),
    }
    info: dict[str, Any] = {
        "name": NAME,
        "sizes": {s: len(ds) for s, ds in splits.items()},
        "classes": list(CLASSES),
        "source": {
            "data": "BasicMotions (UEA multivariate time series classification archive), from "
            f"aeon==1.6.0 ({_FILES['train']}, {_FILES['test']})",
            "modalities": {
                "accel": "3-axis accelerometer (dims 0-2)",
                "gyro": "3-axis gyroscope (dims 3-5)",
            },
            "install": INSTALL_COMMAND,
        },
        "license": "no explicit license stated by the UEA archive (cite Bagnall et al. 2018); "
        "redistributed in aeon (BSD-3-Clause)",
        "data_seed": seed,
        "split": "official 40 train / 40 test; 2 train cases per class held out for validation "
        "(seeded): 32 / 8 / 40",
        "preprocessing": "each of the 6 channels standardised with the mean/std over all time "
        "steps of the 32 training cases",
        "notes": "Tiny (one test case = 2.5 accuracy points): for smoke tests, not rankings.",
    }
    return DatasetSplits(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        modalities=tuple(MODALITY_DIMS),
        num_classes=len(CLASSES),
        multilabel=False,
        metric="accuracy",
        info=info,
        build_encoders=_build_encoders,
    )
