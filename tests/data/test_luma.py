"""LUMA on a miniature raw copy in the release's layout and formats (WAV, CSV, CIFAR pickles)."""

from __future__ import annotations

import csv
import importlib.util
import json
import pickle
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from miles.data import luma
from miles.data.base import MissingDataPackageError
from miles.data.prepare import RawDataError, RawItem, prepare
from miles.data.prepared import PreparedDataset

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100 = ["apple", "aquarium_fish", "man", "bear", *(f"other_{i:02d}" for i in range(96))]
#: red-channel code per CIFAR class in the fixture, to check labels against pixels
CODE = {"dog": 10, "cat": 20, "aquarium_fish": 30, "man": 40, "bear": 50, "airplane": 60}
LUMA_NAME = {"aquarium_fish": "fish"}
#: images (CIFAR-10 train, CIFAR-10 test) or (CIFAR-100 train, test) and clips per class
IMAGES = {"dog": (6, 2), "cat": (5, 2), "aquarium_fish": (5, 2), "man": (6, 2), "bear": (1, 1)}
CLIPS = {"dog": 7, "cat": 6, "fish": 8, "man": 2, "bear": 6}
SMALL = {"per_class": 6, "min_per_class": 6, "split_sizes": [12, 3, 3]}


def _image(name: str, serial: int) -> np.ndarray:
    img = np.zeros((3, 32, 32), dtype=np.uint8)
    img[0], img[1] = CODE[name], serial
    return img.reshape(-1)


def _dump(path: Path, obj: dict[bytes, Any]) -> None:
    with path.open("wb") as fh:
        pickle.dump(obj, fh, protocol=2)  # bytes keys, as the Python 2 originals unpickle


def make_raw(root: Path, clips: dict[str, int] = CLIPS) -> Path:
    """A miniature LUMA ``data/`` folder: CIFAR python archives + audio/datalist.csv + WAVs."""
    raw = root / "data"
    c10, c100 = raw / luma.CIFAR10_DIR, raw / luma.CIFAR100_DIR
    c10.mkdir(parents=True)
    c100.mkdir()
    serial = 0
    parts: dict[str, list[tuple[np.ndarray, int]]] = {k: [] for k in ("tr10", "te10", "tr", "te")}
    for name, (n_train, n_test) in [*IMAGES.items(), ("airplane", (2, 1))]:
        ten = name in CIFAR10
        label = CIFAR10.index(name) if ten else CIFAR100.index(name)
        for part, n in (("tr10" if ten else "tr", n_train), ("te10" if ten else "te", n_test)):
            for _ in range(n):
                serial += 1
                parts[part].append((_image(name, serial), label))

    def batch(rows: list[tuple[np.ndarray, int]], field: bytes) -> dict[bytes, Any]:
        data = np.stack([r[0] for r in rows]) if rows else np.zeros((0, 3072), np.uint8)
        return {b"data": data, field: [r[1] for r in rows], b"batch_label": b"x"}

    train10 = parts["tr10"]
    for i in range(5):  # spread CIFAR-10 train images over the five batch files
        _dump(c10 / f"data_batch_{i + 1}", batch(train10[i::5], b"labels"))
    _dump(c10 / "test_batch", batch(parts["te10"], b"labels"))
    _dump(c10 / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10]})
    _dump(c100 / "train", batch(parts["tr"], b"fine_labels"))
    _dump(c100 / "test", batch(parts["te"], b"fine_labels"))
    _dump(c100 / "meta", {b"fine_label_names": [n.encode() for n in CIFAR100]})

    audio = raw / "audio"
    rows = []
    freq = {"dog": 300.0, "cat": 600.0, "fish": 900.0, "man": 1200.0, "bear": 1500.0}
    for word, n in clips.items():
        folder = audio / "cv_audio" / word
        folder.mkdir(parents=True)
        for k in range(n):
            sr = 8000 if k % 2 else 22050  # mixed rates, as the three corpora are
            t = np.arange(int(sr * (0.3 + 0.1 * k))) / sr
            sf.write(folder / f"{word}_{k}.wav", 0.5 * np.sin(2 * np.pi * freq[word] * t), sr)
            rows.append(
                {"path": f"cv_audio/{word}/{word}_{k}.wav", "label": word, "tts_label": word}
            )
    with (audio / "datalist.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "tts_label"])
        writer.writeheader()
        writer.writerows(rows)
    return raw


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    return make_raw(tmp_path)


def small(**kw: Any) -> luma.LumaPreparer:
    return luma.LumaPreparer(**{**SMALL, "image_parts": ["train", "test"], **kw})


def test_scan_filters_balances_and_pairs_by_class(raw: Path) -> None:
    prep = small()
    items = prep.scan(raw)
    # man: 2 clips, bear: 2 images -> below 6; kept classes in LUMA's class-id order
    assert prep.classes == ["dog", "fish", "cat"]
    assert Counter(it.label for it in items) == {0: 6, 1: 6, 2: 6}
    for it in items:
        name = prep.classes[it.label]
        assert it.key.startswith(f"{name}_")
        assert Path(it.files["audio"]).parent.name == name  # clip of the same class
        assert Path(it.files["audio"]).is_file()
    assert len({it.group for it in items}) == 18  # no clip used twice
    pairs = {(str(it.files["image"]), it.meta["image_index"]) for it in items}
    assert len(pairs) == 18  # no image used twice
    again = small().scan(raw)
    assert [(i.key, i.files, i.meta) for i in again] == [(i.key, i.files, i.meta) for i in items]
    other = small(seed=1).scan(raw)
    assert [i.files for i in other] != [i.files for i in items]


def test_prepare_shapes_dtypes_labels_and_scaled_splits(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    manifest = prepare(small(), raw, out, progress=False)
    assert manifest["sizes"] == {"train": 12, "val": 3, "test": 3}
    audio = np.load(out / "audio.npy", mmap_mode="r")
    image = np.load(out / "image.npy", mmap_mode="r")
    assert audio.shape == (18, 1, 96, 96) and audio.dtype == np.float32
    assert image.shape == (18, 3, 96, 96) and image.dtype == np.uint8
    assert np.isfinite(audio).all()
    labels = np.load(out / "labels.npy")
    classes = ["dog", "aquarium_fish", "cat"]
    for i, label in enumerate(labels.tolist()):  # constant 32x32 images stay constant
        assert (image[i, 0] == CODE[classes[label]]).all()
    splits = json.loads((out / "splits.json").read_text())
    for part, n in (("val", 1), ("test", 1), ("train", 4)):  # stratified: per class
        assert Counter(labels[splits[part]].tolist()) == dict.fromkeys(range(3), n)

    data = luma.build_luma(out)
    assert data.num_classes == 3 and data.metric == "accuracy" and not data.multilabel
    assert data.modalities == ("audio", "image") and data.info["classes"] == ["dog", "fish", "cat"]
    assert (len(data.train), len(data.val), len(data.test)) == (12, 3, 3)
    item = data.train[0]
    assert item["inputs"]["audio"].shape == (1, 96, 96)
    assert item["inputs"]["image"].dtype == torch.uint8
    torch.manual_seed(0)
    encoders = data.build_encoders(16)
    batch = [data.train[i] for i in range(3)]
    for m, enc in encoders.items():
        x = torch.stack([b["inputs"][m] for b in batch])
        z = enc(x)
        assert z.shape == (3, 16) and enc.out_features == 16
        z.sum().backward()
    assert luma.build_encoders(128)["image"].proj.__class__ is torch.nn.Identity


def test_split_sizes_scale_counts_and_fractions() -> None:
    # the paper's 22 x 1,500 -> 25,000 / 4,000 / 4,000, scaled down 100x: 22 x 15 -> 250 / 40 / 40
    labels = [c for c in range(22) for _ in range(15)]
    groups = [f"clip{i}" for i in range(len(labels))]
    split = luma.stratified_split(labels, groups, [250, 40, 40], seed=0)
    assert {k: len(v) for k, v in split.items()} == {"train": 250, "val": 40, "test": 40}
    assert sorted(split["train"] + split["val"] + split["test"]) == list(range(330))
    arr = np.asarray(labels)
    for part in ("val", "test"):
        assert set(Counter(arr[split[part]].tolist()).values()) <= {1, 2}
    assert luma.stratified_split(labels, groups, [250, 40, 40], seed=0) == split
    by_fraction = luma.stratified_split(labels, groups, [25 / 33, 4 / 33, 4 / 33], seed=0)
    assert {k: len(v) for k, v in by_fraction.items()} == {"train": 250, "val": 40, "test": 40}
    assert luma.resolve_split_sizes([25000, 4000, 4000], 33000)["train"] == 25000
    with pytest.raises(ValueError, match="sum to 330, but there are 331 samples"):
        luma.resolve_split_sizes([250, 40, 40], 331)
    # the shared rule (prepare.resolve_split_counts): val/test rounded half up, not banker's
    assert luma.resolve_split_sizes([0.5, 0.25, 0.25], 18) == {"train": 8, "val": 5, "test": 5}


def test_split_keeps_reused_clips_together_where_possible() -> None:
    labels = [0] * 8 + [1] * 8
    groups = [f"a{i // 2}" for i in range(8)] + [f"b{i // 2}" for i in range(8)]
    split = luma.stratified_split(labels, groups, [8, 4, 4], seed=3)
    part_of = {i: p for p, idx in split.items() for i in idx}
    for g in set(groups):
        assert len({part_of[i] for i, h in enumerate(groups) if h == g}) == 1


def test_reuse_audio_keeps_classes_with_few_clips(raw: Path) -> None:
    prep = small(reuse_audio=True, split_sizes=[16, 4, 4])
    items = prep.scan(raw)
    assert prep.classes == ["man", "dog", "fish", "cat"]
    man_clips = Counter(it.group for it in items if it.label == 0)
    assert sorted(man_clips.values()) == [3, 3]
    split = prep.split(items)
    assert {k: len(v) for k, v in split.items()} == {"train": 16, "val": 4, "test": 4}


def test_split_counts_must_match_the_selection(raw: Path) -> None:
    with pytest.raises(ValueError, match="18 pairs were selected"):
        small(split_sizes=[20, 3, 3]).scan(raw)
    with pytest.raises(ValueError, match="min_per_class"):
        luma.LumaPreparer(per_class=10, min_per_class=5)
    split = small(split_sizes=[0.5, 0.25, 0.25]).split(small().scan(raw))
    assert {k: len(v) for k, v in split.items()} == {"train": 8, "val": 5, "test": 5}


def test_cache_is_reused_and_resumes_after_interruption(
    raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    original = luma.LumaPreparer.process

    def counting(self: luma.LumaPreparer, item: RawItem) -> dict[str, np.ndarray]:
        calls["n"] += 1
        if calls["n"] == getattr(self, "fail_at", -1):
            raise KeyboardInterrupt
        return original(self, item)

    monkeypatch.setattr(luma.LumaPreparer, "process", counting)
    interrupted = small()
    interrupted.fail_at = 11  # type: ignore[attr-defined]
    with pytest.raises(KeyboardInterrupt):
        prepare(interrupted, raw, tmp_path / "out", progress=False, chunk=4)
    assert json.loads((tmp_path / "out" / "progress.json").read_text())["done"] == 8
    calls["n"] = 0
    prepare(small(), raw, tmp_path / "out", progress=False, chunk=4)
    assert calls["n"] == 18 - 8  # only the rest was decoded
    prepare(small(), raw, tmp_path / "ref", progress=False)
    for name in ("audio.npy", "image.npy", "labels.npy", "splits.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    calls["n"] = 0
    prepare(small(), raw, tmp_path / "out", progress=False)
    assert calls["n"] == 0  # finished cache: nothing decoded
    with pytest.raises(ValueError, match="other settings"):
        prepare(small(audio_fit="resize"), raw, tmp_path / "out", progress=False)
    luma.build_luma(tmp_path / "out", check=True)  # checksums verify


def test_kept_classes_come_from_the_manifest_not_the_keys(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    manifest = prepare(small(), raw, out, progress=False)
    assert manifest["extra"] == {"classes": ["dog", "fish", "cat"]}
    path = out / "manifest.json"
    stored = json.loads(path.read_text())
    stored["keys"] = [f"renamed_key_{i}" for i in range(len(stored["keys"]))]  # keys say nothing
    path.write_text(json.dumps(stored))
    assert luma.build_luma(out).info["classes"] == ["dog", "fish", "cat"]
    del stored["extra"]
    path.write_text(json.dumps(stored))
    with pytest.raises(ValueError, match="no kept class list"):
        luma.build_luma(out)


def test_raw_image_files_are_cached_per_preparer_and_version(raw: Path) -> None:
    prep = small()
    items = prep.scan(raw)
    item = next(it for it in items if Path(it.files["image"]).parent.name == luma.CIFAR10_DIR)
    path = Path(item.files["image"])
    before = prep.process(item)["image"]
    assert any(key[1] == str(path) for key in prep._raw_cache)
    assert not small()._raw_cache  # nothing process-wide: a new preparer starts empty
    batch = pickle.loads(path.read_bytes())
    batch[b"data"] = 255 - batch[b"data"]  # the file changes on disk (size/mtime differ)
    batch[b"batch_label"] = b"changed"
    _dump(path, batch)
    after = prep.process(item)["image"]
    assert (after == 255 - before).all()  # read again, not the stale copy


def test_unknown_class_name_names_the_csv(raw: Path) -> None:
    path = raw / "audio" / "datalist.csv"
    path.write_text(path.read_text() + "cv_audio/dog/dog_0.wav,doge,doge\n")
    with pytest.raises(RawDataError, match=r"datalist\.csv: line \d+: unknown class name 'doge'"):
        small().scan(raw)


def test_missing_files_are_listed(raw: Path) -> None:
    (raw / luma.CIFAR100_DIR / "test").unlink()
    with pytest.raises(RawDataError, match=r"cifar-100-python/test: missing.*audio/datalist\.csv"):
        small().scan(raw)
    with pytest.raises(RawDataError, match=r"edm_images\.pickle"):
        luma.LumaPreparer(**SMALL).scan(raw)  # default image_parts include the generated images


def test_corrupt_cifar_archive_is_named(raw: Path) -> None:
    path = raw / luma.CIFAR10_DIR / "data_batch_3"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(RawDataError, match=r"data_batch_3: unreadable CIFAR archive"):
        small().scan(raw)


def test_truncated_wav_is_named_or_skipped(raw: Path, tmp_path: Path) -> None:
    items = small().scan(raw)
    bad = Path(items[7].files["audio"])
    bad.write_bytes(bad.read_bytes()[:-200])
    with pytest.raises(RawDataError, match=rf"{bad.name}: truncated WAV"):
        prepare(small(), raw, tmp_path / "a", progress=False)
    manifest = prepare(small(), raw, tmp_path / "b", progress=False, skip_bad=True)
    assert list(manifest["skipped"]) == [items[7].key]
    assert sum(manifest["sizes"].values()) == 17
    skipped = manifest["keys"].index(items[7].key)
    splits = json.loads((tmp_path / "b" / "splits.json").read_text())
    assert all(skipped not in idx for idx in splits.values())
    assert sum(len(PreparedDataset(tmp_path / "b", s)) for s in splits) == 17


def test_generated_images_count_toward_the_threshold(
    raw: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (raw / luma.EDM_FILE).write_bytes(b"stand-in: the reader is replaced below")
    hwc = np.zeros((6, 32, 32, 3), dtype=np.uint8)
    hwc[..., 0] = 77
    labels: list[Any] = ["bear"] * 5 + [CIFAR100.index("bear")]  # names or CIFAR-100 indices
    monkeypatch.setattr(luma, "_read_edm", lambda path: (hwc, labels))
    prep = luma.LumaPreparer(**{**SMALL, "split_sizes": [16, 4, 4]})
    items = prep.scan(raw)
    assert prep.classes == ["dog", "fish", "cat", "bear"]  # bear: 2 CIFAR + 6 generated images
    bear = [it for it in items if it.label == 3]
    assert sum(Path(it.files["image"]).name == luma.EDM_FILE for it in bear) >= 4
    edm_item = next(it for it in bear if Path(it.files["image"]).name == luma.EDM_FILE)
    assert (prep.process(edm_item)["image"][0] == 77).all()  # HWC turned into CHW


def test_generated_images_need_pandas(raw: Path) -> None:
    if importlib.util.find_spec("pandas") is None:
        (raw / luma.EDM_FILE).write_bytes(b"\x80\x04.")
        with pytest.raises(MissingDataPackageError, match="pandas"):
            luma.LumaPreparer(**SMALL).scan(raw)
        return
    import pandas as pd  # the release's real format

    images = [np.full((32, 32, 3), 5, np.uint8)] * 6
    pd.DataFrame({"image": images, "label": ["bear"] * 6}).to_pickle(raw / luma.EDM_FILE)
    prep = luma.LumaPreparer(**{**SMALL, "split_sizes": [16, 4, 4]})
    prep.scan(raw)
    assert "bear" in prep.classes


def test_audio_features_fit_modes() -> None:
    t = np.arange(8000 * 2) / 8000  # 2 s: longer than the 0.95 s window
    wave = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    pad = luma.audio_features(wave, 8000)
    resized = luma.audio_features(wave[:1000], 8000, audio_fit="resize")
    assert pad.shape == resized.shape == (1, 96, 96) and pad.dtype == np.float32
    assert np.isfinite(pad).all() and np.isfinite(resized).all()
    with pytest.raises(ValueError, match="audio_fit"):
        luma.audio_features(wave, 8000, audio_fit="stretch")
