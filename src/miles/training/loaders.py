"""How the trainer turns datasets into batches: a ``DataLoader``, or indexing of in-memory tensors.

Two paths give the same batches, bit for bit, in the same order:

* a ``torch.utils.data.DataLoader`` with optional workers (each seeded by
  :func:`seed_worker` from the loader's generator, so resuming stays exact) and pinned memory.
  Prepared (memory-mapped) datasets read their samples in the workers.
* :class:`TensorBatches`: for a small :class:`~miles.data.MultimodalDataset` held in memory, the
  whole split is collated *once* (sequences padded to the longest) and every batch is cut from it
  with ``index_select``, instead of building and collating one item at a time. It draws the same
  random numbers as a ``DataLoader`` (one seed per epoch, then the sampler's permutation), so a
  run gives the same numbers on either path.

:func:`build_loader` picks the path: ``"auto"`` uses :class:`TensorBatches` where it applies
(a ``MultimodalDataset`` or ``Subset`` of one, :func:`~miles.data.collate_multimodal`, no
workers) and a ``DataLoader`` otherwise.
"""

from __future__ import annotations

import random
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    Subset,
)

from miles.validation import check_choice

__all__ = ["LOADERS", "TensorBatches", "build_loader", "seed_worker"]

#: ``loader`` settings: ``auto`` indexes in-memory tensors where it can, else a DataLoader
LOADERS = ("auto", "dataloader", "tensor")

#: a padded copy may be at most this many times the size of the split it pads (else: DataLoader)
MAX_PADDING_GROWTH = 4.0


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed Python's and NumPy's generators from the worker's torch seed.

    The ``DataLoader`` derives each worker's torch seed from a number it draws from the loader's
    generator every epoch; the run's generator is saved in its checkpoints, so random
    augmentations in workers (with any of the three generators) replay exactly on resume.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    try:
        import numpy as np
    except ModuleNotFoundError:  # pragma: no cover - numpy comes with the train extra
        return
    np.random.seed(seed)


class _Table:
    """A whole in-memory split collated once: inputs (sequences padded), lengths, targets."""

    def __init__(self, batch: dict[str, Any], sequences: Sequence[str]) -> None:
        self.inputs: dict[str, Tensor] = batch["inputs"]
        self.lengths: dict[str, Tensor] = batch["lengths"]
        self.target: Tensor = batch["target"]
        self.sequences = tuple(sequences)

    def nbytes(self) -> int:
        tensors = [*self.inputs.values(), *self.lengths.values(), self.target]
        return sum(t.numel() * t.element_size() for t in tensors)

    def batch(self, rows: Tensor) -> dict[str, Any]:
        """The rows ``rows`` as ``collate_multimodal`` would build them."""
        inputs: dict[str, Tensor] = {}
        lengths: dict[str, Tensor] = {}
        for name, values in self.inputs.items():
            if name in self.lengths:
                lengths[name] = self.lengths[name].index_select(0, rows)
                longest = int(lengths[name].max()) if rows.numel() else 0
                values = values[:, :longest]  # collate pads to the batch's longest
            inputs[name] = values.index_select(0, rows)
        return {"inputs": inputs, "lengths": lengths, "target": self.target.index_select(0, rows)}


#: tables built so far, per in-memory dataset (several loaders share a split's table)
_TABLES: weakref.WeakKeyDictionary[Any, _Table | None] = weakref.WeakKeyDictionary()


def _root(dataset: Dataset) -> tuple[Any, list[int] | None]:
    """The dataset under any ``Subset`` wrappers and the indices into it (``None``: all)."""
    indices: list[int] | None = None
    while isinstance(dataset, Subset):
        inner = [int(i) for i in dataset.indices]
        indices = inner if indices is None else [inner[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def _table(dataset: Any) -> _Table | None:
    """The collated split of a plain ``MultimodalDataset`` (``None`` where indexing cannot give
    exactly what ``collate_multimodal`` gives, or the padding would be too large)."""
    from miles.data.base import MultimodalDataset, collate_multimodal

    if type(dataset) is not MultimodalDataset or len(dataset) == 0:
        return None  # a subclass may transform items in __getitem__
    if dataset in _TABLES:
        return _TABLES[dataset]
    items = [dataset[i] for i in range(len(dataset))]
    table: _Table | None = _Table(collate_multimodal(items), dataset.sequence_modalities)
    assert table is not None
    # a modality padded without declaring lengths gets them only in batches whose items differ
    undeclared = set(table.lengths) - set(dataset.sequence_modalities)
    raw = sum(x.numel() * x.element_size() for item in items for x in item["inputs"].values())
    if undeclared or table.nbytes() > MAX_PADDING_GROWTH * max(raw, 1) + 2**20:
        table = None
    _TABLES[dataset] = table
    return table


class TensorBatches:
    """Batches of an in-memory split cut from tensors: a drop-in for the trainer's DataLoader.

    It exposes what code reading a loader uses (``dataset``, ``batch_size``, ``collate_fn``,
    ``num_workers``, ``pin_memory``, ``sampler``, ``generator``, ``len``), and draws the same
    random numbers in the same order as a ``DataLoader`` over the same sampler.
    """

    num_workers = 0

    def __init__(
        self,
        dataset: Dataset,
        table: _Table,
        indices: list[int] | None,
        *,
        batch_size: int,
        sampler: Sampler[int],
        generator: torch.Generator | None,
        collate_fn: Callable[[list[Any]], Any] | None,
        pin_memory: bool = False,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.sampler = sampler
        self.generator = generator
        self.collate_fn = collate_fn
        self.pin_memory = pin_memory
        self._table = table
        self._rows = None if indices is None else torch.tensor(indices, dtype=torch.long)
        self._batches = BatchSampler(sampler, batch_size, drop_last=False)

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # a DataLoader draws its workers' base seed from its generator when an epoch starts
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        return self._epoch()

    def _epoch(self) -> Iterator[dict[str, Any]]:
        for positions in self._batches:
            rows = torch.tensor(positions, dtype=torch.long)
            if self._rows is not None:
                rows = self._rows.index_select(0, rows)
            batch = self._table.batch(rows)
            yield _pinned(batch) if self.pin_memory else batch


def _pinned(batch: dict[str, Any]) -> dict[str, Any]:
    return {
        "inputs": {m: x.pin_memory() for m, x in batch["inputs"].items()},
        "lengths": batch["lengths"],
        "target": batch["target"].pin_memory(),
    }


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    sampler: Sampler[int] | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    mode: str = "auto",
) -> DataLoader | TensorBatches:
    """The trainer's loader for ``dataset``: see the module docstring for ``mode``."""
    from miles.data.base import collate_multimodal

    check_choice("loader", mode, LOADERS)
    table = None
    if mode != "dataloader" and collate_fn is collate_multimodal and num_workers == 0:
        root, indices = _root(dataset)
        table = _table(root)
    if table is None:
        if mode == "tensor":
            raise ValueError(
                "loader 'tensor' needs an in-memory MultimodalDataset (or a Subset of one), "
                "collate_multimodal and num_workers 0; use loader 'auto' or 'dataloader'"
            )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle if sampler is None else False,
            sampler=sampler,
            generator=generator,
            collate_fn=collate_fn,
            num_workers=num_workers,
            pin_memory=pin_memory,
            worker_init_fn=seed_worker if num_workers > 0 else None,
        )
    if sampler is None:
        n = len(dataset)  # type: ignore[arg-type]
        sampler = (
            RandomSampler(range(n), generator=generator) if shuffle else SequentialSampler(range(n))
        )
    return TensorBatches(
        dataset,
        table,
        indices,
        batch_size=batch_size,
        sampler=sampler,
        generator=generator,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
    )
