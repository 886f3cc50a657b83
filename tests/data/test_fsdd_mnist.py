"""FSDD-MNIST on the real packaged data: pairing, split, preprocessing, errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from miles.data import DatasetSplits, build_dataset, collate_multimodal, fsdd_mnist

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def splits() -> DatasetSplits:
    return build_dataset("fsdd-mnist")


@pytest.fixture(scope="module")
def raw() -> dict[str, np.ndarray]:
    return fsdd_mnist.load_raw()


def test_raw_files(raw: dict[str, np.ndarray]) -> None:
    assert raw["audio_frames"].shape == (53999, 13)
    assert raw["audio_offsets"][-1] == 53999 and len(raw["audio_offsets"]) == 3001
    assert raw["image_pixels"].shape == (5000, 784) and raw["image_pixels"].max() == 255
    assert Counter(raw["audio_labels"].tolist()) == dict.fromkeys(range(10), 300)
    assert Counter(raw["image_labels"].tolist()) == dict.fromkeys(range(10), 500)


def test_metadata(splits: DatasetSplits) -> None:
    assert splits.modalities == ("audio", "image")
    assert splits.num_classes == 10 and not splits.multilabel and splits.metric == "accuracy"
    assert splits.info["name"] == "fsdd-mnist"
    assert splits.info["sizes"] == {"train": 2100, "val": 450, "test": 450}
    assert "speaker" in splits.info["notes"] and "NOT speaker-disjoint" in splits.info["notes"]
    assert splits.info["data_seed"] == 0


def test_sizes_and_stratification(splits: DatasetSplits) -> None:
    for split, per_class in zip(SPLITS, (210, 45, 45), strict=True):
        ds = getattr(splits, split)
        assert len(ds) == per_class * 10
        assert ds.modalities == ("audio", "image") and ds.sequence_modalities == ("audio",)
        assert Counter(ds.targets.tolist()) == dict.fromkeys(range(10), per_class)


def test_pairing_labels_distinct_images_disjoint_clips(raw: dict[str, np.ndarray]) -> None:
    pairing = fsdd_mnist.make_pairing(raw["audio_labels"], raw["image_labels"], 0)
    clips = np.concatenate([pairing[s][0] for s in SPLITS])
    images = np.concatenate([pairing[s][1] for s in SPLITS])
    assert len(clips) == 3000 and len(np.unique(clips)) == 3000  # no clip in two splits
    assert len(np.unique(images)) == 3000  # no MNIST row used twice
    assert np.array_equal(raw["audio_labels"][clips], raw["image_labels"][images])


def test_dataset_content_matches_pairing(splits: DatasetSplits, raw: dict[str, np.ndarray]) -> None:
    pairing = fsdd_mnist.make_pairing(raw["audio_labels"], raw["image_labels"], 0)
    offsets = raw["audio_offsets"]
    for split in SPLITS:
        ds = getattr(splits, split)
        clips, images = pairing[split]
        assert np.array_equal(ds.targets.numpy(), raw["image_labels"][images])
        for i in (0, 1, len(ds) - 1):
            item = ds[i]
            expected = raw["image_pixels"][images[i]].reshape(1, 28, 28) / 255.0
            assert np.allclose(item["inputs"]["image"].numpy(), expected)
            assert item["inputs"]["audio"].shape[0] == offsets[clips[i] + 1] - offsets[clips[i]]


def test_determinism_and_seed_dependence(raw: dict[str, np.ndarray]) -> None:
    a = fsdd_mnist.make_pairing(raw["audio_labels"], raw["image_labels"], 0)
    b = fsdd_mnist.make_pairing(raw["audio_labels"], raw["image_labels"], 0)
    c = fsdd_mnist.make_pairing(raw["audio_labels"], raw["image_labels"], 1)
    for s in SPLITS:
        assert all(np.array_equal(x, y) for x, y in zip(a[s], b[s], strict=True))
    assert not np.array_equal(a["test"][0], c["test"][0])
    assert not np.array_equal(a["train"][1], c["train"][1])


def test_build_is_deterministic_per_data_seed(splits: DatasetSplits) -> None:
    again = build_dataset("fsdd-mnist", data_seed=0)
    other = build_dataset("fsdd-mnist", data_seed=1)
    assert torch.equal(again.test.targets, splits.test.targets)
    assert torch.equal(again.val[7]["inputs"]["image"], splits.val[7]["inputs"]["image"])
    assert torch.equal(again.val[7]["inputs"]["audio"], splits.val[7]["inputs"]["audio"])
    first = [ds.test[i]["inputs"]["image"] for ds in (other, splits) for i in range(10)]
    assert not torch.equal(torch.stack(first[:10]), torch.stack(first[10:]))
    assert other.info["data_seed"] == 1


def test_preprocessing_and_train_only_stats(
    splits: DatasetSplits, raw: dict[str, np.ndarray]
) -> None:
    train = torch.cat([splits.train[i]["inputs"]["audio"] for i in range(len(splits.train))])
    assert train.dtype == torch.float32 and train.shape[1] == 13
    assert torch.allclose(train.mean(0), torch.zeros(13), atol=1e-4)
    assert torch.allclose(train.std(0, unbiased=False), torch.ones(13), atol=1e-4)
    # the statistics come from train frames only: rebuild val audio from the raw frames
    pairing = fsdd_mnist.make_pairing(raw["audio_labels"], raw["image_labels"], 0)
    off = raw["audio_offsets"]
    frames = raw["audio_frames"].astype(np.float64)
    train_frames = np.concatenate([frames[off[i] : off[i + 1]] for i in pairing["train"][0]])
    mean, std = train_frames.mean(0), train_frames.std(0)
    clip = pairing["val"][0][3]
    expected = (frames[off[clip] : off[clip + 1]] - mean) / std
    assert np.allclose(splits.val[3]["inputs"]["audio"].numpy(), expected, atol=1e-5)
    val = torch.cat([splits.val[i]["inputs"]["audio"] for i in range(len(splits.val))])
    assert not torch.allclose(val.mean(0), torch.zeros(13), atol=1e-4)  # not re-standardised

    image = splits.test[0]["inputs"]["image"]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    images = torch.stack([splits.train[i]["inputs"]["image"] for i in range(50)])
    assert images.min() >= 0 and images.max() <= 1 and images.max() > 0.9
    assert splits.train[0]["target"].dtype == torch.int64


def test_collate_and_encoders(splits: DatasetSplits) -> None:
    batch = collate_multimodal([splits.train[i] for i in range(8)])
    lengths = batch["lengths"]["audio"]
    assert lengths.dtype == torch.long and lengths.shape == (8,)
    audio = batch["inputs"]["audio"]
    assert audio.shape == (8, int(lengths.max()), 13)
    for i in range(8):
        assert torch.equal(audio[i, : lengths[i]], splits.train[i]["inputs"]["audio"])
        assert torch.all(audio[i, lengths[i] :] == 0)
    assert batch["inputs"]["image"].shape == (8, 1, 28, 28)
    assert batch["target"].shape == (8,) and batch["target"].dtype == torch.int64

    torch.manual_seed(0)
    encoders = splits.build_encoders(24)
    assert list(encoders) == ["audio", "image"]
    assert encoders["audio"](audio, lengths).shape == (8, 24)
    assert encoders["image"](batch["inputs"]["image"]).shape == (8, 24)
    assert all(e.out_features == 24 for e in encoders.values())


def test_max_train_is_stratified() -> None:
    small = build_dataset("fsdd-mnist", max_train=25)
    assert len(small.train) == 25 and len(small.val) == 450 and len(small.test) == 450
    counts = Counter(small.train.targets.tolist())
    assert len(counts) == 10 and max(counts.values()) - min(counts.values()) <= 1
    train = torch.cat([small.train[i]["inputs"]["audio"] for i in range(25)])
    assert torch.allclose(train.mean(0), torch.zeros(13), atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"data_seed": -1}, ValueError),
        ({"data_seed": 1.5}, TypeError),
        ({"data_seed": True}, TypeError),
        ({"max_train": 0}, ValueError),
    ],
)
def test_bad_kwargs(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error, match=next(iter(kwargs))):
        build_dataset("fsdd-mnist", **kwargs)
