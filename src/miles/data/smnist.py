"""S-MNIST: MNIST digits paired with spoken digits (Google Speech Commands) as 39 x 13 MFCCs.

Source: "Written and spoken digits database for multimodal learning", L. Khacef, L. Rodriguez,
B. Miramond (Université Côte d'Azur, LEAT), Zenodo concept record 3515934 (version 1.0: record
3515935, 2019; version 2.0: record 4452953, 2020). The release is six ``.npy`` files, pre-paired
row by row (row ``i`` of the three files of a part is one sample):

* ``data_wr_train.npy`` / ``data_wr_test.npy``: 60,000 / 10,000 MNIST images, 784 values each
  (28 x 28, "the original MNIST ... with no additional processing");
* ``data_sp_train.npy`` / ``data_sp_test.npy``: the paired spoken digits, 507 values each: 39
  frames (50 ms window, 25 ms shift) x 13 coefficients (12 MFCC + energy), standardised and
  normalised by the authors. The 38,908 utterances (34,801 train / 4,107 test) were *duplicated*
  at random to reach 60,000 / 10,000 rows;
* ``labels_train.npy`` / ``labels_test.npy``: one digit label per row, shared by both modalities.

Preparation (``miles prepare smnist --raw DIR --out DIR``):

* Splits (the paper's 8,000 / 2,000 / 2,000): train and val are drawn from the release's train
  part, test from its test part, by a ``numpy.random.default_rng(data_seed)`` permutation; not
  stratified (MNIST is near balanced). ``sizes`` takes counts (int) or fractions (float) of the
  available units of the part (train and val: of the train part, so at most 1 together; test:
  of the test part), rounded half up by the shared ``resolve_split_counts``, so a miniature copy
  gets scaled sizes.
* Duplicated utterances never cross splits. The release carries no utterance ids, so a duplicate
  is defined as an identical MFCC row (same 507 values, hashed as float64 bytes). ``duplicates=
  "one"`` (default) keeps at most one row per utterance in the whole cache (a random one; 34,801
  distinct train utterances leave ample room for 10,000 samples, and no utterance gets double
  weight); ``"group"`` keeps duplicates but puts all rows of an utterance in the same split.
  Utterances that occur in both parts are kept out of test when train/val use them.
* Pairing: the release's own (pre-paired) rows are kept; nothing is re-paired.
* Labels: integer digits 0..9 (a ``(N, 10)`` one-hot file is also accepted); a label that is not a
  digit, or an utterance whose duplicates carry different labels, raises a ``RawDataError`` naming
  the file and row (skippable with ``skip_bad``).
* Image: float32 ``(1, 28, 28)`` in [0, 1], the values divided by ``image_scale``: ``"auto"``
  (default) decides per part from the dtype (integer: 255) or, for floats, from the rows (no row
  above 1: 1; (nearly) all rows above 1: 255; only some: an error naming the file, since one
  choice would silently blacken or overflow the others); ``1`` or ``255`` force it.
  Out-of-range or non-finite rows are errors.
* Audio: float32 ``(1, 28, 28)``; the 507 values are read as ``(39 time, 13 coefficient)``
  (``mfcc_layout="time_major"``; ``"coef_major"`` reads ``(13, 39)`` and transposes), then
  ``audio_to_image``: ``"resize"`` (default) bilinear resize to 28 x 28 (``align_corners=False``,
  antialiased where an axis shrinks, as Pillow does: time 39 -> 28, coefficients 13 -> 28);
  ``"pad"`` centre-crops time to frames 5..32 and zero-pads coefficients to 28 (7 before, 8
  after); ``"reshape"`` writes the 507 values row-major into 28 x 28 and zero-fills the last 277.
  ``audio_norm="none"`` (default) keeps the authors' normalisation; ``"standardize"`` z-scores each
  of the 13 coefficients with the mean/std of the selected *train* rows (before the reshaping, so
  zero padding means "average").

Not verifiable offline (see ``docs/datasets/smnist.md``): the files' dtypes, the order of the 507
values (time-major is assumed; third-party loaders mostly reshape to ``(39, 13)``), the label
encoding, and duplicates beyond byte-identical rows (the release has no utterance or speaker ids,
so the split is not speaker-disjoint).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from miles.data.base import DatasetSplits
from miles.data.prepare import (
    ArraySpec,
    Preparer,
    RawDataError,
    RawItem,
    register_preparer,
    resolve_split_counts,
)
from miles.data.prepared import prepared_splits
from miles.data.registry import register_dataset
from miles.validation import check_choice, check_non_negative_int, check_positive_int

__all__ = [
    "AUDIO_TO_IMAGE",
    "DUPLICATES",
    "FILES",
    "MFCC_LAYOUTS",
    "PAPER_SIZES",
    "SMNISTPreparer",
    "build_encoders",
    "build_smnist",
    "mfcc_to_image",
    "select_samples",
]

NAME = "smnist"
NUM_CLASSES = 10
FRAMES, COEFFS = 39, 13
SIDE = 28
PAPER_SIZES: tuple[int, int, int] = (8000, 2000, 2000)
AUDIO_TO_IMAGE = ("resize", "pad", "reshape")
MFCC_LAYOUTS = ("time_major", "coef_major")
AUDIO_NORMS = ("none", "standardize")
DUPLICATES = ("one", "group")
IMAGE_SCALES: tuple[str | int, ...] = ("auto", 1, 255)
#: part -> (images, spoken MFCCs, labels), as named in the Zenodo release.
FILES: dict[str, tuple[str, str, str]] = {
    "train": ("data_wr_train.npy", "data_sp_train.npy", "labels_train.npy"),
    "test": ("data_wr_test.npy", "data_sp_test.npy", "labels_test.npy"),
}

Size = int | float


# ---------------------------------------------------------------------------------------------
# Pure helpers (tested directly)


def mfcc_to_image(mfcc: np.ndarray, mode: str = "resize") -> np.ndarray:
    """Turn one ``(39, 13)`` MFCC matrix (time x coefficient) into a float32 ``(28, 28)`` map."""
    arr = np.asarray(mfcc, dtype=np.float32)
    if arr.shape != (FRAMES, COEFFS):
        raise ValueError(f"expected an MFCC of shape {(FRAMES, COEFFS)}, got {arr.shape}")
    if mode == "resize":
        src = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
        out = F.interpolate(
            src, size=(SIDE, SIDE), mode="bilinear", align_corners=False, antialias=True
        )
        return out[0, 0].numpy().astype(np.float32, copy=False)
    if mode == "pad":
        return _center_fit(arr, SIDE, SIDE)
    if mode == "reshape":
        flat = np.zeros(SIDE * SIDE, dtype=np.float32)
        flat[: arr.size] = arr.reshape(-1)
        return flat.reshape(SIDE, SIDE)
    raise ValueError(f"audio_to_image must be one of {AUDIO_TO_IMAGE}, got {mode!r}")


def _center_fit(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop or zero-pad each axis of a 2-D array to ``(height, width)``."""
    out = arr
    for axis, target in ((0, height), (1, width)):
        size = out.shape[axis]
        if size > target:
            start = (size - target) // 2
            out = np.take(out, np.arange(start, start + target), axis=axis)
        elif size < target:
            before = (target - size) // 2
            pad = [(0, 0), (0, 0)]
            pad[axis] = (before, target - size - before)
            out = np.pad(out, pad)
    return np.ascontiguousarray(out, dtype=np.float32)


def _check_size(size: Size, name: str) -> None:
    """An int count >= 0 or a float fraction in (0, 1]."""
    ok_count = isinstance(size, int | np.integer) and not isinstance(size, bool) and size >= 0
    ok_fraction = isinstance(size, float) and 0.0 < size <= 1.0
    if not (ok_count or ok_fraction):
        raise ValueError(
            f"size of {name} must be an int count >= 0 or a float fraction in (0, 1], got {size!r}"
        )


def _part_counts(sizes: Sequence[Size], available: int) -> list[int]:
    """Counts for the splits drawn from one part of ``available`` units.

    Counts stay counts. Fractions (at most two per part: train and val share the train part) go
    through :func:`miles.data.prepare.resolve_split_counts` with the unused rest of the part as
    its first share, so every dataset rounds the same way (half up) and the fractions of one
    part never add up to more than the part.
    """
    counts = [int(s) if not isinstance(s, float) else 0 for s in sizes]
    fractions = [(i, float(s)) for i, s in enumerate(sizes) if isinstance(s, float)]
    if fractions:
        shares = [f for _, f in fractions] + [0.0] * (2 - len(fractions))
        if sum(shares) > 1.0 + 1e-9:
            raise ValueError(
                f"fractions {[f for _, f in fractions]} of one part add up to more than 1"
            )
        _, first, second = resolve_split_counts([max(0.0, 1.0 - sum(shares)), *shares], available)
        for (i, _), count in zip(fractions, (first, second), strict=False):
            counts[i] = count
    return counts


def _check_sizes(sizes: Sequence[Size]) -> tuple[Size, Size, Size]:
    values = tuple(sizes)
    if len(values) != 3:
        raise ValueError(f"sizes must be (train, val, test), got {list(values)}")
    for name, size in zip(("train", "val", "test"), values, strict=True):
        _check_size(size, name)
    _part_counts(values[:2], 1000)  # train and val fractions share the train part
    return values[0], values[1], values[2]


def _take(
    groups: Sequence[str],
    order: np.ndarray,
    wanted: Sequence[int],
    *,
    duplicates: str,
    excluded: set[str],
) -> list[list[int]]:
    """Walk rows in ``order``; fill bins of ``wanted`` sizes with whole utterance groups."""
    members: dict[str, list[int]] = {}
    first_seen: list[str] = []
    for row in order.tolist():
        g = groups[row]
        if g in excluded:
            continue
        if g not in members:
            members[g] = []
            first_seen.append(g)
        members[g].append(row)
    bins: list[list[int]] = [[] for _ in wanted]
    for g in first_seen:
        rows = members[g][:1] if duplicates == "one" else members[g]
        for b, target in enumerate(wanted):
            if len(bins[b]) + len(rows) <= target:
                bins[b].extend(rows)
                break
        if all(len(b) == t for b, t in zip(bins, wanted, strict=True)):
            break
    return bins


def select_samples(
    train_groups: Sequence[str],
    test_groups: Sequence[str],
    sizes: Sequence[Size] = PAPER_SIZES,
    *,
    seed: int = 0,
    duplicates: str = "one",
) -> dict[str, list[int]]:
    """Rows of the release's train part for ``train``/``val`` and of its test part for ``test``.

    ``*_groups[i]`` is the utterance id of row ``i`` (rows with equal ids are duplicates). Rows are
    visited in a ``default_rng(seed)`` permutation; each utterance goes whole to the first split
    that still has room (``duplicates="group"``) or contributes one row (``"one"``), so no
    utterance is in two splits. A float size is a fraction of the part's units (distinct utterances
    for ``"one"``, rows for ``"group"``), rounded half up as in :func:`resolve_split_counts`;
    train and val fractions both refer to the train part (so they may sum to at most 1).
    Returned rows are sorted (sequential reads of the memory-mapped release).

    Raises:
        ValueError: bad sizes or mode, or a part too small for the requested sizes.
    """
    if duplicates not in DUPLICATES:
        raise ValueError(f"duplicates must be one of {DUPLICATES}, got {duplicates!r}")
    n_train_sz, n_val_sz, n_test_sz = _check_sizes(sizes)
    rng = np.random.default_rng(seed)

    def units(groups: Sequence[str], excluded: set[str] | None = None) -> int:
        excluded = excluded or set()
        kept = [g for g in groups if g not in excluded]
        return len(set(kept)) if duplicates == "one" else len(kept)

    avail_train = units(train_groups)
    wanted = _part_counts([n_train_sz, n_val_sz], avail_train)
    tr, va = _take(
        train_groups,
        rng.permutation(len(train_groups)),
        wanted,
        duplicates=duplicates,
        excluded=set(),
    )
    used = {train_groups[i] for i in tr} | {train_groups[i] for i in va}
    (n_test,) = _part_counts([n_test_sz], units(test_groups, used))
    (te,) = _take(
        test_groups,
        rng.permutation(len(test_groups)),
        [n_test],
        duplicates=duplicates,
        excluded=used,
    )
    for name, got, want, part in (
        ("train", tr, wanted[0], "train"),
        ("val", va, wanted[1], "train"),
        ("test", te, n_test, "test"),
    ):
        if len(got) != want:
            raise ValueError(
                f"the release's {part} part cannot fill {want} {name} samples without splitting "
                f"an utterance across splits (got {len(got)}; duplicates={duplicates!r}); ask "
                "for smaller sizes"
            )
    return {"train": sorted(tr), "val": sorted(va), "test": sorted(te)}


# ---------------------------------------------------------------------------------------------
# Raw-file access


def _open_npy(path: Path) -> np.ndarray:
    """Memory-map a numeric ``.npy``; any unreadable, truncated or pickled file names itself."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise RawDataError(
            path, f"not a readable .npy array (truncated or corrupt?): {exc}"
        ) from exc
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf" or arr.ndim < 1:
        raise RawDataError(
            path, f"expected a numeric array, got dtype {getattr(arr, 'dtype', '?')}"
        )
    return arr


def _row_size(arr: np.ndarray) -> int:
    return int(np.prod(arr.shape[1:], dtype=np.int64)) if arr.ndim > 1 else 1


def _read_labels(path: Path) -> np.ndarray:
    """Labels as float64 ``(N,)``; a one-hot ``(N, 10)`` file gives its argmax (NaN: not 1-hot)."""
    arr = np.asarray(_open_npy(path), dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim == 2 and arr.shape[1] == NUM_CLASSES:
        onehot = np.isin(arr, (0.0, 1.0)).all(axis=1) & (arr.sum(axis=1) == 1)
        return np.where(onehot, arr.argmax(axis=1).astype(np.float64), np.nan)
    if arr.ndim != 1:
        raise RawDataError(path, f"expected labels of shape (N,) or (N, 10), got {arr.shape}")
    return arr


#: the id prefix of an MFCC row holding NaN or inf (see :func:`_utterance_ids`)
NON_FINITE = "non-finite:"


def _utterance_ids(audio: np.ndarray, chunk: int = 4096, *, part: str = "") -> list[str]:
    """One id per MFCC row: a hash of its 507 values as float64 bytes (equal rows, equal ids).

    A row holding NaN or inf is no utterance: it gets an id of its own (``non-finite:PART/ROW``),
    so such rows never merge into one "duplicated utterance", and it fails when decoded.
    """
    n = audio.shape[0]
    ids: list[str] = []
    for start in range(0, n, chunk):
        block = np.ascontiguousarray(audio[start : start + chunk], dtype=np.float64)
        block = block.reshape(block.shape[0], -1) + 0.0  # -0.0 -> 0.0
        finite = np.asarray(np.isfinite(block).all(axis=1), dtype=bool).tolist()
        ids.extend(
            hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest()
            if ok
            else f"{NON_FINITE}{part}/{start + i}"
            for i, (row, ok) in enumerate(zip(block, finite, strict=True))
        )
    return ids


def _image_scale(images: np.ndarray, path: Path, mode: str | int, chunk: int = 4096) -> float:
    """The divisor that brings a part's images to [0, 1] (see ``image_scale``).

    ``1`` or ``255`` are taken as given. ``"auto"``: an integer dtype is 0..255; a float file is
    0..1 when no row exceeds 1, and 0..255 when (nearly: at most 1 % of the non-blank rows
    excepted, faint digits) every row does. A float file where only some rows exceed 1 is
    ambiguous: dividing all by 255 would turn its 0..1 rows near black, keeping all would push
    the others out of range; that is an error asking for an explicit ``image_scale``.
    """
    if mode in (1, 255):
        return float(mode)
    if images.dtype.kind in "biu":
        return 255.0
    above = below = 0  # rows whose finite maximum exceeds 1 / lies in (0, 1]
    for start in range(0, images.shape[0], chunk):
        block = np.asarray(images[start : start + chunk], dtype=np.float64)
        block = np.where(np.isfinite(block), block, 0.0).reshape(block.shape[0], -1)
        peak = block.max(axis=1) if block.size else np.zeros(0)
        above += int((peak > 1.0).sum())
        below += int(((peak > 0.0) & (peak <= 1.0)).sum())
    if above == 0:
        return 1.0
    if below <= 0.01 * (above + below):
        return 255.0
    raise RawDataError(
        path,
        f"float images are ambiguous: {above} rows exceed 1 (0..255?) but {below} rows lie in "
        "(0, 1]; set --option image_scale=255 or image_scale=1",
    )


@register_preparer(NAME)
class SMNISTPreparer(Preparer):
    """The Zenodo written + spoken digits release -> image and audio ``(1, 28, 28)`` float32.

    Args:
        audio_to_image: ``"resize"`` (default), ``"pad"`` or ``"reshape"`` (module docstring).
        mfcc_layout: how the 507 values are ordered: ``"time_major"`` ``(39, 13)`` (default) or
            ``"coef_major"`` ``(13, 39)``.
        audio_norm: ``"none"`` (default, the release's own normalisation) or ``"standardize"``.
        duplicates: ``"one"`` (default) or ``"group"``; see :func:`select_samples`.
        sizes: train / val / test, counts or fractions (default the paper's 8,000 / 2,000 / 2,000).
        data_seed: seed of the sample selection (independent of the training seed).
        image_scale: ``"auto"`` (default), ``1`` or ``255``: what the image values are divided
            by; see :func:`_image_scale`.
    """

    def __init__(
        self,
        audio_to_image: str = "resize",
        mfcc_layout: str = "time_major",
        audio_norm: str = "none",
        duplicates: str = "one",
        sizes: Sequence[Size] = PAPER_SIZES,
        data_seed: int = 0,
        image_scale: str | int = "auto",
    ) -> None:
        self.audio_to_image = check_choice("audio_to_image", audio_to_image, AUDIO_TO_IMAGE)
        self.mfcc_layout = check_choice("mfcc_layout", mfcc_layout, MFCC_LAYOUTS)
        self.audio_norm = check_choice("audio_norm", audio_norm, AUDIO_NORMS)
        self.duplicates = check_choice("duplicates", duplicates, DUPLICATES)
        self.data_seed = check_non_negative_int("data_seed", data_seed)
        if isinstance(image_scale, bool):  # True == 1 would pass as a choice
            raise TypeError(f"image_scale must be one of {list(IMAGE_SCALES)}, got {image_scale!r}")
        self.image_scale = check_choice("image_scale", image_scale, IMAGE_SCALES)
        self.sizes = _check_sizes(sizes)
        self._arrays: dict[Path, np.ndarray] = {}
        self._labels: dict[str, np.ndarray] = {}
        self._scale: dict[str, float] = {}
        self._conflicts: dict[str, list[tuple[str, int, float]]] = {}
        self._mean = np.zeros(COEFFS, dtype=np.float64)
        self._std = np.ones(COEFFS, dtype=np.float64)

    def options(self) -> dict[str, Any]:
        return {
            "audio_to_image": self.audio_to_image,
            "mfcc_layout": self.mfcc_layout,
            "audio_norm": self.audio_norm,
            "duplicates": self.duplicates,
            "sizes": list(self.sizes),
            "data_seed": self.data_seed,
            "image_scale": self.image_scale,
        }

    def specs(self) -> dict[str, ArraySpec]:
        return {
            "image": ArraySpec((1, SIDE, SIDE), "float32"),
            "audio": ArraySpec((1, SIDE, SIDE), "float32"),
        }

    def label_spec(self) -> ArraySpec:
        return ArraySpec((), "int64")

    # -- scan ---------------------------------------------------------------------------------

    def _paths(self, raw: Path) -> dict[str, tuple[Path, Path, Path]]:
        paths = {part: tuple(raw / f for f in names) for part, names in FILES.items()}
        missing = [p.name for triple in paths.values() for p in triple if not p.is_file()]
        if missing:
            expected = ", ".join(n for names in FILES.values() for n in names)
            raise RawDataError(
                raw,
                f"missing {', '.join(missing)}; expected the six files of the Zenodo release "
                f"(record 3515934) directly in this folder: {expected}",
            )
        return paths  # type: ignore[return-value]

    def _mfcc(self, row: np.ndarray) -> np.ndarray:
        values = np.asarray(row, dtype=np.float64).reshape(-1)
        if self.mfcc_layout == "time_major":
            return values.reshape(FRAMES, COEFFS)
        return values.reshape(COEFFS, FRAMES).T

    def scan(self, raw: Path) -> list[RawItem]:
        paths = self._paths(Path(raw))
        groups: dict[str, list[str]] = {}
        for part, (wr, sp, lab) in paths.items():
            images, audio, labels = _open_npy(wr), _open_npy(sp), _read_labels(lab)
            if _row_size(images) != SIDE * SIDE:
                raise RawDataError(wr, f"expected 784 values (28 x 28) per row, got {images.shape}")
            if _row_size(audio) != FRAMES * COEFFS:
                raise RawDataError(sp, f"expected 507 values (39 x 13) per row, got {audio.shape}")
            n = labels.shape[0]
            for path, arr in ((wr, images), (sp, audio)):
                if arr.shape[0] != n:
                    raise RawDataError(
                        path, f"has {arr.shape[0]} rows but {lab.name} has {n}: files not paired"
                    )
            self._arrays[wr], self._arrays[sp] = images, audio
            self._labels[part] = labels
            self._scale[part] = _image_scale(images, wr, self.image_scale)
            groups[part] = _utterance_ids(audio, part=part)
            bad = sum(g.startswith(NON_FINITE) for g in groups[part])
            if bad == n and n:
                raise RawDataError(
                    sp,
                    f"every one of its {n} MFCC rows holds NaN or inf values (the file is all "
                    "NaN?): no audio to prepare",
                )

        # an utterance whose copies disagree on the label: every one of its rows is an error
        where: dict[str, list[tuple[str, int, float]]] = {}
        for part in FILES:
            for row, (g, y) in enumerate(zip(groups[part], self._labels[part], strict=True)):
                where.setdefault(g, []).append((part, row, float(y)))
        self._conflicts = {
            g: rows for g, rows in where.items() if len({repr(y) for _, _, y in rows}) > 1
        }

        chosen = select_samples(
            groups["train"],
            groups["test"],
            self.sizes,
            seed=self.data_seed,
            duplicates=self.duplicates,
        )
        if self.audio_norm == "standardize":
            self._fit_standardizer(paths["train"][1], chosen["train"])

        items: list[RawItem] = []
        for split in ("train", "val", "test"):
            part = "test" if split == "test" else "train"
            wr, sp, lab = paths[part]
            for row in chosen[split]:
                y = float(self._labels[part][row])
                label = int(y) if math.isfinite(y) and y.is_integer() else -1
                items.append(
                    RawItem(
                        key=f"{part}/{row:05d}",
                        label=label,
                        files={"image": wr, "audio": sp, "label": lab},
                        group=groups[part][row],
                        meta={"split": split, "part": part, "row": row},
                    )
                )
        return items

    def _fit_standardizer(self, sp: Path, rows: Sequence[int]) -> None:
        """Per-coefficient mean/std over the selected train rows' frames (non-finite ignored)."""
        if not rows:
            return
        block = np.asarray(self._arrays[sp][np.asarray(rows)], dtype=np.float64)
        mfcc = np.stack([self._mfcc(r) for r in block])  # (n, 39, 13)
        mfcc = np.where(np.isfinite(mfcc), mfcc, np.nan)
        mean = np.nanmean(mfcc, axis=(0, 1))
        std = np.nanstd(mfcc, axis=(0, 1))
        self._mean = np.nan_to_num(mean, nan=0.0)
        self._std = np.where(np.isfinite(std) & (std > 0), std, 1.0)

    # -- process ------------------------------------------------------------------------------

    def process(self, item: RawItem) -> dict[str, np.ndarray]:
        part, row = str(item.meta["part"]), int(item.meta["row"])
        wr, sp, lab = (Path(item.files[k]) for k in ("image", "audio", "label"))
        y = float(self._labels[part][row])
        if not (math.isfinite(y) and y.is_integer() and 0 <= y < NUM_CLASSES):
            raise RawDataError(f"{lab} row {row}", f"label {y!r} is not a digit 0..9")
        conflict = self._conflicts.get(str(item.group))
        if conflict:
            seen = ", ".join(f"{p} row {r}: {y:g}" for p, r, y in conflict[:6])
            raise RawDataError(
                f"{sp} row {row}",
                f"the same utterance (identical MFCC) carries different labels ({seen}); "
                "the audio/label pairing is inconsistent",
            )

        pixels = np.asarray(self._arrays[wr][row], dtype=np.float64).reshape(SIDE, SIDE)
        scale = self._scale[part]
        if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > scale:
            raise RawDataError(
                f"{wr} row {row}", f"pixel values outside 0..{scale:g} or not finite"
            )
        image = (pixels / scale).astype(np.float32)[None]

        mfcc = self._mfcc(self._arrays[sp][row])
        if not np.isfinite(mfcc).all():
            raise RawDataError(f"{sp} row {row}", "MFCC values are not finite (NaN or inf)")
        if self.audio_norm == "standardize":
            mfcc = (mfcc - self._mean) / self._std
        audio = mfcc_to_image(mfcc, self.audio_to_image)[None]
        return {"image": image, "audio": audio}

    def encode_label(self, item: RawItem) -> np.ndarray:
        return np.asarray(item.label, dtype=np.int64)

    def split(self, items: Sequence[RawItem]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
        for i, item in enumerate(items):
            out[str(item.meta["split"])].append(i)
        return out


# ---------------------------------------------------------------------------------------------
# Dataset and encoders


def build_encoders(
    latent_dim: int,
    pretrained_image: str | None = None,
    pretrained_audio: str | None = None,
    *,
    stem: str = "imagenet",
) -> dict[str, nn.Module]:
    """One single-channel ResNet-10 per modality, ``out_features == latent_dim``.

    The backbone's 512 pooled features pass unchanged when ``latent_dim == 512``; otherwise a
    linear projection (part of the modality's encoder) maps them to ``latent_dim``.
    Pretrained weights load from local torchvision-format files only, into the backbone.
    ``stem``: ``"imagenet"`` (torchvision's, default: such checkpoints fit) or ``"small"``
    (3x3 stride-1, keeps more of a 28 x 28 input's resolution).
    """
    from miles.models.resnet import resnet10
    from miles.models.wrappers import ProjectedEncoder

    check_positive_int("latent_dim", latent_dim)
    check_choice("stem", stem, ("imagenet", "small"))
    encoders: dict[str, nn.Module] = {}
    for modality, weights in (("image", pretrained_image), ("audio", pretrained_audio)):
        backbone = resnet10(in_channels=1, pretrained=weights, stem=stem)  # type: ignore[arg-type]
        encoders[modality] = ProjectedEncoder(backbone, latent_dim)
    return encoders


@register_dataset(NAME)
def build_smnist(
    root: str | Path,
    check: bool = False,
    *,
    pretrained_image: str | None = None,
    pretrained_audio: str | None = None,
    encoder_stem: str = "imagenet",
) -> DatasetSplits:
    """Train/val/test over a cache written by ``miles prepare smnist`` (accuracy, 10 classes).

    ``check=True`` re-hashes the cache against its manifest first. Encoders: see
    :func:`build_encoders` (the pretrained paths and stem are passed through).
    """

    def encoders(latent_dim: int) -> dict[str, nn.Module]:
        return build_encoders(latent_dim, pretrained_image, pretrained_audio, stem=encoder_stem)

    splits = prepared_splits(
        root,
        num_classes=NUM_CLASSES,
        multilabel=False,
        metric="accuracy",
        build_encoders=encoders,
        check=check,
        info={"source": "Zenodo record 3515934 (Khacef et al., written and spoken digits)"},
    )
    if splits.info["name"] != NAME:
        raise ValueError(f"{root} holds a {splits.info['name']!r} cache, not {NAME!r}")
    return splits
