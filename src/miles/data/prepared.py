"""Reading a cache written by :func:`miles.data.prepare.prepare` as torch Datasets.

Arrays are opened with ``mmap_mode="r"`` on first access in each process (so DataLoader workers
each map the files instead of pickling arrays), and a sample is copied out only when asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from miles.data.base import DatasetSplits
from miles.data.prepare import LABELS, SPLIT_NAMES, SPLITS, read_manifest, verify
from miles.fileio import DamagedFileError, read_json


class PreparedDataset(Dataset[dict[str, Any]]):
    """One split of a prepared cache; items are ``{"inputs": {m: Tensor}, "target": Tensor}``."""

    def __init__(
        self, root: Path | str, split: str, *, modalities: Sequence[str] | None = None
    ) -> None:
        self.root = Path(root)
        if split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
        self.manifest = read_manifest(self.root)
        available = list(self.manifest["modalities"])
        chosen = list(modalities) if modalities is not None else available
        unknown = [m for m in chosen if m not in available]
        if unknown:
            raise ValueError(f"modalities {unknown} not in the cache; it has {available}")
        self._modalities = tuple(chosen)
        splits = read_json(
            self.root / SPLITS,
            what="the cache's split",
            advice=f"check it with `miles prepare` into a new folder (or delete {self.root} first)",
        )
        if not isinstance(splits.get(split), list):
            raise DamagedFileError(self.root / SPLITS, f"the cache's split lacks {split!r}")
        self.indices = np.asarray(splits[split], dtype=np.int64)
        self._arrays: dict[str, np.ndarray] | None = None

    @property
    def modalities(self) -> tuple[str, ...]:
        return self._modalities

    def _open(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            arrays = {m: np.load(self.root / f"{m}.npy", mmap_mode="r") for m in self._modalities}
            arrays[LABELS] = np.load(self.root / LABELS, mmap_mode="r")
            self._arrays = arrays
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = None  # each worker maps the files itself
        return state

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        arrays = self._open()
        j = int(self.indices[index])
        inputs = {m: torch.from_numpy(np.array(arrays[m][j])) for m in self._modalities}
        return {"inputs": inputs, "target": torch.from_numpy(np.array(arrays[LABELS][j]))}

    @property
    def targets(self) -> Tensor:
        return torch.from_numpy(np.array(self._open()[LABELS][self.indices]))


def prepared_splits(
    root: Path | str,
    *,
    num_classes: int,
    multilabel: bool,
    metric: str,
    build_encoders: Callable[[int], dict[str, nn.Module]],
    modalities: Sequence[str] | None = None,
    check: bool = False,
    info: dict[str, Any] | None = None,
) -> DatasetSplits:
    """Train/val/test over a prepared cache; ``check=True`` re-hashes every file first."""
    if check:
        verify(root)
    parts = {s: PreparedDataset(root, s, modalities=modalities) for s in SPLIT_NAMES}
    manifest = parts["train"].manifest
    return DatasetSplits(
        train=parts["train"],  # type: ignore[arg-type]
        val=parts["val"],  # type: ignore[arg-type]
        test=parts["test"],  # type: ignore[arg-type]
        modalities=parts["train"].modalities,
        num_classes=num_classes,
        multilabel=multilabel,
        metric=metric,
        info={
            "name": manifest["dataset"],
            "sizes": manifest["sizes"],
            "options": manifest["options"],
            "skipped": len(manifest["skipped"]),
            **(info or {}),
        },
        build_encoders=build_encoders,
    )
