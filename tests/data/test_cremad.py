"""CREMA-D: a miniature raw copy in the official layout (real WAV and FLV files) end to end."""

from __future__ import annotations

import json
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from miles.data import cremad
from miles.data.audio import fit_length, log_spectrogram, resize_2d
from miles.data.cremad import (
    EMOTIONS,
    CremadPreparer,
    build_cremad,
    build_encoders,
    parse_name,
    split_counts,
    split_indices,
)
from miles.data.prepare import (
    RawDataError,
    RawItem,
    prepare,
    resolve_split_counts,
    verify,
)
from miles.data.prepared import PreparedDataset
from miles.data.registry import build_dataset
from tests.data.test_audio_video import COLOURS, nearest_colour, truncate_after_packet, write_flv

SR = 16000
# (actor, sentence, emotion, level, seconds, frames): 3 actors, all 6 emotions, clips shorter and
# longer than 3 s, one at 8 kHz (resampled), one with an even frame count.
CLIPS = [
    ("1001", "DFA", "ANG", "XX", 0.5, 5),
    ("1001", "IEO", "DIS", "LO", 3.5, 5),
    ("1001", "IOM", "FEA", "XX", 1.2, 4),
    ("1001", "ITH", "HAP", "XX", 2.0, 5),
    ("1002", "ITS", "NEU", "XX", 3.0, 5),
    ("1002", "IWL", "SAD", "XX", 2.5, 5),
    ("1002", "IWW", "ANG", "HI", 1.0, 3),
    ("1002", "MTI", "DIS", "XX", 0.8, 5),
    ("1003", "TAI", "FEA", "XX", 3.2, 5),
    ("1003", "TIE", "HAP", "MD", 1.5, 5),
    ("1003", "TSI", "NEU", "XX", 2.2, 5),
    ("1003", "WSI", "SAD", "XX", 0.7, 5),
]
SMALL = {"spectrogram_size": 32, "image_size": 16}


def stem(clip: tuple[Any, ...]) -> str:
    return "_".join(clip[:4])


def make_raw(root: Path, clips: list[tuple[Any, ...]] = CLIPS) -> Path:
    (root / "AudioWAV").mkdir(parents=True)
    (root / "VideoFlash").mkdir()
    (root / "AudioMP3").mkdir()  # present in the official repo, ignored
    rng = np.random.default_rng(0)
    for i, clip in enumerate(clips):
        sr = 8000 if i == 3 else SR
        noise = (rng.standard_normal(round(clip[4] * sr)) * 0.1).astype(np.float32)
        sf.write(root / "AudioWAV" / f"{stem(clip)}.wav", noise, sr, subtype="PCM_16")
        colours = [COLOURS[(i + k) % len(COLOURS)] for k in range(clip[5])]
        rate = Fraction(clip[5]) / Fraction(str(clip[4]))  # the video lasts as long as the WAV
        write_flv(root / "VideoFlash" / f"{stem(clip)}.flv", colours, rate=rate)
    return root


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_raw(tmp_path_factory.mktemp("cremad") / "CREMA-D")


@pytest.fixture(scope="module")
def cache(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "cremad"
    prepare(CremadPreparer(), raw, out, progress=False, chunk=4)
    return out


# ----------------------------------------------------------------------------- pure functions


def test_parse_name() -> None:
    assert parse_name("1001_DFA_ANG_XX") == ("1001", "DFA", "ANG", "XX")
    assert parse_name("1040_ITH_SAD_X") == ("1040", "ITH", "SAD", "XX")  # misnamed in old clones
    with pytest.raises(ValueError, match="unknown emotion code 'BOR'"):
        parse_name("1001_DFA_BOR_XX")
    with pytest.raises(ValueError, match="ACTOR_SENTENCE_EMOTION_LEVEL"):
        parse_name("1001_DFA_ANG")
    with pytest.raises(ValueError, match="intensity level"):
        parse_name("1001_DFA_ANG_ZZ")


def test_split_counts_give_the_paper_sizes() -> None:
    assert split_counts(7442, (0.70, 0.15, 0.15)) == (5210, 1116, 1116)
    assert split_counts(12, (0.70, 0.15, 0.15)) == (8, 2, 2)
    assert split_counts(10, (8, 1, 1)) == (8, 1, 1)
    with pytest.raises(ValueError, match="sum to 1"):
        split_counts(10, (0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="there are 10 samples"):
        split_counts(10, (8, 1, 2))


def test_one_split_rule_for_every_dataset() -> None:
    """The shared helper rounds val/test half up (not banker's round) and train takes the rest."""
    assert resolve_split_counts([0.70, 0.15, 0.15], 7442) == (5210, 1116, 1116)
    assert resolve_split_counts([0.5, 0.25, 0.25], 18) == (8, 5, 5)  # round() would give 4, 4
    assert resolve_split_counts([0.0, 0.5, 0.5], 5) == (0, 3, 2)  # never more than n
    assert resolve_split_counts([3, 1, 1], 5) == (3, 1, 1)
    for bad in ([0.7, 0.2, 0.2], [0.5, 0.5], [-1, 3, 3], ["a", 1, 1], [True, 2, 3]):
        with pytest.raises(ValueError, match="split sizes"):
            resolve_split_counts(bad, 5)  # type: ignore[arg-type]


def test_split_indices_at_full_size() -> None:
    rng = np.random.default_rng(1)
    n = 7442
    labels = rng.integers(0, 6, n).tolist()
    actors = [str(1001 + a) for a in rng.integers(0, 91, n)]
    split = split_indices(labels, actors, (0.7, 0.15, 0.15), seed=0)
    assert [len(split[s]) for s in ("train", "val", "test")] == [5210, 1116, 1116]
    assert sorted(i for idx in split.values() for i in idx) == list(range(n))
    for s, share in (("train", 0.7), ("val", 0.15), ("test", 0.15)):  # stratified: +-1 per class
        counts = Counter(labels[i] for i in split[s])
        total = Counter(labels)
        assert all(abs(counts[c] - share * total[c]) <= 1.5 for c in total)
    assert split == split_indices(labels, actors, (0.7, 0.15, 0.15), seed=0)
    assert split != split_indices(labels, actors, (0.7, 0.15, 0.15), seed=1)
    plain = split_indices(labels, actors, (0.7, 0.15, 0.15), seed=0, stratify=False)
    assert [len(plain[s]) for s in ("train", "val", "test")] == [5210, 1116, 1116]

    disjoint = split_indices(labels, actors, (0.7, 0.15, 0.15), seed=0, speaker_disjoint=True)
    groups = {s: {actors[i] for i in idx} for s, idx in disjoint.items()}
    assert not (groups["train"] & groups["val"] or groups["train"] & groups["test"])
    assert not groups["val"] & groups["test"]
    for s, target in (("train", 5210), ("val", 1116), ("test", 1116)):
        assert abs(len(disjoint[s]) - target) <= 90  # whole actors: about one actor's clips off


# ----------------------------------------------------------------------------- prepare


def test_prepared_cache_labels_shapes_and_split(raw: Path, cache: Path) -> None:
    manifest = verify(cache)
    assert manifest["sizes"] == {"train": 8, "val": 2, "test": 2}
    assert manifest["options"]["spectrogram_shape"] == [257, 299]
    assert manifest["options"]["frame"] == "middle"
    keys = manifest["keys"]
    assert keys == sorted(stem(c) for c in CLIPS)
    labels = np.load(cache / "labels.npy")
    expected = [EMOTIONS.index(k.split("_")[2]) for k in keys]
    assert labels.dtype == np.int64 and labels.tolist() == expected
    audio, video = np.load(cache / "audio.npy"), np.load(cache / "video.npy")
    assert audio.shape == (12, 1, 224, 224) and audio.dtype == np.float32
    assert video.shape == (12, 3, 224, 224) and video.dtype == np.uint8
    assert np.isfinite(audio).all()

    ds = PreparedDataset(cache, "train")
    item = ds[0]
    assert item["inputs"]["audio"].shape == (1, 224, 224)
    assert item["inputs"]["video"].dtype == torch.uint8 and item["target"].dtype == torch.int64


def test_the_middle_frame_is_the_one_cached(cache: Path) -> None:
    keys = json.loads((cache / "manifest.json").read_text())["keys"]
    video = np.load(cache / "video.npy", mmap_mode="r")
    for i, clip in enumerate(CLIPS):
        j = keys.index(stem(clip))
        colour = nearest_colour(np.asarray(video[j]).transpose(1, 2, 0))
        assert colour == (i + clip[5] // 2) % len(COLOURS), stem(clip)


def test_audio_is_tiled_cut_and_resized_as_documented(raw: Path, cache: Path) -> None:
    keys = json.loads((cache / "manifest.json").read_text())["keys"]
    audio = np.load(cache / "audio.npy", mmap_mode="r")
    for clip in (CLIPS[0], CLIPS[1]):  # 0.5 s (tiled) and 3.5 s (first 3 s kept)
        wave, _ = sf.read(raw / "AudioWAV" / f"{stem(clip)}.wav", dtype="float32")
        spec = log_spectrogram(fit_length(wave, 48000, "repeat"), 512, 159)
        expected = resize_2d(spec, (224, 224))
        np.testing.assert_allclose(audio[keys.index(stem(clip))][0], expected, atol=1e-4)


def test_options_frame_pad_and_speaker_disjoint(raw: Path, tmp_path: Path) -> None:
    opts = {**SMALL, "frame": "first", "fit": "pad", "speaker_disjoint": True}
    manifest = prepare(CremadPreparer(**opts), raw, tmp_path / "o", progress=False)
    keys = manifest["keys"]
    video = np.load(tmp_path / "o" / "video.npy")
    for i, clip in enumerate(CLIPS):
        assert nearest_colour(video[keys.index(stem(clip))].transpose(1, 2, 0)) == i % 6
    splits = json.loads((tmp_path / "o" / "splits.json").read_text())
    actors = {s: {keys[i][:4] for i in idx} for s, idx in splits.items()}
    assert sum(len(a) for a in actors.values()) == 3  # each actor in exactly one split
    assert sorted(i for idx in splits.values() for i in idx) == list(range(12))
    # pad: a 0.5 s clip is followed by silence, log(1e-7) (checked without the resize)
    unresized = CremadPreparer(spectrogram_size=None, image_size=16, fit="pad")
    assert unresized.specs()["audio"].shape == (1, 257, 299)
    item = next(it for it in unresized.scan(raw) if it.key == stem(CLIPS[0]))
    spec = unresized.process(item)["audio"][0]
    assert np.allclose(spec[:, -100:], np.log(1e-7), atol=1e-3)


def test_second_prepare_decodes_nothing(raw: Path, cache: Path, monkeypatch: Any) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("decoded again")

    monkeypatch.setattr(cremad, "read_audio", boom)
    monkeypatch.setattr(cremad, "read_frame", boom)
    manifest = prepare(CremadPreparer(), raw, cache, progress=False)
    assert manifest["sizes"]["train"] == 8
    with pytest.raises(ValueError, match="other settings"):
        prepare(CremadPreparer(frame="first"), raw, cache, progress=False)


class Interrupting(CremadPreparer):
    def __init__(self, stop_at: int | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.stop_at, self.calls = stop_at, 0

    def process(self, item: RawItem) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return super().process(item)


def test_interrupted_prepare_resumes(raw: Path, tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        prepare(Interrupting(7, **SMALL), raw, tmp_path / "out", progress=False, chunk=4)
    again = Interrupting(**SMALL)
    prepare(again, raw, tmp_path / "out", progress=False, chunk=4)
    assert again.calls == 12 - 4  # the first chunk of 4 was committed
    prepare(CremadPreparer(**SMALL), raw, tmp_path / "ref", progress=False, chunk=4)
    for name in ("audio.npy", "video.npy", "labels.npy", "splits.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


# ----------------------------------------------------------------------------- bad raw files


def test_truncated_wav_and_corrupt_flv_are_named_or_skipped(tmp_path: Path) -> None:
    root = make_raw(tmp_path / "raw", CLIPS[:6])
    wav = root / "AudioWAV" / f"{stem(CLIPS[1])}.wav"
    wav.write_bytes(wav.read_bytes()[:2000])
    with pytest.raises(RawDataError, match="truncated WAV") as info:
        prepare(CremadPreparer(**SMALL), root, tmp_path / "a", progress=False)
    assert info.value.path == str(wav)
    flv = root / "VideoFlash" / f"{stem(CLIPS[3])}.flv"
    flv.write_bytes(b"FLV\x01garbage" * 20)
    manifest = prepare(CremadPreparer(**SMALL), root, tmp_path / "b", skip_bad=True, progress=False)
    assert set(manifest["skipped"]) == {stem(CLIPS[1]), stem(CLIPS[3])}
    assert str(flv) in manifest["skipped"][stem(CLIPS[3])]
    assert sum(manifest["sizes"].values()) == 4
    sf.write(wav, np.zeros(8000, np.float32), SR)  # repaired: now the video stops the run
    with pytest.raises(RawDataError, match="unreadable video") as info:
        prepare(CremadPreparer(**SMALL), root, tmp_path / "c", progress=False)
    assert info.value.path == str(flv)


def test_missing_partner_and_unknown_emotion_fail_first(tmp_path: Path) -> None:
    root = make_raw(tmp_path / "raw", CLIPS[:6])
    missing = root / "VideoFlash" / f"{stem(CLIPS[4])}.flv"
    missing.unlink()
    items = CremadPreparer().scan(root)
    # sorted order whatever is wrong: the seeded split does not depend on which clips are bad
    assert [it.key for it in items] == sorted(stem(c) for c in CLIPS[:6])
    with pytest.raises(RawDataError, match="missing: the video of") as info:
        prepare(CremadPreparer(**SMALL), root, tmp_path / "a", progress=False)
    assert info.value.path == str(missing)

    odd = root / "AudioWAV" / "1004_DFA_BOR_XX.wav"
    sf.write(odd, np.zeros(1600, np.float32), SR)
    write_flv(root / "VideoFlash" / "1004_DFA_BOR_XX.flv", COLOURS[:2])
    with pytest.raises(RawDataError, match="unknown emotion code 'BOR'") as info:
        scanned = CremadPreparer().scan(root)
        CremadPreparer().process(next(it for it in scanned if it.key == "1004_DFA_BOR_XX"))
    assert info.value.path == str(odd)
    manifest = prepare(CremadPreparer(**SMALL), root, tmp_path / "b", skip_bad=True, progress=False)
    assert set(manifest["skipped"]) == {stem(CLIPS[4]), "1004_DFA_BOR_XX"}
    labels = np.load(tmp_path / "b" / "labels.npy")
    kept = [i for i, k in enumerate(manifest["keys"]) if k not in manifest["skipped"]]
    assert all(0 <= labels[i] < 6 for i in kept)


def test_skip_bad_split_is_the_full_split_minus_the_skipped(tmp_path: Path) -> None:
    root = make_raw(tmp_path / "raw", CLIPS)
    full = prepare(CremadPreparer(**SMALL), root, tmp_path / "full", progress=False)
    (root / "VideoFlash" / f"{stem(CLIPS[5])}.flv").unlink()  # sorts after most clips
    part = prepare(CremadPreparer(**SMALL), root, tmp_path / "part", skip_bad=True, progress=False)
    assert set(part["skipped"]) == {stem(CLIPS[5])}
    by_key = {}
    for name, manifest in (("full", full), ("part", part)):
        splits = json.loads((tmp_path / name / "splits.json").read_text())
        by_key[name] = {s: {manifest["keys"][i] for i in idx} for s, idx in splits.items()}
    for s in ("train", "val", "test"):
        assert by_key["part"][s] == by_key["full"][s] - {stem(CLIPS[5])}


def test_truncated_flv_is_named_not_a_wrong_frame(tmp_path: Path) -> None:
    root = make_raw(tmp_path / "raw", CLIPS[:6])
    flv = truncate_after_packet(root / "VideoFlash" / f"{stem(CLIPS[1])}.flv", 2)  # 2 of 5
    with pytest.raises(RawDataError, match="truncated video") as info:
        prepare(CremadPreparer(**SMALL), root, tmp_path / "a", progress=False)
    assert info.value.path == str(flv)
    manifest = prepare(CremadPreparer(**SMALL), root, tmp_path / "b", skip_bad=True, progress=False)
    assert set(manifest["skipped"]) == {stem(CLIPS[1])}
    # a video much shorter than its WAV (same take) is caught even when its header agrees
    short = root / "VideoFlash" / f"{stem(CLIPS[2])}.flv"
    write_flv(short, COLOURS[:4], rate=25)  # 0.16 s for a 1.2 s WAV
    item = next(it for it in CremadPreparer().scan(root) if it.key == stem(CLIPS[2]))
    with pytest.raises(RawDataError, match=r"paired audio lasts 1\.20 s"):
        CremadPreparer(**SMALL).process(item)
    assert CremadPreparer(**SMALL, min_video_coverage=None).process(item)["video"].shape == (
        3,
        16,
        16,
    )


def test_layout_and_option_errors(tmp_path: Path) -> None:
    (tmp_path / "raw" / "AudioWAV").mkdir(parents=True)
    with pytest.raises(RawDataError, match="VideoFlash: folder missing"):
        prepare(CremadPreparer(), tmp_path / "raw", tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="fit"):
        CremadPreparer(fit="wrap")
    with pytest.raises(ValueError, match="fraction"):
        CremadPreparer(frame=1.5)
    with pytest.raises(ValueError, match="sum to 1"):
        CremadPreparer(sizes=[0.7, 0.2, 0.2])
    with pytest.raises(ValueError, match="min_video_coverage"):
        CremadPreparer(min_video_coverage=1.5)
    with pytest.raises(ValueError, match="image_size"):
        CremadPreparer(image_size=0)


# ----------------------------------------------------------------------------- dataset, encoders


def test_build_cremad_and_encoders_forward_backward(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "small"
    prepare(CremadPreparer(spectrogram_size=32, image_size=32), raw, out, progress=False)
    splits = build_dataset("cremad", root=str(out), check=True)
    assert splits is not None and splits.modalities == ("audio", "video")
    assert splits.num_classes == 6 and splits.metric == "accuracy" and not splits.multilabel
    assert [len(splits.train), len(splits.val), len(splits.test)] == [8, 2, 2]
    batch = [splits.train[i] for i in range(2)]
    inputs = {m: torch.stack([b["inputs"][m] for b in batch]) for m in ("audio", "video")}
    assert inputs["video"].dtype == torch.uint8
    torch.manual_seed(0)
    encoders = splits.build_encoders(64)
    outs = []
    for m, enc in encoders.items():
        assert enc.out_features == 64
        z = enc(inputs[m])
        assert z.shape == (2, 64)
        outs.append(z)
    torch.stack(outs).sum().backward()
    assert all(p.grad is not None for enc in encoders.values() for p in enc.parameters())
    same = build_encoders(512)
    assert isinstance(same["audio"].proj, torch.nn.Identity)  # type: ignore[union-attr]
    assert build_cremad is not None
