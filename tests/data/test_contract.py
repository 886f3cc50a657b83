"""One contract every registered dataset meets, checked the same way for all of them.

Each dataset is built offline: from the data packages the test environment installs, or, for the
paper's datasets that read a prepared cache, from a miniature cache (:mod:`tests.miniature`). A
dataset registered by the library without an entry in ``HOW_TO_BUILD`` fails the coverage test:
a new dataset adds a line here.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

from miles.data import DatasetSplits, available_datasets, build_dataset, collate_multimodal
from miles.data.registry import dataset_builder
from miles.metrics import METRICS
from miles.models import JointFusionModel
from tests.helpers import assert_table_covers_library
from tests.miniature import build_miniature

LATENT = 6
BATCH = 3


def _offline(**params: Any) -> Callable[[str, Path], DatasetSplits]:
    """Built from the installed data package, with small sizes where the builder has them."""
    return lambda name, tmp_path: build_dataset(name, **params)


def _prepared(name: str, tmp_path: Path) -> DatasetSplits:
    """Built from a miniature prepared cache (the same one the paper-config tests use)."""
    return build_miniature(name, tmp_path)


#: how each registered dataset is built in a test, and what it needs installed beyond the core
HOW_TO_BUILD: dict[str, tuple[Callable[[str, Path], DatasetSplits], tuple[str, ...]]] = {
    "fsdd-mnist": (_offline(max_train=20), ()),
    "fsdd-mnist-regime": (_offline(max_train=20, image_noise=0.3), ()),
    "basicmotions": (_offline(), ()),
    "mfeat": (_offline(), ()),
    "mfeat-3view": (_offline(), ()),
    "mfeat-pix-fou": (_offline(), ()),
    "imdb-genres": (_offline(max_samples=40), ()),
    "cremad": (_prepared, ()),
    "smnist": (_prepared, ()),
    "luma": (_prepared, ()),
    "mmimdb": (_prepared, ("transformers", "PIL")),
}


def test_every_registered_dataset_has_an_entry() -> None:
    """Datasets the library registers (not ones a test or plugin adds) must be in the table."""
    modules = {n: dataset_builder(n).__module__ for n in available_datasets()}
    assert_table_covers_library("datasets", modules, HOW_TO_BUILD, __file__)


@pytest.fixture(params=sorted(HOW_TO_BUILD))
def built(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, DatasetSplits]:
    name: str = request.param
    build, needs = HOW_TO_BUILD[name]
    absent = [m for m in needs if importlib.util.find_spec(m) is None]
    if absent:
        pytest.skip(f"{name}: the miniature cache (tests.miniature) needs {absent} installed")
    return name, build(name, tmp_path)


def test_splits_are_complete_and_named(built: tuple[str, DatasetSplits]) -> None:
    name, data = built
    assert isinstance(data, DatasetSplits)
    for split in (data.train, data.val, data.test):
        assert isinstance(split, Dataset) and len(split) > 0  # type: ignore[arg-type]
    assert isinstance(data.modalities, tuple) and len(data.modalities) >= 2
    assert all(isinstance(m, str) and m and "." not in m for m in data.modalities)
    assert len(set(data.modalities)) == len(data.modalities)
    assert isinstance(data.num_classes, int) and data.num_classes >= 2
    assert isinstance(data.multilabel, bool)
    assert data.metric in METRICS
    assert isinstance(data.info, dict)
    sample = data.train[0]
    assert set(sample["inputs"]) == set(data.modalities), name


def test_encoders_declare_the_latent_size(built: tuple[str, DatasetSplits]) -> None:
    _, data = built
    encoders = data.build_encoders(LATENT)
    assert list(encoders) == list(data.modalities)
    assert all(enc.out_features == LATENT for enc in encoders.values())


def test_a_collated_batch_goes_through_the_model(built: tuple[str, DatasetSplits]) -> None:
    _, data = built
    torch.manual_seed(0)
    model = JointFusionModel(data.build_encoders(LATENT), data.num_classes)
    model.eval()
    size = min(BATCH, len(data.train))  # type: ignore[arg-type]
    batch = collate_multimodal([data.train[i] for i in range(size)])
    with torch.no_grad():
        out = model(batch["inputs"], batch["lengths"] or None)
    assert out.fused.shape == (size, data.num_classes)
    assert all(out.unimodal[m].shape == (size, data.num_classes) for m in data.modalities)
    assert all(out.latents[m].shape == (size, LATENT) for m in data.modalities)
    assert torch.isfinite(out.fused).all()
    target = batch["target"]
    expected = (size, data.num_classes) if data.multilabel else (size,)
    assert tuple(target.shape) == expected
