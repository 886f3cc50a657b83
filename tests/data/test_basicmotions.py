"""BasicMotions: the .ts parser, the official split plus a seeded validation slice, errors."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from miles.data import DatasetSplits, basicmotions, build_dataset, collate_multimodal
from miles.training.experiment import ExperimentConfig, run_experiment
from miles.training.trainer import TrainerConfig

TINY = """#A comment line
@problemName Tiny
@timeStamps false
@univariate false
@dimensions 2
@equalLength true
@seriesLength 3
@classLabel true up down

@data
1,2,3:4,5,6:up
0.5,-1e-3,7:8,9,10.25:down
"""


@pytest.fixture(scope="module")
def splits() -> DatasetSplits:
    return build_dataset("basicmotions")


def test_read_ts_tiny_file(tmp_path: Path) -> None:
    path = tmp_path / "tiny.ts"
    path.write_text(TINY)
    values, labels = basicmotions.read_ts(path)
    assert values.dtype == np.float32 and values.shape == (2, 3, 2)
    assert labels == ["up", "down"]
    assert values[0, :, 0].tolist() == [1, 2, 3] and values[0, :, 1].tolist() == [4, 5, 6]
    assert np.allclose(values[1, :, 0], [0.5, -1e-3, 7]) and values[1, 2, 1] == 10.25


@pytest.mark.parametrize(
    ("bad_line", "match"),
    [
        ("1,2,3:up", "expected 2 dimensions"),
        ("1,2,3:4,5:up", "must have 3 values"),
        ("1,2,x:4,5,6:up", "not a number"),
        ("1,2,3:4,5,6:sideways", "class label 'sideways'"),
        ("no-colon-here", "dimension and a label"),
    ],
)
def test_read_ts_malformed_line_names_file_and_line(
    tmp_path: Path, bad_line: str, match: str
) -> None:
    path = tmp_path / "broken.ts"
    path.write_text(TINY + bad_line + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 13: ") + ".*" + match):
        basicmotions.read_ts(path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("@problemName X\n", "no '@data'"),
        ("@data\n", "no cases"),
        ("@dimensions two\n@data\n1:a\n", "@dimensions must be an integer"),
        ("@timeStamps true\n@data\n", "line 1: time-stamped"),
        ("1,2:a\n", "line 1: expected a '@' header"),
    ],
)
def test_read_ts_bad_structure(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "odd.ts"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        basicmotions.read_ts(path)


def test_raw_files() -> None:
    raw = basicmotions.load_raw()
    for split in ("train", "test"):
        values, labels = raw[split]
        assert values.shape == (40, 100, 6) and values.dtype == np.float32
        assert Counter(labels.tolist()) == dict.fromkeys(range(4), 10)


def test_metadata_sizes_and_counts(splits: DatasetSplits) -> None:
    assert splits.modalities == ("accel", "gyro")
    assert splits.num_classes == 4 and not splits.multilabel and splits.metric == "accuracy"
    assert splits.info["sizes"] == {"train": 32, "val": 8, "test": 40}
    assert splits.info["classes"] == ["Badminton", "Running", "Standing", "Walking"]
    assert basicmotions.INSTALL_COMMAND in str(splits.info["source"])
    for name, per_class in (("train", 8), ("val", 2), ("test", 10)):
        ds = getattr(splits, name)
        assert Counter(ds.targets.tolist()) == dict.fromkeys(range(4), per_class)
        assert ds.sequence_modalities == ("accel", "gyro")


def test_split_is_a_seeded_partition_of_official_train(splits: DatasetSplits) -> None:
    labels = basicmotions.load_raw()["train"][1]
    a, b, c = (basicmotions.make_split(labels, s) for s in (0, 0, 5))
    assert np.array_equal(a["val"], b["val"]) and np.array_equal(a["train"], b["train"])
    assert sorted(np.concatenate([a["train"], a["val"]]).tolist()) == list(range(40))
    assert not np.array_equal(np.sort(a["val"]), np.sort(c["val"]))
    other = build_dataset("basicmotions", data_seed=5)
    assert other.info["data_seed"] == 5
    assert torch.equal(other.test.targets, splits.test.targets)  # official test: no seed
    again = build_dataset("basicmotions", data_seed=0)
    assert torch.equal(again.val[3]["inputs"]["gyro"], splits.val[3]["inputs"]["gyro"])


def test_train_only_standardisation_and_shapes(splits: DatasetSplits) -> None:
    raw = basicmotions.load_raw()["train"][0].astype(np.float64)
    index = basicmotions.make_split(basicmotions.load_raw()["train"][1], 0)
    flat = raw[index["train"]].reshape(-1, 6)
    mean, std = flat.mean(0), flat.std(0)
    for modality, dims in basicmotions.MODALITY_DIMS.items():
        train = torch.stack([splits.train[i]["inputs"][modality] for i in range(32)])
        assert train.shape == (32, 100, 3) and train.dtype == torch.float32
        per_channel = train.reshape(-1, 3)
        assert torch.allclose(per_channel.mean(0), torch.zeros(3), atol=1e-4)
        assert torch.allclose(per_channel.std(0, unbiased=False), torch.ones(3), atol=1e-4)
        expected = (raw[index["val"][1]][:, list(dims)] - mean[list(dims)]) / std[list(dims)]
        assert np.allclose(splits.val[1]["inputs"][modality].numpy(), expected, atol=1e-5)
    test_raw = basicmotions.load_raw()["test"][0].astype(np.float64)
    expected = (test_raw[0][:, :3] - mean[:3]) / std[:3]
    assert np.allclose(splits.test[0]["inputs"]["accel"].numpy(), expected, atol=1e-5)
    assert splits.test[0]["target"].dtype == torch.int64


def test_collate_and_encoders(splits: DatasetSplits) -> None:
    batch = collate_multimodal([splits.train[i] for i in range(5)])
    for modality in ("accel", "gyro"):
        assert batch["inputs"][modality].shape == (5, 100, 3)
        assert batch["lengths"][modality].tolist() == [100] * 5
    torch.manual_seed(0)
    encoders = splits.build_encoders(6)
    for modality, enc in encoders.items():
        out = enc(batch["inputs"][modality], batch["lengths"][modality])
        assert out.shape == (5, 6)


@pytest.mark.parametrize(("seed", "error"), [(-1, ValueError), (0.5, TypeError), (True, TypeError)])
def test_bad_data_seed(seed: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="data_seed"):
        build_dataset("basicmotions", data_seed=seed)


def test_one_epoch_run(tmp_path: Path) -> None:
    cfg = ExperimentConfig(
        dataset="basicmotions",
        latent_dim=8,
        strategy="miles",
        trainer=TrainerConfig(epochs=1, batch_size=16, progress=False),
        out_dir=str(tmp_path),
    )
    result = run_experiment(cfg)
    assert result.extra["modalities"] == ["accel", "gyro"]
    assert result.test is not None and 0.0 <= result.test["fused"] <= 1.0
    assert (tmp_path / "result.json").is_file()
