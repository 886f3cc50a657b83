"""Turn a user's raw copy of a dataset into a memory-mapped cache, resumably and verifiably.

Raw multimodal datasets (WAV + FLV, JPEG + JSON, ...) are slow to decode and easy to preprocess
inconsistently. ``miles prepare`` decodes every sample once, with the options recorded, into one
``.npy`` array per modality (written through ``numpy.lib.format.open_memmap``, read back with
``mmap_mode="r"`` so a data loader never holds the whole set in memory), plus labels, the split and
a manifest with a SHA-256 checksum of every output file.

A dataset plugs in with a :class:`Preparer`: ``scan`` lists the samples and their labels from the
official layout (an error names the first missing or malformed file), ``process`` decodes one
sample into fixed-shape arrays, ``split`` assigns samples to train/val/test. The driver here does
the rest: progress bar, resumption from the last committed chunk after an interruption, skipping
unreadable samples only when asked (``skip_bad``, with their names and reasons in the manifest),
checksums, and refusing to mix caches made with different options.

Decoding runs in ``workers`` processes when asked (a ``torch.utils.data.DataLoader`` over the
samples: ordered results, bounded prefetch, workers shut down on Ctrl-C or on an error). The
main process alone writes the arrays and commits chunks in sample order, so the cache, its
checksums and the manifest are byte-identical for any number of workers, and a run interrupted
with one number of workers resumes with another.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import pickle
import traceback
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from miles.fileio import DamagedFileError, read_json, remove_stale_temp_files
from miles.fileio import write_json as _write_json
from miles.registry import Registry

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
LABELS = "labels.npy"
SPLITS = "splits.json"
SPLIT_NAMES = ("train", "val", "test")
FORMAT_VERSION = 1


class RawDataError(ValueError):
    """A raw file is missing, truncated or malformed; the message names the file."""

    def __init__(self, path: Path | str, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = str(path)
        self.why = why

    def __reduce__(self) -> tuple[Any, ...]:  # travels from a decoding worker intact
        return (type(self), (self.path, self.why))


class DecodeError(RuntimeError):
    """Decoding one sample failed with an error that is not a :class:`RawDataError` (a reader
    bug, or a damage the preparer does not recognise): names the sample and its files.
    ``worker_traceback`` is where it happened, in whichever process decoded the sample."""

    def __init__(self, key: str, files: str, error: str, worker_traceback: str) -> None:
        super().__init__(f"sample {key!r} ({files}): decoding failed with {error}")
        self.key, self.files, self.error = key, files, error
        self.worker_traceback = worker_traceback

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key, self.files, self.error, self.worker_traceback))


@dataclass(frozen=True)
class RawItem:
    """One sample of the raw dataset: its id, label, raw files per modality and split group."""

    key: str
    label: Any
    files: Mapping[str, Path]
    group: str | None = None  #: e.g. the speaker: samples of one group never cross splits
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ArraySpec:
    """Shape (of one sample) and dtype of a modality's array in the cache."""

    shape: tuple[int, ...]
    dtype: str


class Preparer(ABC):
    """How one dataset's raw layout becomes cached arrays. Subclasses set ``name``."""

    name: ClassVar[str]

    @abstractmethod
    def options(self) -> dict[str, Any]:
        """Every preprocessing choice, recorded in the manifest (JSON-able)."""

    @abstractmethod
    def specs(self) -> dict[str, ArraySpec]:
        """Per modality, the fixed shape and dtype of one processed sample."""

    @abstractmethod
    def label_spec(self) -> ArraySpec:
        """Shape/dtype of one label: ``()`` int64 for single-label, ``(C,)`` for multilabel."""

    @abstractmethod
    def scan(self, raw: Path) -> list[RawItem]:
        """List the samples of the raw copy in a deterministic order; raise RawDataError early."""

    @abstractmethod
    def process(self, item: RawItem) -> dict[str, np.ndarray]:
        """Decode one sample to arrays matching :meth:`specs`; raise RawDataError if unreadable.

        The result must depend on ``item`` (and on what :meth:`scan` set up) only: with
        ``workers > 1`` samples are decoded in other processes, each on its own copy of the
        preparer made after ``scan``, in no particular order.
        """

    @abstractmethod
    def split(self, items: Sequence[RawItem]) -> dict[str, list[int]]:
        """Indices into ``items`` for each of train/val/test (disjoint, deterministic)."""

    def encode_label(self, item: RawItem) -> np.ndarray:
        """The label as an array matching :meth:`label_spec` (override for multilabel)."""
        spec = self.label_spec()
        return np.asarray(item.label, dtype=spec.dtype).reshape(spec.shape)

    def manifest_extra(self, items: Sequence[RawItem]) -> dict[str, Any]:
        """JSON-able facts about the prepared set (e.g. kept class names), stored under "extra".

        For what a Dataset needs to read the cache back and cannot rebuild from the keys.
        """
        return {}


def resolve_split_counts(sizes: Sequence[int | float], n: int) -> tuple[int, int, int]:
    """Train/val/test counts for ``n`` samples, the one rounding rule every dataset uses.

    Three ints summing to ``n`` are used as given. Three fractions summing to 1 (within 1e-9)
    give ``val = floor(f_val * n + 0.5)``, ``test = floor(f_test * n + 0.5)`` (half up, not
    Python's banker's ``round``) and ``train = n - val - test``, so train absorbs the rounding:
    7,442 at 0.70/0.15/0.15 gives 5,210 / 1,116 / 1,116. Should both halves round up past ``n``
    (possible only when ``f_train`` is about 0), ``test`` gives one back.

    Raises:
        ValueError: anything else (not three numbers, negative, ints not summing to ``n``,
            fractions not summing to 1), naming the sizes.
    """
    values = list(sizes) if not isinstance(sizes, str | bytes) else []
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"split sizes {sizes!r}: n must be an int >= 0, got {n!r}")
    if len(values) != 3 or any(
        isinstance(v, bool)
        or not isinstance(v, int | float | np.integer | np.floating)
        or not math.isfinite(float(v))
        or v < 0
        for v in values
    ):
        raise ValueError(
            f"split sizes {sizes!r} must be three non-negative numbers (train, val, test)"
        )
    if all(isinstance(v, int | np.integer) for v in values):
        counts = [int(v) for v in values]
        if sum(counts) != n:
            raise ValueError(
                f"split sizes {counts} sum to {sum(counts)}, but there are {n} samples; give "
                "counts that add up, or fractions summing to 1"
            )
        return counts[0], counts[1], counts[2]
    fractions = [float(v) for v in values]
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(
            f"split sizes {sizes!r}: fractions must sum to 1 (got {sum(fractions)!r}); "
            "or give three int counts"
        )
    val = math.floor(fractions[1] * n + 0.5)
    test = min(math.floor(fractions[2] * n + 0.5), n - val)
    return n - val - test, val, test


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def items_fingerprint(items: Sequence[RawItem]) -> str:
    """SHA-256 over every sample's key, label and group, in order."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([item.key, item.label, item.group], default=str).encode())
    return digest.hexdigest()


def _check_split(split: Mapping[str, list[int]], n: int) -> None:
    if set(split) != set(SPLIT_NAMES):
        raise ValueError(f"split must have exactly {SPLIT_NAMES}, got {sorted(split)}")
    seen: set[int] = set()
    for name in SPLIT_NAMES:
        idx = split[name]
        if any(not 0 <= i < n for i in idx) or seen & set(idx) or len(set(idx)) != len(idx):
            raise ValueError(f"split {name!r} has out-of-range, repeated or shared indices")
        seen |= set(idx)


def decode_sample(
    preparer: Preparer, specs: Mapping[str, ArraySpec], item: RawItem
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One sample's arrays and label, checked against ``specs`` (shape, dtype, finite values)."""
    decoded = preparer.process(item)
    arrays = {}
    for m, spec in specs.items():
        value = np.asarray(decoded[m])
        where = item.files.get(m, item.key)
        if value.shape != spec.shape or value.dtype != np.dtype(spec.dtype):
            raise RawDataError(
                where,
                f"decoded to {value.dtype}{list(value.shape)}, expected "
                f"{spec.dtype}{list(spec.shape)}",
            )
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise RawDataError(where, "decoded to non-finite values")
        arrays[m] = value
    return arrays, preparer.encode_label(item)


@dataclass(frozen=True)
class _Decoded:
    """One decoded sample, or why it could not be: returned, not raised, so that a worker's
    error reaches the main process whole and the main process decides (skip or stop)."""

    index: int
    arrays: dict[str, np.ndarray] | None = None
    label: np.ndarray | None = None
    bad: RawDataError | None = None
    failed: DecodeError | None = None


class _Samples(Dataset[_Decoded]):
    """Samples ``start..n-1`` of a raw copy, each decoded on access (in a DataLoader worker)."""

    def __init__(self, preparer: Preparer, items: Sequence[RawItem], start: int) -> None:
        self.preparer, self.items, self.start = preparer, items, start
        self.specs = preparer.specs()

    def __len__(self) -> int:
        return len(self.items) - self.start

    def __getitem__(self, j: int) -> _Decoded:
        i = self.start + j
        item = self.items[i]
        try:
            arrays, label = decode_sample(self.preparer, self.specs, item)
        except RawDataError as exc:
            return _Decoded(i, bad=exc)
        except Exception as exc:
            files = ", ".join(f"{m}: {path}" for m, path in item.files.items()) or "no files"
            error = f"{type(exc).__name__}: {exc}"
            return _Decoded(i, failed=DecodeError(item.key, files, error, traceback.format_exc()))
        return _Decoded(i, arrays=arrays, label=label)


def _as_is(sample: Any) -> Any:
    """The DataLoader's collate function: a decoded sample passes unchanged (no tensors)."""
    return sample


def _decoded(samples: _Samples, workers: int) -> Iterator[_Decoded]:
    """The samples decoded in order: in this process (``workers == 1``), else in ``workers``
    processes (DataLoader workers: one torch thread each; they leave on Ctrl-C; :func:`_stop`
    shuts them down)."""
    method = multiprocessing.get_start_method(allow_none=True)  # None: not fixed yet, and
    method = method or multiprocessing.get_all_start_methods()[0]  # asking must not fix it
    if workers > 1 and method != "fork":
        try:  # the workers receive the preparer pickled: say so now, not from inside a worker
            pickle.dumps(samples)
        except Exception as exc:
            raise TypeError(
                f"workers={workers} needs a picklable preparer on this platform "
                f"({type(samples.preparer).__name__}: {exc}); use workers=1"
            ) from exc
    loader = DataLoader(
        samples,
        batch_size=None,
        shuffle=False,
        num_workers=workers if workers > 1 else 0,
        collate_fn=_as_is,
        generator=torch.Generator(),  # leaves the caller's global RNG untouched
    )
    return iter(loader)


def _stop(decoded: Iterator[_Decoded]) -> None:
    """Shut the decoding workers down now, also on Ctrl-C or an error. Dropping the iterator
    would not do: the exception's traceback keeps it alive in its frames. (A private method of
    the DataLoader's iterator, as PyTorch Lightning also calls it.)"""
    shutdown = getattr(decoded, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def prepare(
    preparer: Preparer,
    raw: Path | str,
    out: Path | str,
    *,
    skip_bad: bool = False,
    progress: bool = True,
    chunk: int = 64,
    workers: int = 1,
) -> dict[str, Any]:
    """Build (or finish building) the cache of ``preparer``'s dataset from ``raw`` into ``out``.

    Returns the manifest. A finished cache with the same options is left as is; one made with other
    options is refused (use another ``out``). Interrupted runs continue from the last committed
    chunk of ``chunk`` samples. ``workers > 1`` decodes in that many processes; the cache is the
    same byte for byte.

    Raises:
        RawDataError: a raw file is missing or unreadable (unless ``skip_bad``), naming it.
        DecodeError: decoding a sample failed otherwise, naming the sample and its files.
    """
    from tqdm.auto import tqdm

    from miles.validation import check_positive_int

    check_positive_int("workers", workers)
    check_positive_int("chunk", chunk)
    raw, out = Path(raw), Path(out)
    if not raw.is_dir():
        raise FileNotFoundError(f"raw dataset folder {raw} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)  # what a killed run left half-written
    identity = {
        "dataset": preparer.name,
        "format_version": FORMAT_VERSION,
        "options": preparer.options(),
        "skip_bad": skip_bad,
    }
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        manifest = read_manifest(out)
        if {k: manifest.get(k) for k in identity} != identity:
            raise ValueError(
                f"{out} holds a cache made with other settings ({manifest.get('options')}); "
                "prepare into another folder"
            )
        # the manifest commits the cache: a run killed right after it left its progress behind
        (out / PROGRESS).unlink(missing_ok=True)
        return dict(manifest)

    items = preparer.scan(raw)
    if not items:
        raise RawDataError(raw, "no samples found in the expected layout")
    n = len(items)
    # the split is checked now, not after hours of decoding
    split = preparer.split(items)
    _check_split(split, n)
    specs = preparer.specs()
    label_spec = preparer.label_spec()
    progress_path = out / PROGRESS
    # what rows mean: resuming over a raw copy that changed (files added, removed, relabelled)
    # would write samples into the wrong rows
    fingerprint = items_fingerprint(items)
    unfinished = {k: v for k, v in identity.items() if k != "skip_bad"}  # may be switched on
    state: dict[str, Any] = {
        "identity": unfinished,
        "n": n,
        "fingerprint": fingerprint,
        "done": 0,
        "skipped": {},
    }
    if progress_path.is_file():
        stored = read_json(
            progress_path,
            what="the progress record of an unfinished cache",
            advice=f"delete {out} and prepare again",
        )
        if stored.get("identity") != unfinished or stored.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{out} holds an unfinished cache made with other settings or from a raw copy "
                "whose samples have changed since; prepare into another folder or delete it"
            )
        state = stored
    mode = "r+" if state["done"] else "w+"
    arrays = {
        m: np.lib.format.open_memmap(
            out / f"{m}.npy", mode=mode, dtype=np.dtype(spec.dtype), shape=(n, *spec.shape)
        )
        for m, spec in specs.items()
    }
    labels = np.lib.format.open_memmap(
        out / LABELS, mode=mode, dtype=np.dtype(label_spec.dtype), shape=(n, *label_spec.shape)
    )
    decoded = _decoded(_Samples(preparer, items, state["done"]), workers)
    bar = tqdm(
        total=n, initial=state["done"], desc=f"prepare {preparer.name}", disable=not progress
    )
    try:
        for start in range(state["done"], n, chunk):
            for i in range(start, min(start + chunk, n)):
                sample = next(decoded)
                assert sample.index == i, (sample.index, i)  # results come in sample order
                if sample.failed is not None:
                    raise sample.failed from _WorkerTraceback(sample.failed.worker_traceback)
                if sample.bad is not None:
                    if not skip_bad:
                        raise sample.bad
                    state["skipped"][items[i].key] = str(sample.bad)
                else:
                    assert sample.arrays is not None
                    for m, value in sample.arrays.items():
                        arrays[m][i] = value
                    labels[i] = sample.label
                bar.update(1)
            for array in (*arrays.values(), labels):
                array.flush()
            state["done"] = min(start + chunk, n)
            _write_json(progress_path, state)
    finally:
        _stop(decoded)
        bar.close()

    if len(state["skipped"]) == n:
        first = next(iter(state["skipped"].values()))
        raise RawDataError(
            raw,
            f"every one of the {n} samples is unreadable (the first: {first}); nothing to cache. "
            f"The reason of each is in {progress_path}: check the raw copy and the options",
        )
    skipped_idx = {i for i, item in enumerate(items) if item.key in state["skipped"]}
    kept = {name: [i for i in idx if i not in skipped_idx] for name, idx in split.items()}
    emptied = [name for name in SPLIT_NAMES if split[name] and not kept[name]]
    split = kept
    _write_json(out / SPLITS, split)
    del arrays, labels  # close the memmaps before hashing
    files = sorted([*(f"{m}.npy" for m in specs), LABELS, SPLITS])
    manifest = {
        **identity,
        "modalities": list(specs),
        "n_samples": n,
        "sizes": {name: len(idx) for name, idx in split.items()},
        "skipped": state["skipped"],
        "keys": [item.key for item in items],
        "extra": preparer.manifest_extra(items),
        "sha256": {name: sha256_file(out / name) for name in files},
    }
    _write_json(manifest_path, manifest)
    progress_path.unlink(missing_ok=True)
    if state["skipped"]:
        empty = f"; the {' and '.join(emptied)} split now holds none" if emptied else ""
        print(
            f"prepare {preparer.name}: skipped {len(state['skipped'])} unreadable samples "
            f"(listed in {manifest_path}){empty}"
        )
    return manifest


class _WorkerTraceback(Exception):
    """The traceback of a failed decode, shown as the cause of its :class:`DecodeError`."""

    def __str__(self) -> str:
        return "\n" + str(self.args[0])


def verify(out: Path | str) -> dict[str, Any]:
    """Re-hash a finished cache against its manifest; raise naming the first mismatching file."""
    out = Path(out)
    manifest = read_manifest(out)
    for name, expected in manifest["sha256"].items():
        path = out / name
        if not path.is_file():
            raise RawDataError(path, "missing from the prepared cache")
        if sha256_file(path) != expected:
            raise RawDataError(path, "checksum differs from the manifest (file changed or damaged)")
    return dict(manifest)


def read_manifest(out: Path | str) -> dict[str, Any]:
    """The manifest of the cache in ``out``; a damaged one names itself.

    Raises:
        FileNotFoundError: ``out`` holds no manifest (not a prepared cache).
        miles.fileio.DamagedFileError: the manifest is not JSON, or lacks a key.
    """
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{out} is not a prepared cache (no {MANIFEST}); run miles prepare")
    advice = f"prepare the cache again into a new folder (or delete {out} first)"
    manifest: dict[str, Any] = read_json(path, what="the cache's manifest", advice=advice)
    needed = ("dataset", "modalities", "sizes", "skipped", "sha256")
    missing = [k for k in needed if k not in manifest]
    if missing:
        raise DamagedFileError(path, f"the cache's manifest lacks {missing}", advice)
    return manifest


_PREPARERS: Registry[type[Preparer]] = Registry("preparer")


def register_preparer(name: str) -> Any:
    """Class decorator: make ``miles prepare NAME`` build this preparer."""
    add = _PREPARERS.register(name)

    def decorate(cls: type[Preparer]) -> type[Preparer]:
        add(cls)
        cls.name = name
        return cls

    return decorate


def build_preparer(name: str, **options: Any) -> Preparer:
    factory = _PREPARERS.get(name)
    try:
        return factory(**options)
    except TypeError as exc:
        raise TypeError(f"bad options for {name!r}: {exc}") from exc


def available_preparers() -> list[str]:
    return _PREPARERS.names()
