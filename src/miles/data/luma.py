"""LUMA (Bezirganyan et al. 2024): CIFAR-10/100 images paired with spoken class names.

The paper's LUMA setup (audio dominant, image weak) uses 22 classes x 1,500 image + audio pairs
(33,000), split 25,000 / 4,000 / 4,000, with a 96-band log-mel spectrogram (1 x 96 x 96) and the
image upsampled to 3 x 96 x 96. This module turns the LUMA release into that cache with
``miles prepare luma --raw DATA --out CACHE`` and reads it back with ``build_dataset("luma",
root=CACHE)``.

The kept class names are stored in the manifest (``extra.classes``) for :func:`build_luma`.

Supported raw layout: the ``data/`` folder of the LUMA tool (github.com/bezirganyan/LUMA) after
``git clone https://huggingface.co/datasets/bezirganyan/LUMA data`` plus the CIFAR python archives
the tool unpacks next to it::

    DATA/audio/datalist.csv            columns path,label[,tts_label]; path relative to DATA/audio
    DATA/audio/<corpus>/<word>/*.wav   the clips the CSV names (any sub-folders)
    DATA/cifar-10-batches-py/          data_batch_1..5, test_batch, batches.meta
    DATA/cifar-100-python/             train, test, meta
    DATA/edm_images.pickle             generated CIFAR-100-like images, a pandas DataFrame
                                       ('image', 'label'); only for image_parts "synthetic"

Class names follow the LUMA tool: CIFAR's ``aquarium_fish, pickup_truck, oak_tree, rose,
pine_tree, palm_tree`` become ``fish, truck, oak, roses, pine, palm`` and only LUMA's 50 classes are
kept. An audio label outside those 50 is an error naming ``datalist.csv`` and the line.

Selection (the paper's "22 classes with >= 1,500 samples, 1,500 each"; its counting rule is not
stated): a class counts as many samples as it can form *distinct* pairs, ``min(#images,
#clips)``; classes with at least ``min_per_class`` are kept and ``per_class`` images and clips are
drawn per class with ``numpy.random.default_rng([seed, class_id])``, then paired in draw order. No
clip is used twice, so the split is clip-disjoint. With ``reuse_audio=True`` a class needs only
``min_per_class`` images (and one clip); its clips are cycled through a seeded permutation, and the
split keeps each clip's pairs in one part wherever the quotas allow (a clip is split only to meet
the exact sizes). The LUMA release defines no image-audio pairs for this raw data (its compiled
benchmark pairs rows at random within a class), so we pair by class ourselves.

Split: stratified by class with exact totals (``split_sizes``, counts or fractions, the totals by
the shared ``resolve_split_counts``: val/test rounded half up, train the rest); per-class
quotas are proportional, the remainders assigned in a seeded class order.

Preprocessing (recorded in the manifest as options): audio read with soundfile (mono), resampled
to ``sample_rate`` (16 kHz), then ``audio_fit="pad"`` (default) pads with silence / centre-crops
the waveform to ``(n_frames - 1) * hop`` samples so a centred STFT (``n_fft`` 512, 25 ms window,
10 ms hop) gives exactly ``n_frames`` frames, or ``"resize"`` takes the whole clip's spectrogram
and resizes it bilinearly to ``n_frames``; ``log(mel power + 1e-6)`` with ``n_mels`` Slaney mel
filters (natural log, no normalisation). Images: 32 x 32 bilinearly upsampled to ``image_size``,
stored as uint8 (``image_dtype="float32"`` stores [0, 1] floats, 4x the disk); the encoder
wrapper converts uint8 to float in [0, 1].

Unverified (no copy of the data here): the exact column set and path prefix of ``datalist.csv``
(we read ``path`` relative to ``audio/``, falling back to ``DATA/``), the label column of
``edm_images.pickle`` (names, or CIFAR-100 fine-label indices) and its image layout (HWC or CHW
accepted), and which images and counting rule the MILES authors used.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import pickle
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from miles.data.audio import fit_length, log_mel_spectrogram, read_audio, resample, resize_2d
from miles.data.base import DatasetSplits, MissingDataPackageError
from miles.data.prepare import (
    MANIFEST,
    SPLIT_NAMES,
    ArraySpec,
    Preparer,
    RawDataError,
    RawItem,
    register_preparer,
    resolve_split_counts,
)
from miles.data.prepared import prepared_splits
from miles.data.registry import register_dataset
from miles.models.resnet import resnet6
from miles.models.wrappers import ProjectedEncoder
from miles.validation import check_bool, check_choice, check_int, check_positive_int

__all__ = [
    "AUDIO_CSV",
    "CIFAR10_DIR",
    "CIFAR100_DIR",
    "EDM_FILE",
    "IMAGE_PARTS",
    "LUMA_CLASSES",
    "LumaPreparer",
    "audio_features",
    "build_encoders",
    "build_luma",
    "expected_files",
    "resolve_split_sizes",
    "stratified_split",
]

NAME = "luma"
#: LUMA's 50 classes in the LUMA tool's class-id order; kept classes are relabelled 0..K-1 in it.
LUMA_CLASSES: tuple[str, ...] = (
    *("man", "boy", "house", "woman", "girl", "table", "road", "horse", "dog", "ship"),
    *("bird", "mountain", "bed", "train", "bridge", "fish", "cloud", "chair", "cat", "baby"),
    *("castle", "forest", "television", "bear", "camel", "sea", "fox", "plain", "bus", "snake"),
    *("lamp", "clock", "lion", "tank", "palm", "rabbit", "pine", "cattle", "oak", "mouse"),
    *("frog", "ray", "bicycle", "truck", "elephant", "roses", "wolf", "telephone", "bee", "whale"),
)
_CLASS_ID = {name: i for i, name in enumerate(LUMA_CLASSES)}
#: CIFAR names the LUMA tool renames.
CIFAR_RENAME = {
    "aquarium_fish": "fish",
    "pickup_truck": "truck",
    "oak_tree": "oak",
    "rose": "roses",
    "pine_tree": "pine",
    "palm_tree": "palm",
}
AUDIO_CSV = "audio/datalist.csv"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
EDM_FILE = "edm_images.pickle"
IMAGE_PARTS = ("train", "test", "synthetic")
AUDIO_FITS = ("pad", "resize")
IMAGE_DTYPES = ("uint8", "float32")
LOG_EPS = 1e-6


def expected_files(image_parts: Sequence[str] = IMAGE_PARTS) -> list[str]:
    """Paths (relative to the raw folder) the supported layout needs for ``image_parts``."""
    files = [AUDIO_CSV, f"{CIFAR10_DIR}/batches.meta", f"{CIFAR100_DIR}/meta"]
    if "train" in image_parts:
        files += [f"{CIFAR10_DIR}/data_batch_{i}" for i in range(1, 6)]
        files.append(f"{CIFAR100_DIR}/train")
    if "test" in image_parts:
        files += [f"{CIFAR10_DIR}/test_batch", f"{CIFAR100_DIR}/test"]
    if "synthetic" in image_parts:
        files.append(EDM_FILE)
    return files


# --------------------------------------------------------------------------- raw readers


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's python archives without running arbitrary code: numpy arrays only."""

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core") :]  # numpy 2 name, no warning
        return super().find_class(module, name)


def _key(d: Mapping[Any, Any], name: str) -> Any:
    """``d[name]`` for archives pickled by Python 2 (bytes keys) or 3 (str keys)."""
    if name in d:
        return d[name]
    if name.encode() in d:
        return d[name.encode()]
    raise KeyError(name)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _load_archive(path: Path) -> dict[Any, Any]:
    if not path.is_file():
        raise RawDataError(path, "missing")
    try:
        with path.open("rb") as fh:
            obj = _ArrayUnpickler(io.BytesIO(fh.read()), encoding="bytes").load()
    except Exception as exc:  # truncated, corrupt, or not a CIFAR archive
        raise RawDataError(path, f"unreadable CIFAR archive ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise RawDataError(path, f"expected a pickled dict, found {type(obj).__name__}")
    return obj


def _label_names(path: Path, field: str) -> list[str]:
    try:
        names = [_text(n) for n in _key(_load_archive(path), field)]
    except KeyError:
        raise RawDataError(path, f"no {field!r} entry") from None
    return [CIFAR_RENAME.get(n, n) for n in names]


def _cifar_batch(path_str: str, label_field: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 3, 32, 32) uint8, labels (N,) int64) of one CIFAR python batch file."""
    path = Path(path_str)
    batch = _load_archive(path)
    try:
        data = np.asarray(_key(batch, "data"))
        labels = np.asarray(_key(batch, label_field), dtype=np.int64)
    except (KeyError, ValueError, TypeError) as exc:
        raise RawDataError(path, f"no usable 'data' / {label_field!r} entries ({exc})") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise RawDataError(path, f"'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise RawDataError(path, f"{data.shape[0]} images but {labels.size} labels")
    return data.reshape(-1, 3, 32, 32), labels  # CIFAR rows are R, G, B planes: already CHW


def _read_edm(path: Path) -> tuple[np.ndarray, list[Any]]:
    """(images, labels) of LUMA's ``edm_images.pickle`` (a pandas DataFrame; needs pandas)."""
    try:
        import pandas as pd
    except ImportError:
        raise MissingDataPackageError(
            f"{path} is a pandas DataFrame pickle: install pandas to read it, or prepare without "
            "the generated images (--option image_parts=[train,test])",
            name="pandas",
        ) from None
    try:
        frame = pd.read_pickle(path)
        images = np.stack([np.asarray(im) for im in frame["image"]])
        labels = list(frame["label"])
    except Exception as exc:
        raise RawDataError(path, f"unreadable generated-image table ({exc})") from exc
    return images, labels


def _edm_images(path_str: str, cifar100_names: tuple[str, ...]) -> tuple[np.ndarray, list[str]]:
    """EDM images as (N, 3, 32, 32) uint8 and their LUMA class names."""
    path = Path(path_str)
    images, raw_labels = _read_edm(path)
    if images.ndim == 4 and images.shape[-1] == 3 and images.shape[1] != 3:
        images = images.transpose(0, 3, 1, 2)
    if images.shape[1:] != (3, 32, 32) or len(raw_labels) != images.shape[0]:
        raise RawDataError(path, f"expected 32x32 RGB images with labels, got {images.shape}")
    names = []
    for label in raw_labels:
        if isinstance(label, (int, np.integer)):
            if not 0 <= int(label) < len(cifar100_names):
                raise RawDataError(path, f"label index {label} outside CIFAR-100's 100 classes")
            names.append(cifar100_names[int(label)])
        else:
            text = _text(label)
            names.append(CIFAR_RENAME.get(text, text))
    return np.ascontiguousarray(images, dtype=np.uint8), names


def _read_datalist(path: Path) -> list[tuple[str, str, int]]:
    """(audio path, class name, CSV line) rows of ``datalist.csv``; unknown class -> error."""
    if not path.is_file():
        raise RawDataError(path, "missing")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise RawDataError(path, f"unreadable ({exc})") from exc
    reader = csv.DictReader(io.StringIO(text))
    fields = reader.fieldnames or []
    if "path" not in fields or "label" not in fields:
        raise RawDataError(path, f"needs 'path' and 'label' columns, found {fields}")
    rows = []
    for row in reader:
        line = reader.line_num
        clip, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not clip:
            raise RawDataError(path, f"line {line}: empty 'path'")
        if label not in _CLASS_ID:
            raise RawDataError(path, f"line {line}: unknown class name {label!r} (not in LUMA)")
        rows.append((clip, label, line))
    return rows


# --------------------------------------------------------------------------- features


def audio_features(
    wave: np.ndarray,
    sr: int,
    *,
    sample_rate: int = 16000,
    n_mels: int = 96,
    n_frames: int = 96,
    n_fft: int = 512,
    win_length: int = 400,
    hop: int = 160,
    audio_fit: str = "pad",
) -> np.ndarray:
    """Log-mel spectrogram ``(1, n_mels, n_frames)`` float32 of a mono clip (see module doc)."""
    x = resample(wave, sr, sample_rate)
    if audio_fit == "pad":
        x = fit_length(x, (n_frames - 1) * hop, "pad", crop="center")
    elif audio_fit == "resize":
        if len(x) < n_fft:
            x = fit_length(x, n_fft, "pad")
    else:
        raise ValueError(f"audio_fit must be one of {AUDIO_FITS}, got {audio_fit!r}")
    spec = log_mel_spectrogram(
        x, sample_rate, n_mels, n_fft, hop, win_length, center=True, eps=LOG_EPS
    )
    if spec.shape[1] != n_frames:
        spec = resize_2d(spec, (n_mels, n_frames))
    return spec[None].astype(np.float32, copy=False)


# --------------------------------------------------------------------------- split


def _check_split_sizes(sizes: Sequence[float]) -> list[float]:
    """Three non-negative numbers: int counts, or fractions summing to 1 (JSON-able)."""
    values = list(sizes) if not isinstance(sizes, (str, bytes)) else []
    if len(values) != 3 or any(
        isinstance(s, bool) or not isinstance(s, (int, float)) or s < 0 for s in values
    ):
        raise ValueError(f"split_sizes must be three non-negative numbers, got {sizes!r}")
    out: list[float] = [int(s) if float(s).is_integer() else float(s) for s in values]
    if all(isinstance(s, int) for s in out) and sum(out) > 1:
        return out  # counts: checked against the selection in scan
    fractions = [float(s) for s in values]
    resolve_split_counts(fractions, 1000)  # raises for fractions not summing to 1
    return fractions


def resolve_split_sizes(sizes: Sequence[float], n: int) -> dict[str, int]:
    """Train/val/test counts by :func:`miles.data.prepare.resolve_split_counts` (half up)."""
    sizes = _check_split_sizes(sizes)
    try:
        counts = resolve_split_counts(sizes, n)
    except ValueError as exc:
        raise ValueError(f"{exc} ({n} pairs were selected: kept classes x per_class)") from None
    return dict(zip(SPLIT_NAMES, counts, strict=True))


def stratified_split(
    labels: Sequence[int], groups: Sequence[str], sizes: Sequence[float], seed: int
) -> dict[str, list[int]]:
    """Exact-size split, stratified by label, keeping each group in one part where possible.

    Per class, val/test quotas are ``size * n_class / n`` rounded down, the leftovers given by
    largest remainder (ties in a seeded class order, preferring for test the classes that got no
    val extra); train takes the rest. Within a class, groups in a seeded order go whole to the
    first part with room; items of groups that fit nowhere fill the remaining quotas one by one.
    """
    labels_arr = np.asarray(labels, dtype=np.int64)
    n = len(labels_arr)
    if len(groups) != n:
        raise ValueError("labels and groups must have the same length")
    counts = resolve_split_sizes(sizes, n)
    classes = sorted(set(labels_arr.tolist()))
    n_c = {c: int((labels_arr == c).sum()) for c in classes}
    perm = np.random.default_rng(seed).permutation(len(classes)).tolist()
    rank = {c: int(r) for c, r in zip(classes, perm, strict=True)}
    quota: dict[str, dict[int, int]] = {}
    extra_val: set[int] = set()
    used = dict.fromkeys(classes, 0)
    for part in ("val", "test"):
        exact = {c: counts[part] * n_c[c] / n if n else 0.0 for c in classes}
        q = {c: math.floor(exact[c]) for c in classes}
        left = counts[part] - sum(q.values())
        order = sorted(
            classes,
            key=lambda c: (-(exact[c] - q[c]), part == "test" and c in extra_val, rank[c]),
        )
        while left > 0:
            progressed = False
            for c in order:
                if left and used[c] + q[c] < n_c[c]:
                    q[c] += 1
                    left -= 1
                    progressed = True
                    if part == "val":
                        extra_val.add(c)
            if not progressed:  # cannot happen when the counts sum to n
                raise ValueError(f"cannot place {counts[part]} samples in {part}")
        for c in classes:
            used[c] += q[c]
        quota[part] = q
    quota["train"] = {c: n_c[c] - used[c] for c in classes}

    out: dict[str, list[int]] = {part: [] for part in SPLIT_NAMES}
    for c in classes:
        members = np.flatnonzero(labels_arr == c).tolist()
        by_group: dict[str, list[int]] = defaultdict(list)
        for i in members:
            by_group[groups[i]].append(i)
        names = sorted(by_group)
        rng = np.random.default_rng([seed, c])
        room = {part: quota[part][c] for part in ("val", "test", "train")}
        leftovers: list[int] = []
        for g in rng.permutation(len(names)).tolist():
            idx = by_group[names[g]]
            for part in ("val", "test", "train"):
                if len(idx) <= room[part]:
                    out[part].extend(idx)
                    room[part] -= len(idx)
                    break
            else:
                leftovers.extend(idx)
        for i in leftovers:
            part = next(p for p in ("val", "test", "train") if room[p] > 0)
            out[part].append(i)
            room[part] -= 1
    return {part: sorted(idx) for part, idx in out.items()}


# --------------------------------------------------------------------------- preparer


@register_preparer(NAME)
class LumaPreparer(Preparer):
    """LUMA raw release -> balanced, paired, split cache (see the module docstring).

    Args:
        per_class: pairs drawn per kept class (paper: 1,500).
        min_per_class: a class is kept when it can form this many distinct pairs (paper: 1,500);
            must be >= ``per_class`` so every kept class is balanced.
        split_sizes: train/val/test as counts summing to ``kept classes x per_class`` (paper:
            25,000 / 4,000 / 4,000) or fractions summing to 1.
        seed: seed of the class balancing, pairing and split.
        image_parts: image pools to draw from: CIFAR ``"train"``, ``"test"``, ``"synthetic"``
            (LUMA's EDM-generated images). All three by default: without the generated images a
            CIFAR-100 class has only 600 images, so only 7 classes could reach 1,500.
        reuse_audio: keep classes with enough images but fewer clips, cycling their clips.
        sample_rate, n_mels, n_frames, n_fft, win_length, hop, audio_fit: audio features.
        image_size: side of the upsampled square image (paper: 96).
        image_dtype: ``"uint8"`` (default, 0..255) or ``"float32"`` ([0, 1]).
    """

    def __init__(
        self,
        per_class: int = 1500,
        min_per_class: int = 1500,
        split_sizes: Sequence[float] = (25000, 4000, 4000),
        seed: int = 0,
        image_parts: Sequence[str] = IMAGE_PARTS,
        reuse_audio: bool = False,
        sample_rate: int = 16000,
        n_mels: int = 96,
        n_frames: int = 96,
        n_fft: int = 512,
        win_length: int = 400,
        hop: int = 160,
        audio_fit: str = "pad",
        image_size: int = 96,
        image_dtype: str = "uint8",
    ) -> None:
        self.per_class = check_positive_int("per_class", per_class)
        self.min_per_class = check_positive_int("min_per_class", min_per_class)
        if self.min_per_class < self.per_class:
            raise ValueError(
                f"min_per_class ({min_per_class}) must be >= per_class ({per_class}) so that "
                "every kept class has per_class pairs"
            )
        self.split_sizes = _check_split_sizes(split_sizes)
        self.seed = check_int("seed", seed)
        parts = [str(p) for p in image_parts]
        if not parts or any(p not in IMAGE_PARTS for p in parts) or len(set(parts)) != len(parts):
            raise ValueError(f"image_parts must be distinct values of {IMAGE_PARTS}, got {parts}")
        self.image_parts = [p for p in IMAGE_PARTS if p in parts]
        self.reuse_audio = check_bool("reuse_audio", reuse_audio)
        self.sample_rate = check_positive_int("sample_rate", sample_rate)
        self.n_mels = check_positive_int("n_mels", n_mels)
        self.n_frames = check_positive_int("n_frames", n_frames)
        self.n_fft = check_positive_int("n_fft", n_fft)
        self.win_length = check_positive_int("win_length", win_length)
        self.hop = check_positive_int("hop", hop)
        if self.win_length > self.n_fft:
            raise ValueError(f"win_length ({win_length}) must be <= n_fft ({n_fft})")
        self.audio_fit = check_choice("audio_fit", audio_fit, AUDIO_FITS)
        self.image_size = check_positive_int("image_size", image_size)
        self.image_dtype = check_choice("image_dtype", image_dtype, IMAGE_DTYPES)
        self._cifar100_names: tuple[str, ...] = ()
        self.classes: list[str] = []  #: kept class names, in label order (after scan)
        # decoded CIFAR / generated-image files, per preparer (freed with it, unlike a
        # process-wide cache) and keyed by size and mtime so a changed file is read again
        self._raw_cache: dict[tuple[Any, ...], Any] = {}

    def _raw(self, reader: Any, path: Path, arg: Any) -> Any:
        """``reader(str(path), arg)``, decoded once per file version for this preparer."""
        try:
            stat = path.stat()
        except OSError:
            return reader(str(path), arg)  # the reader names the missing file
        key = (reader.__name__, str(path), arg)
        version = (stat.st_size, stat.st_mtime_ns)
        cached = self._raw_cache.get(key)
        if cached is None or cached[0] != version:
            self._raw_cache[key] = (version, reader(str(path), arg))
        return self._raw_cache[key][1]

    def manifest_extra(self, items: Sequence[RawItem]) -> dict[str, Any]:
        """The kept class names in label order, read back by :func:`build_luma`."""
        return {"classes": list(self.classes)}

    def options(self) -> dict[str, Any]:
        return {
            "per_class": self.per_class,
            "min_per_class": self.min_per_class,
            "split_sizes": list(self.split_sizes),
            "seed": self.seed,
            "image_parts": list(self.image_parts),
            "reuse_audio": self.reuse_audio,
            "sample_rate": self.sample_rate,
            "n_mels": self.n_mels,
            "n_frames": self.n_frames,
            "n_fft": self.n_fft,
            "win_length": self.win_length,
            "hop": self.hop,
            "audio_fit": self.audio_fit,
            "log_eps": LOG_EPS,
            "image_size": self.image_size,
            "image_dtype": self.image_dtype,
            "image_resize": "bilinear",
        }

    def specs(self) -> dict[str, ArraySpec]:
        side = self.image_size
        return {
            "audio": ArraySpec((1, self.n_mels, self.n_frames), "float32"),
            "image": ArraySpec((3, side, side), self.image_dtype),
        }

    def label_spec(self) -> ArraySpec:
        return ArraySpec((), "int64")

    # -- scan

    def _image_pool(self, raw: Path) -> dict[str, list[tuple[str, str, int]]]:
        """Per LUMA class, its images as (source file, label field, index), in a fixed order."""
        names10 = _label_names(raw / CIFAR10_DIR / "batches.meta", "label_names")
        names100 = _label_names(raw / CIFAR100_DIR / "meta", "fine_label_names")
        self._cifar100_names = tuple(names100)
        sources: list[tuple[Path, str, list[str]]] = []
        if "train" in self.image_parts:
            for i in range(1, 6):
                sources.append((raw / CIFAR10_DIR / f"data_batch_{i}", "labels", names10))
            sources += [(raw / CIFAR100_DIR / "train", "fine_labels", names100)]
        if "test" in self.image_parts:
            sources += [(raw / CIFAR10_DIR / "test_batch", "labels", names10)]
            sources += [(raw / CIFAR100_DIR / "test", "fine_labels", names100)]
        pool: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
        for path, field, names in sources:
            _, labels = self._raw(_cifar_batch, path, field)
            if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
                raise RawDataError(path, f"label index outside 0..{len(names) - 1}")
            for j, lab in enumerate(labels.tolist()):
                name = names[lab]
                if name in _CLASS_ID:
                    pool[name].append((str(path), field, j))
        if "synthetic" in self.image_parts:
            path = raw / EDM_FILE
            _, edm_names = self._raw(_edm_images, path, self._cifar100_names)
            for j, name in enumerate(edm_names):
                if name in _CLASS_ID:
                    pool[name].append((str(path), "edm", j))
        return pool

    def scan(self, raw: Path) -> list[RawItem]:
        raw = Path(raw)
        wanted = expected_files(self.image_parts)
        missing = [f for f in wanted if not (raw / f).is_file()]
        if missing:
            raise RawDataError(
                raw / missing[0],
                f"missing; the LUMA layout needs {len(wanted)} files under {raw}: "
                + ", ".join(wanted)
                + f" (missing: {', '.join(missing)}); see docs/datasets/luma.md",
            )
        audio_dir = raw / "audio"
        clips: dict[str, list[str]] = defaultdict(list)
        for clip, word, _ in _read_datalist(raw / AUDIO_CSV):
            clips[word].append(clip)
        pool = self._image_pool(raw)

        def count(name: str) -> int:
            n_img, n_aud = len(pool.get(name, [])), len(clips.get(name, []))
            if self.reuse_audio:
                return n_img if n_aud else 0
            return min(n_img, n_aud)

        self.classes = [c for c in LUMA_CLASSES if count(c) >= self.min_per_class]
        if not self.classes:
            raise RawDataError(
                raw,
                f"no class has >= {self.min_per_class} image-audio pairs "
                f"(image_parts={self.image_parts}, reuse_audio={self.reuse_audio})",
            )
        total = len(self.classes) * self.per_class
        resolve_split_sizes(self.split_sizes, total)  # fail before any decoding
        items: list[RawItem] = []
        for label, name in enumerate(self.classes):
            rng = np.random.default_rng([self.seed, _CLASS_ID[name]])
            images = pool[name]
            chosen_img = rng.permutation(len(images))[: self.per_class]
            order = rng.permutation(len(clips[name]))
            if len(order) < self.per_class:  # only with reuse_audio
                order = np.resize(order, self.per_class)
            for k in range(self.per_class):
                src, field, j = images[int(chosen_img[k])]
                clip = clips[name][int(order[k])]
                wav = audio_dir / clip
                if not wav.is_file() and (raw / clip).is_file():
                    wav = raw / clip
                items.append(
                    RawItem(
                        key=f"{name}_{k:05d}",
                        label=label,
                        files={"audio": wav, "image": Path(src)},
                        group=clip,
                        meta={"image_field": field, "image_index": j},
                    )
                )
        return items

    # -- process

    def _image(self, item: RawItem) -> np.ndarray:
        path = Path(item.files["image"])
        field, j = str(item.meta["image_field"]), int(item.meta["image_index"])
        if field == "edm":
            images, _ = self._raw(_edm_images, path, self._cifar100_names)
        else:
            images, _ = self._raw(_cifar_batch, path, field)
        if not 0 <= j < images.shape[0]:
            raise RawDataError(path, f"image index {j} out of range ({images.shape[0]} images)")
        return images[j]

    def process(self, item: RawItem) -> dict[str, np.ndarray]:
        wave, sr = read_audio(item.files["audio"])
        audio = audio_features(
            wave,
            sr,
            sample_rate=self.sample_rate,
            n_mels=self.n_mels,
            n_frames=self.n_frames,
            n_fft=self.n_fft,
            win_length=self.win_length,
            hop=self.hop,
            audio_fit=self.audio_fit,
        )
        image = resize_2d(self._image(item), (self.image_size, self.image_size))
        if self.image_dtype == "float32":
            image = image.astype(np.float32) / np.float32(255.0)
        return {"audio": audio, "image": image}

    def split(self, items: Sequence[RawItem]) -> dict[str, list[int]]:
        labels = [int(item.label) for item in items]
        groups = [str(item.group) for item in items]
        return stratified_split(labels, groups, self.split_sizes, self.seed)


# --------------------------------------------------------------------------- encoders


def build_encoders(
    latent_dim: int,
    pretrained_audio: str | Path | None = None,
    pretrained_image: str | Path | None = None,
) -> dict[str, nn.Module]:
    """ResNet-6 for the 1-channel spectrogram and for the RGB image (weights: local files only)."""
    check_positive_int("latent_dim", latent_dim)
    return {
        "audio": ProjectedEncoder(resnet6(1, pretrained_audio), latent_dim),
        "image": ProjectedEncoder(resnet6(3, pretrained_image), latent_dim),
    }


def _cache_classes(root: Path) -> list[str]:
    """Kept class names in label order, as the preparer stored them in the manifest."""
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{root} is not a prepared cache (no {MANIFEST}); run "
            f"`miles prepare luma --raw DATA --out {root}` first"
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("dataset") != NAME:
        raise ValueError(f"{root} holds a {manifest.get('dataset')!r} cache, not {NAME!r}")
    classes = (manifest.get("extra") or {}).get("classes")
    if not isinstance(classes, list) or not classes:
        raise ValueError(
            f"{path} has no kept class list (extra.classes); it was made by an older miles: "
            "prepare the cache again"
        )
    return [str(c) for c in classes]


@register_dataset(NAME)
def build_luma(
    root: str | Path,
    check: bool = False,
    *,
    pretrained_audio: str | Path | None = None,
    pretrained_image: str | Path | None = None,
) -> DatasetSplits:
    """Train/val/test over a prepared LUMA cache (accuracy over the kept classes).

    ``check=True`` re-hashes the cache against its manifest first. Pretrained ResNet-6 weights are
    read from the given local files only.
    """
    root = Path(root)
    classes = _cache_classes(root)
    return prepared_splits(
        root,
        num_classes=len(classes),
        multilabel=False,
        metric="accuracy",
        build_encoders=functools.partial(
            build_encoders, pretrained_audio=pretrained_audio, pretrained_image=pretrained_image
        ),
        modalities=("audio", "image"),
        check=check,
        info={"classes": classes},
    )
