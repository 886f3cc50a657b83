"""Batches from in-memory tensors and from DataLoaders (with or without workers) are the same,
bit for bit, and so are the runs trained on them; resuming with workers is exact."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from miles.data import DatasetSplits, MultimodalDataset, build_dataset, collate_multimodal
from miles.data.prepared import PreparedDataset
from miles.models import JointFusionModel
from miles.models.encoders import MLPEncoder, SequenceEncoder
from miles.strategies import build_strategy
from miles.training import Trainer, TrainerConfig
from miles.training.loaders import TensorBatches, build_loader
from tests.conftest import make_toy_splits
from tests.helpers import interrupted_after, same_weights, strip_times
from tests.miniature import build_miniature


def _sequences(n: int, seed: int) -> MultimodalDataset:
    """A variable-length sequence modality (declared), a fixed-size one and class targets."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (n,), generator=g).tolist()
    y = torch.randint(0, 3, (n,), generator=g)
    audio = [torch.randn(t, 5, generator=g) + y[i] for i, t in enumerate(lengths)]
    image = torch.randn(n, 6, generator=g) + y[:, None]
    return MultimodalDataset({"audio": audio, "image": image}, y, sequence_modalities={"audio"})


def _sequence_splits() -> DatasetSplits:
    def encoders(latent: int) -> dict[str, torch.nn.Module]:
        return {"audio": SequenceEncoder(5, latent, hidden=8), "image": MLPEncoder(6, latent)}

    return DatasetSplits(
        train=_sequences(48, 1),
        val=_sequences(16, 2),
        test=_sequences(16, 3),
        modalities=("audio", "image"),
        num_classes=3,
        multilabel=False,
        metric="accuracy",
        info={"name": "sequences"},
        build_encoders=encoders,
    )


def _same_batch(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def same(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> bool:
        return list(x) == list(y) and all(
            x[k].dtype == y[k].dtype and x[k].shape == y[k].shape and torch.equal(x[k], y[k])
            for k in x
        )

    return (
        same(a["inputs"], b["inputs"])
        and same(a["lengths"], b["lengths"])
        and torch.equal(a["target"], b["target"])
        and all(x.is_contiguous() for x in a["inputs"].values())
    )


@pytest.mark.parametrize("shuffle", [True, False])
def test_tensor_batches_are_the_dataloaders_batches(shuffle: bool) -> None:
    dataset = _sequences(50, 0)
    nested = Subset(Subset(dataset, list(range(3, 48))), [int(i) for i in range(40, 0, -3)])
    for source in (dataset, nested):
        settings: dict[str, Any] = {"batch_size": 8, "shuffle": shuffle}
        if shuffle:
            g_loader, g_tensor = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        else:
            g_loader = g_tensor = None
        loader = DataLoader(source, generator=g_loader, collate_fn=collate_multimodal, **settings)
        tensors = build_loader(
            source, generator=g_tensor, collate_fn=collate_multimodal, **settings
        )
        assert isinstance(tensors, TensorBatches) and len(tensors) == len(loader)
        for _ in range(2):  # two epochs: the same random draws in the same order
            torch.manual_seed(0)
            expected = list(loader)
            rng_after_loader = torch.get_rng_state()
            torch.manual_seed(0)
            got = list(tensors)
            assert torch.equal(torch.get_rng_state(), rng_after_loader)
            assert len(got) == len(expected)
            assert all(_same_batch(a, b) for a, b in zip(got, expected, strict=True))
        if g_loader is not None:
            assert torch.equal(g_loader.get_state(), g_tensor.get_state())  # type: ignore[union-attr]


class _Shifted(MultimodalDataset):
    """A subclass may change items in __getitem__: never cut from a cached table."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        item["target"] = item["target"] + 0
        return item


def test_where_the_tensor_path_does_not_apply() -> None:
    dataset = _sequences(20, 0)
    assert isinstance(build_loader(dataset, batch_size=4, collate_fn=None), DataLoader)
    assert isinstance(
        build_loader(dataset, batch_size=4, collate_fn=collate_multimodal, num_workers=1),
        DataLoader,
    )
    assert isinstance(
        build_loader(dataset, batch_size=4, collate_fn=collate_multimodal, mode="dataloader"),
        DataLoader,
    )
    shifted = _Shifted({"x": torch.randn(6, 2)}, torch.zeros(6, dtype=torch.long))
    assert isinstance(
        build_loader(shifted, batch_size=4, collate_fn=collate_multimodal), DataLoader
    )
    # a list modality of varying length without declared lengths: collate pads it per batch
    varying = MultimodalDataset({"x": [torch.randn(t, 2) for t in (1, 2, 3)]}, torch.zeros(3))
    assert isinstance(
        build_loader(varying, batch_size=2, collate_fn=collate_multimodal), DataLoader
    )
    with pytest.raises(ValueError, match="loader 'tensor' needs an in-memory MultimodalDataset"):
        build_loader(varying, batch_size=2, collate_fn=collate_multimodal, mode="tensor")


def _fit(data: DatasetSplits, epochs: int = 3, **settings: Any) -> tuple[Any, JointFusionModel]:
    out_dir, resume = settings.pop("out_dir", None), settings.pop("resume", False)
    torch.manual_seed(0)
    model = JointFusionModel(data.build_encoders(8), data.num_classes)
    cfg = TrainerConfig(
        **{"epochs": epochs, "lr": 1e-2, "batch_size": 16, "progress": False, **settings}
    )
    strategy = build_strategy("miles", tau=0.05)
    trainer = Trainer(model, strategy, cfg, out_dir=out_dir, collate_fn=collate_multimodal)
    return trainer.fit(data.train, data.val, data.test, resume=resume), model


def test_runs_are_the_same_on_either_loader() -> None:
    data = _sequence_splits()
    tensors, m_tensors = _fit(data, epochs=2, loader="tensor")
    loader, m_loader = _fit(data, epochs=2, loader="dataloader")
    assert strip_times(tensors.history) == strip_times(loader.history)
    assert tensors.test == loader.test and same_weights(m_tensors, m_loader)


def test_the_demo_data_gives_the_same_run_on_either_loader() -> None:
    """FSDD-MNIST (padded MFCC sequences + images): the demo's numbers do not depend on it."""
    data = build_dataset("fsdd-mnist", max_train=96)
    tensors, m_tensors = _fit(data, epochs=1, loader="auto")
    loader, m_loader = _fit(data, epochs=1, loader="dataloader")
    assert strip_times(tensors.history) == strip_times(loader.history)
    assert tensors.test == loader.test and same_weights(m_tensors, m_loader)


def test_workers_give_the_same_run_and_resume_exactly(tmp_path: Path) -> None:
    data = make_toy_splits(n=(64, 32, 32))
    plain, m_plain = _fit(data, epochs=2)
    workers, m_workers = _fit(data, epochs=2, num_workers=2)
    assert strip_times(workers.history) == strip_times(plain.history)
    assert same_weights(m_plain, m_workers)
    with interrupted_after(1):
        _fit(data, epochs=2, num_workers=2, out_dir=tmp_path)
    resumed, m_resumed = _fit(data, epochs=2, num_workers=2, out_dir=tmp_path, resume=True)
    assert strip_times(resumed.history) == strip_times(plain.history)
    assert same_weights(m_plain, m_resumed)


class _Noisy(Dataset[dict[str, Any]]):
    """Items drawn from Python's and NumPy's generators, as a random augmentation would."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict[str, Any]:
        noise = torch.tensor([random.random(), float(np.random.rand())])
        return {"inputs": {"x": noise}, "target": torch.tensor(index)}


def test_workers_are_seeded_from_the_loaders_generator() -> None:
    def epochs(seed: int) -> list[torch.Tensor]:
        loader = build_loader(
            _Noisy(),
            batch_size=4,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            collate_fn=collate_multimodal,
            num_workers=2,
        )
        assert isinstance(loader, DataLoader)
        return [torch.cat([b["inputs"]["x"] for b in loader]) for _ in range(2)]

    first, again, other = epochs(0), epochs(0), epochs(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[1])  # each epoch seeds its workers anew
    assert not torch.equal(first[0], other[0])


def test_prepared_dataset_with_workers(tmp_path: Path) -> None:
    data = build_miniature("smnist", tmp_path)
    assert isinstance(data.train, PreparedDataset)

    def batches(workers: int) -> list[dict[str, Any]]:
        loader = build_loader(
            data.train,
            batch_size=2,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
            collate_fn=collate_multimodal,
            num_workers=workers,
        )
        assert isinstance(loader, DataLoader)  # memory-mapped: never a tensor table
        return list(loader)

    plain, workers = batches(0), batches(2)
    assert all(_same_batch(a, b) for a, b in zip(workers, plain, strict=True))
