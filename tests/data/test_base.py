"""MultimodalDataset, collate_multimodal and the dataset registry."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from miles.data import registry
from miles.data.base import DatasetSplits, MultimodalDataset, collate_multimodal


def _dataset(lengths: list[int] = [3, 5, 2, 5]) -> MultimodalDataset:  # noqa: B006
    n = len(lengths)
    seqs = [torch.full((t, 4), float(i + 1)) for i, t in enumerate(lengths)]
    image = torch.arange(n * 6, dtype=torch.float32).reshape(n, 2, 3)
    return MultimodalDataset(
        {"seq": seqs, "image": image},
        torch.arange(n, dtype=torch.long),
        sequence_modalities={"seq"},
    )


def test_dataset_basics() -> None:
    ds = _dataset()
    assert len(ds) == 4
    assert ds.modalities == ("seq", "image")
    assert ds.sequence_modalities == ("seq",)
    item = ds[1]
    assert set(item) == {"inputs", "target", "lengths"}
    assert item["inputs"]["seq"].shape == (5, 4)
    assert item["inputs"]["image"].shape == (2, 3)
    assert item["lengths"] == {"seq": 5}
    assert int(item["target"]) == 1


def test_dataset_without_sequences_has_no_lengths_in_items() -> None:
    ds = MultimodalDataset({"x": torch.zeros(3, 2)}, torch.zeros(3, 5))  # multilabel targets
    assert "lengths" not in ds[0]
    assert ds[0]["target"].shape == (5,)


def test_dataset_length_mismatch_names_modality() -> None:
    with pytest.raises(ValueError, match="'image'"):
        MultimodalDataset(
            {"audio": torch.zeros(4, 2), "image": torch.zeros(3, 2)},
            torch.zeros(4, dtype=torch.long),
        )
    with pytest.raises(ValueError, match="'audio'"):
        MultimodalDataset({"audio": [torch.zeros(2, 2)] * 5}, torch.zeros(4, dtype=torch.long))


def test_dataset_rejects_bad_sequence_modalities() -> None:
    with pytest.raises(ValueError, match="nope"):
        MultimodalDataset({"x": torch.zeros(2, 3)}, torch.zeros(2), sequence_modalities=["nope"])
    with pytest.raises(ValueError, match="'x'"):
        MultimodalDataset({"x": torch.zeros(2, 3)}, torch.zeros(2), sequence_modalities=["x"])


def test_subset_keeps_order_and_sequences() -> None:
    ds = _dataset()
    sub = ds.subset([3, 0])
    assert len(sub) == 2
    assert sub.sequence_modalities == ("seq",)
    assert sub[0]["target"].item() == 3 and sub[1]["target"].item() == 0
    assert torch.equal(sub[0]["inputs"]["image"], ds[3]["inputs"]["image"])
    assert sub[1]["lengths"] == {"seq": 3}
    assert len(ds.subset(torch.tensor([], dtype=torch.long))) == 0
    with pytest.raises(IndexError):
        ds.subset([4])


def test_collate_stacks_and_pads() -> None:
    ds = _dataset()
    batch = collate_multimodal([ds[i] for i in range(4)])
    assert batch["inputs"]["image"].shape == (4, 2, 3)
    seq = batch["inputs"]["seq"]
    assert seq.shape == (4, 5, 4)
    assert torch.equal(batch["lengths"]["seq"], torch.tensor([3, 5, 2, 5]))
    assert batch["lengths"]["seq"].dtype == torch.long
    assert "image" not in batch["lengths"]
    # valid frames kept, padding is zero
    assert torch.all(seq[0, :3] == 1) and torch.all(seq[0, 3:] == 0)
    assert torch.all(seq[2, :2] == 3) and torch.all(seq[2, 2:] == 0)
    assert torch.equal(batch["target"], torch.arange(4))


def test_collate_reports_lengths_even_when_equal() -> None:
    ds = _dataset([4, 4])
    batch = collate_multimodal([ds[0], ds[1]])
    assert batch["inputs"]["seq"].shape == (2, 4, 4)
    assert torch.equal(batch["lengths"]["seq"], torch.tensor([4, 4]))


def test_collate_pads_undeclared_variable_items() -> None:
    items = [{"inputs": {"x": torch.ones(t, 2)}, "target": torch.tensor(0)} for t in (1, 3)]
    batch = collate_multimodal(items)
    assert batch["inputs"]["x"].shape == (2, 3, 2)
    assert torch.equal(batch["lengths"]["x"], torch.tensor([1, 3]))


def test_collate_errors() -> None:
    bad = [
        {"inputs": {"audio": torch.zeros(3, 4)}, "target": torch.tensor(0)},
        {"inputs": {"audio": torch.zeros(3, 5)}, "target": torch.tensor(1)},
    ]
    with pytest.raises(ValueError, match="'audio'"):
        collate_multimodal(bad)
    with pytest.raises(ValueError, match="empty"):
        collate_multimodal([])


def test_works_with_dataloader() -> None:
    ds = _dataset()
    loader = DataLoader(ds, batch_size=2, collate_fn=collate_multimodal)
    batches = list(loader)
    assert len(batches) == 2
    assert torch.equal(batches[1]["lengths"]["seq"], torch.tensor([2, 5]))


def test_registry_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry._DATASETS, "_items", dict(registry._DATASETS._items))

    def builder(**kwargs: object) -> DatasetSplits:
        raise AssertionError("not called")

    registry.register_dataset("toy-test")(builder)
    assert "toy-test" in registry.available_datasets()
    with pytest.raises(ValueError, match="already registered"):
        registry.register_dataset("toy-test")(builder)
    with pytest.raises(ValueError, match="fsdd-mnist") as err:
        registry.build_dataset("does-not-exist")
    assert "does-not-exist" in str(err.value)


def test_registry_builds_with_kwargs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry._DATASETS, "_items", {})
    seen: dict[str, object] = {}

    @registry.register_dataset("toy")
    def toy(size: int = 2) -> DatasetSplits:
        seen["size"] = size
        ds = MultimodalDataset({"x": torch.zeros(size, 1)}, torch.zeros(size, dtype=torch.long))
        return DatasetSplits(ds, ds, ds, ("x",), 1, False, "accuracy", {}, lambda d: {})

    splits = registry.build_dataset("toy", size=3)
    assert seen == {"size": 3} and len(splits.train) == 3
    assert registry.available_datasets() == ["toy"]
