"""S-MNIST preparer on a miniature copy of the Zenodo release written in its six-.npy layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from miles.data.prepare import RawDataError, RawItem, prepare, verify
from miles.data.prepared import PreparedDataset
from miles.data.smnist import (
    FILES,
    SMNISTPreparer,
    build_encoders,
    build_smnist,
    mfcc_to_image,
    select_samples,
)
from miles.models.resnet import ResNet

DUP_ROWS = (3, 10, 25)  # one utterance duplicated three times in the train part


def _make_raw(tmp_path: Path, n_train: int = 40, n_test: int = 12) -> Path:
    """Images as float64 0..255 (row index in pixel 0), MFCCs float32 (N, 507), int labels."""
    rng = np.random.default_rng(7)
    raw = tmp_path / "raw"
    raw.mkdir(parents=True)
    for part, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) * 3) % 10
        images = rng.integers(0, 256, size=(n, 784)).astype(np.float64)
        images[:, 0] = np.arange(n)
        audio = rng.normal(size=(n, 507)).astype(np.float32)
        if part == "train":
            for row in DUP_ROWS[1:]:
                audio[row] = audio[DUP_ROWS[0]]
                labels[row] = labels[DUP_ROWS[0]]
        wr, sp, lab = FILES[part]
        np.save(raw / wr, images)
        np.save(raw / sp, audio)
        np.save(raw / lab, labels.astype(np.int64))
    return raw


def _prep(raw: Path, out: Path, **options: Any) -> dict[str, Any]:
    options.setdefault("sizes", [16, 4, 4])  # the paper's 8,000 / 2,000 / 2,000 divided by 500
    return prepare(SMNISTPreparer(**options), raw, out, progress=False, chunk=8)


def _rows(manifest: dict[str, Any], out: Path, split: str) -> list[tuple[str, int]]:
    idx = json.loads((out / "splits.json").read_text())[split]
    keys = [manifest["keys"][i] for i in idx]
    return [(k.split("/")[0], int(k.split("/")[1])) for k in keys]


def test_select_samples_scaled_sizes_and_no_shared_utterance() -> None:
    train = ["u0", "u1", "u1", "u2", "u3", "u3", "u3", *[f"s{i}" for i in range(13)]]  # 20 rows
    test = [f"t{i}" for i in range(8)] + ["u2"]  # "u2" also occurs in the train part
    for mode, units in (("one", 17), ("group", 20)):
        for seed in range(5):
            got = select_samples(train, test, (0.5, 0.25, 1.0), seed=seed, duplicates=mode)
            # fractions of the train part, rounded half up (prepare.resolve_split_counts)
            assert len(got["train"]) == (units + 1) // 2
            assert len(got["val"]) == int(units / 4 + 0.5)
            groups = {s: {(test if s == "test" else train)[i] for i in got[s]} for s in got}
            assert not groups["train"] & groups["val"] and not groups["test"] & groups["train"]
            assert not groups["test"] & groups["val"]
            if mode == "one":  # one row per utterance
                assert len(groups["train"]) == len(got["train"])
            assert got == select_samples(train, test, (0.5, 0.25, 1.0), seed=seed, duplicates=mode)
    counts = select_samples(train, test, (8, 2, 2), seed=1)
    assert [len(counts[s]) for s in ("train", "val", "test")] == [8, 2, 2]
    assert counts != select_samples(train, test, (8, 2, 2), seed=2)
    with pytest.raises(ValueError, match="cannot fill 30 train"):
        select_samples(train, test, (30, 2, 2))
    with pytest.raises(ValueError, match="fraction"):
        select_samples(train, test, (1.5, 2, 2))
    with pytest.raises(ValueError, match="more than 1"):
        select_samples(train, test, (0.75, 0.5, 2))
    # ties never overfill the part: 0.5 + 0.5 of 17 units is 9 + 8
    both = select_samples(train, test, (0.5, 0.5, 1), seed=0)
    assert (len(both["train"]), len(both["val"])) == (9, 8)


def test_mfcc_to_image_modes() -> None:
    const = np.full((39, 13), 2.5)
    assert np.allclose(mfcc_to_image(const, "resize"), 2.5)
    ramp = np.tile(np.arange(39.0)[:, None], (1, 13))  # time increases down the rows
    resized = mfcc_to_image(ramp, "resize")
    assert resized.shape == (28, 28) and resized.dtype == np.float32
    assert np.all(np.diff(resized[:, 0]) > 0)  # rows stay time
    mfcc = np.arange(507.0).reshape(39, 13)
    padded = mfcc_to_image(mfcc, "pad")
    assert np.array_equal(padded[:, 7:20], mfcc[5:33]) and not padded[:, :7].any()
    assert not padded[:, 20:].any()
    reshaped = mfcc_to_image(mfcc, "reshape").reshape(-1)
    assert np.array_equal(reshaped[:507], mfcc.reshape(-1)) and not reshaped[507:].any()
    with pytest.raises(ValueError, match="audio_to_image"):
        mfcc_to_image(mfcc, "tile")


@pytest.mark.parametrize("duplicates", ["group", "one"])
def test_prepare_reads_pairs_labels_and_keeps_duplicates_in_one_split(
    tmp_path: Path, duplicates: str
) -> None:
    raw = _make_raw(tmp_path)
    out = tmp_path / "cache"
    # every train utterance is selected, so the duplicated one must be placed somewhere
    manifest = _prep(raw, out, duplicates=duplicates, sizes=[0.5, 0.5, 4])
    half = 20 if duplicates == "group" else 19  # 40 rows / 38 distinct utterances
    assert manifest["sizes"] == {"train": half, "val": half, "test": 4}
    assert manifest["modalities"] == ["image", "audio"] and manifest["skipped"] == {}
    verify(out)
    images = np.load(raw / "data_wr_train.npy")
    audio = np.load(raw / "data_sp_train.npy")
    labels = {p: np.load(raw / FILES[p][2]) for p in FILES}
    dup_splits = []
    for split in ("train", "val", "test"):
        ds = PreparedDataset(out, split)
        rows = _rows(manifest, out, split)
        assert len(ds) == len(rows)
        for j, (part, row) in enumerate(rows):
            assert part == ("test" if split == "test" else "train")
            item = ds[j]
            img, aud = item["inputs"]["image"], item["inputs"]["audio"]
            assert img.shape == aud.shape == (1, 28, 28)
            assert img.dtype == aud.dtype == torch.float32 and item["target"].dtype == torch.int64
            assert int(item["target"]) == labels[part][row]
            assert float(img[0, 0, 0]) == pytest.approx(row / 255.0)  # the paired image
            assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
            if part == "train":
                expected = mfcc_to_image(audio[row].reshape(39, 13), "resize")
                torch.testing.assert_close(aud[0], torch.from_numpy(expected))
                torch.testing.assert_close(
                    img[0].flatten(), torch.tensor(images[row] / 255.0).float()
                )
                if row in DUP_ROWS:
                    dup_splits.append(split)
    assert len(set(dup_splits)) == 1  # the duplicated utterance never crosses splits
    assert len(dup_splits) == (3 if duplicates == "group" else 1)


def test_fractions_standardize_and_builder(tmp_path: Path) -> None:
    raw = _make_raw(tmp_path)
    out = tmp_path / "cache"
    # 38 distinct train utterances -> 19 / 10 (9.5 rounds half up); 12 test rows -> 6
    manifest = _prep(
        raw, out, sizes=[0.5, 0.25, 0.5], audio_norm="standardize", audio_to_image="reshape"
    )
    assert manifest["sizes"] == {"train": 19, "val": 10, "test": 6}
    train_audio = np.load(out / "audio.npy")[json.loads((out / "splits.json").read_text())["train"]]
    mfcc = train_audio.reshape(len(train_audio), -1)[:, :507].reshape(-1, 39, 13)
    assert np.allclose(mfcc.mean(axis=(0, 1)), 0.0, atol=1e-5)
    assert np.allclose(mfcc.std(axis=(0, 1)), 1.0, atol=1e-4)

    splits = build_smnist(out, check=True)
    assert splits.modalities == ("image", "audio") and splits.num_classes == 10
    assert splits.metric == "accuracy" and not splits.multilabel
    assert splits.info["options"]["audio_norm"] == "standardize"
    encoders = splits.build_encoders(32)
    batch = torch.stack([splits.train[i]["inputs"]["image"] for i in range(2)])
    for name, enc in encoders.items():
        assert enc.out_features == 32
        assert enc(batch).shape == (2, 32), name
    plain = build_encoders(512, stem="small")
    assert isinstance(plain["audio"].backbone, ResNet) and plain["audio"].out_features == 512
    assert isinstance(plain["audio"].proj, torch.nn.Identity)  # no projection at the native width
    assert plain["image"](batch).shape == (2, 512)


class _Interrupting(SMNISTPreparer):
    def __init__(self, fail_at: int | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.fail_at, self.calls = fail_at, 0

    def process(self, item: RawItem) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt
        return super().process(item)


def test_resume_and_cache_reuse(tmp_path: Path) -> None:
    raw = _make_raw(tmp_path)
    opts: dict[str, Any] = {"sizes": [16, 4, 4]}
    with pytest.raises(KeyboardInterrupt):
        prepare(_Interrupting(fail_at=11, **opts), raw, tmp_path / "out", progress=False, chunk=8)
    again = _Interrupting(**opts)
    manifest = prepare(again, raw, tmp_path / "out", progress=False, chunk=8)
    assert manifest["sizes"] == {"train": 16, "val": 4, "test": 4}
    assert again.calls == 24 - 8  # one chunk of 8 was committed before the interruption
    prepare(SMNISTPreparer(**opts), raw, tmp_path / "ref", progress=False, chunk=8)
    for name in ("image.npy", "audio.npy", "labels.npy", "splits.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    done = _Interrupting(**opts)
    prepare(done, raw, tmp_path / "out", progress=False)
    assert done.calls == 0  # cached
    with pytest.raises(ValueError, match="other settings"):
        prepare(SMNISTPreparer(audio_to_image="pad", **opts), raw, tmp_path / "out", progress=False)


def test_missing_truncated_and_corrupt_files_name_the_file(tmp_path: Path) -> None:
    raw = _make_raw(tmp_path)
    (raw / "labels_test.npy").rename(tmp_path / "moved.npy")
    with pytest.raises(RawDataError, match=r"missing labels_test\.npy.*data_wr_train\.npy"):
        _prep(raw, tmp_path / "a")
    (tmp_path / "moved.npy").rename(raw / "labels_test.npy")
    data = (raw / "data_sp_train.npy").read_bytes()
    (raw / "data_sp_train.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(RawDataError, match=r"data_sp_train\.npy: not a readable \.npy"):
        _prep(raw, tmp_path / "b")
    (raw / "data_sp_train.npy").write_bytes(b"garbage" * 20)
    with pytest.raises(RawDataError, match=r"data_sp_train\.npy"):
        _prep(raw, tmp_path / "c")
    (raw / "data_sp_train.npy").write_bytes(data)
    np.save(raw / "data_wr_test.npy", np.zeros((11, 784)))
    with pytest.raises(RawDataError, match=r"data_wr_test\.npy: has 11 rows but labels_test"):
        _prep(raw, tmp_path / "d")


def test_bad_rows_stop_with_file_and_row_or_are_skipped(tmp_path: Path) -> None:
    raw = _make_raw(tmp_path, n_test=8)
    labels = np.load(raw / "labels_test.npy")
    labels[2] = 12
    np.save(raw / "labels_test.npy", labels)
    audio = np.load(raw / "data_sp_test.npy")
    audio[5, 100] = np.nan
    np.save(raw / "data_sp_test.npy", audio)
    opts = {"sizes": [16, 4, 1.0]}  # every test row is selected
    with pytest.raises(RawDataError, match=r"labels_test\.npy row 2: label 12\.0 is not a digit"):
        _prep(raw, tmp_path / "strict", **opts)
    manifest = prepare(
        SMNISTPreparer(**opts), raw, tmp_path / "lenient", skip_bad=True, progress=False
    )
    assert sorted(manifest["skipped"]) == ["test/00002", "test/00005"]
    assert "data_sp_test.npy row 5" in manifest["skipped"]["test/00005"]
    assert manifest["sizes"]["test"] == 6
    # copies of one utterance with different labels: the pairing cannot be trusted
    raw2 = _make_raw(tmp_path / "two")
    labels = np.load(raw2 / "labels_train.npy")
    labels[DUP_ROWS[1]] = (labels[DUP_ROWS[0]] + 1) % 10
    np.save(raw2 / "labels_train.npy", labels)
    with pytest.raises(RawDataError, match=r"data_sp_train\.npy row \d+: the same utterance"):
        _prep(raw2, tmp_path / "conflict", sizes=[1.0, 0, 4])


def test_image_scale_decides_per_file_and_refuses_mixed_floats(tmp_path: Path) -> None:
    raw = _make_raw(tmp_path)
    wr = raw / FILES["train"][0]
    images = np.load(wr)
    np.save(wr, images / 255.0)  # a 0..1 float file: kept as is
    out = tmp_path / "unit"
    _prep(raw, out, sizes=[4, 2, 2])
    row = _rows(json.loads((out / "manifest.json").read_text()), out, "train")[0][1]
    assert np.load(out / "image.npy")[0, 0].max() == pytest.approx(images[row].max() / 255.0)
    mixed = images / 255.0
    mixed[5] = images[5]  # one row in 0..255 among 0..1 rows: must not darken all the others
    np.save(wr, mixed)
    with pytest.raises(RawDataError, match="ambiguous") as info:
        _prep(raw, tmp_path / "mixed", sizes=[4, 2, 2])
    assert info.value.path == str(wr)
    _prep(raw, tmp_path / "forced", sizes=[4, 2, 2], image_scale=255)  # the user decides
    np.save(wr, images.astype(np.uint8))  # integers are 0..255 whatever their values
    _prep(raw, tmp_path / "ints", sizes=[4, 2, 2])
    assert 0.0 <= np.load(tmp_path / "ints" / "image.npy").max() <= 1.0
    with pytest.raises(ValueError, match="image_scale"):
        SMNISTPreparer(image_scale=100)


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="audio_to_image"):
        SMNISTPreparer(audio_to_image="stretch")
    with pytest.raises(ValueError, match="sizes"):
        SMNISTPreparer(sizes=[1, 2])
    with pytest.raises(ValueError, match="data_seed"):
        SMNISTPreparer(data_seed=-1)
    with pytest.raises(ValueError, match="latent_dim"):
        build_encoders(0)
