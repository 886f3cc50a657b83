"""CREMA-D (Cao et al. 2014) from its official raw layout: ``miles prepare cremad`` and its Dataset.

Raw layout (github.com/CheyneyComputerScience/CREMA-D, media in git-lfs)::

    RAW/AudioWAV/1001_DFA_ANG_XX.wav     16 kHz mono 16-bit PCM, 7,442 files
    RAW/VideoFlash/1001_DFA_ANG_XX.flv   Flash video of the same take, 7,442 files

File names are ``ACTOR_SENTENCE_EMOTION_LEVEL``: actor ``1001``..``1091`` (91 actors), one of 12
sentence codes, emotion ``ANG DIS FEA HAP NEU SAD`` (the label), level ``LO MD HI XX``. Other
folders (``AudioMP3``, csv files) are ignored. A level written ``X`` (a misnamed
``1040_ITH_SAD_X.wav`` in older clones) is read as ``XX`` so it still pairs with its video.

Preprocessing (every choice is an option recorded in the cache's manifest; defaults below):

* label: index in :data:`EMOTIONS` = ``ANG, DIS, FEA, HAP, NEU, SAD`` -> 0..5 (alphabetical).
  OGM-GE uses ``NEU, HAP, SAD, FEA, DIS, ANG`` -> 0..5; remap with :data:`OGM_GE_ORDER` if needed.
  An unknown emotion code or a malformed name is an error naming the file, never a guessed label.
* audio: read (channels averaged, clipped to [-1, 1]), resampled to ``sample_rate`` = 16 kHz if
  needed, fitted to ``clip_seconds`` = 3.0 s = 48,000 samples (``fit="repeat"``: shorter clips are
  tiled, as OGM-GE's ``np.tile`` does; ``"pad"`` appends silence; longer clips keep their first
  3 s, ``crop="start"``, or their middle 3 s, ``"center"``), then ``log(|STFT| + 1e-7)`` with a
  512-sample periodic Hann window and hop 159 (overlap 353), no centring: 257 x 299, the paper's
  shape (1 + (48000 - 512) // 159 = 299). ``audio_norm="none"`` keeps the raw log magnitude
  (OGM-GE); ``"sample"`` standardises each spectrogram. Resized bilinearly (antialiased) to
  ``spectrogram_size`` = 224 x 224 and stored as ``audio`` ``(1, 224, 224)`` float32.
* video: one frame per clip, ``frame="middle"`` (index ``n // 2`` of the decoded frames; also
  ``"first"``, ``"random"`` (one fixed frame per clip, seeded by ``seed`` and the clip name) or a
  fraction in [0, 1]); resized (aspect not kept, like OGM-GE's ``Resize((224, 224))``) to
  ``image_size`` = 224 and stored as ``video`` ``(3, 224, 224)`` **uint8** (7,442 clips: 1.1 GB
  instead of 4.5 GB as float32). :func:`build_encoders`' video encoder turns uint8 into float /255
  and applies the ImageNet mean/std, so the Dataset can return the raw bytes.
* truncated videos: a truncated FLV often decodes without error, just with fewer frames, which
  would silently move the "middle" frame. The decoded frames must cover ``min_video_coverage`` =
  0.9 of the duration the container declares and of the paired WAV's duration (the same take);
  otherwise the clip is an error naming the video (skippable with ``--skip-bad``).
  ``min_video_coverage=null`` turns the check off (unverified on the full release: if some
  official clips have videos much shorter than their audio, lower it).
* split: seeded (``seed`` = 0) 70/15/15 with ``val = floor(0.15 n + 0.5)``, ``test`` likewise,
  ``train = n - val - test`` (7,442 -> 5,210 / 1,116 / 1,116), stratified by emotion
  (``stratify``); ``speaker_disjoint=True`` instead assigns whole actors (sizes then approximate).

Caveats we could not verify: the paper does not say which frame, window function, padding or
normalisation it used, nor its split seed; the defaults above are our documented choices.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import numpy as np
from torch import nn

from miles.data.audio import (
    CropMode,
    FitMode,
    WindowName,
    fit_length,
    log_spectrogram,
    read_audio,
    resample,
    resize_2d,
    stft_frames,
)
from miles.data.base import DatasetSplits
from miles.data.prepare import (
    SPLIT_NAMES,
    ArraySpec,
    Preparer,
    RawDataError,
    RawItem,
    register_preparer,
    resolve_split_counts,
)
from miles.data.prepared import prepared_splits
from miles.data.registry import register_dataset
from miles.data.video import FrameChoice, frame_index, read_frame
from miles.models.wrappers import IMAGENET_MEAN, IMAGENET_STD, ProjectedEncoder
from miles.validation import (
    check_bool,
    check_choice,
    check_fraction,
    check_int,
    check_non_negative_int,
    check_positive,
    check_positive_int,
)

__all__ = [
    "EMOTIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OGM_GE_ORDER",
    "CremadPreparer",
    "build_cremad",
    "build_encoders",
    "parse_name",
    "split_counts",
    "split_indices",
]

NAME = "cremad"
_log = logging.getLogger(__name__)
EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
#: OGM-GE's class indices (``class_dict`` in their CramedDataset.py), for comparing predictions.
OGM_GE_ORDER = {"NEU": 0, "HAP": 1, "SAD": 2, "FEA": 3, "DIS": 4, "ANG": 5}
LEVELS = ("LO", "MD", "HI", "XX")
AUDIO_DIR, VIDEO_DIR = "AudioWAV", "VideoFlash"
_NAME_RE = re.compile(r"^(\d{4})_([A-Za-z]{3})_([A-Za-z]+)_([A-Za-z]{1,2})$")


def parse_name(stem: str) -> tuple[str, str, str, str]:
    """``"1001_DFA_ANG_XX"`` -> ``("1001", "DFA", "ANG", "XX")``; level ``X`` becomes ``XX``.

    Raises:
        ValueError: the name does not have the four fields, or the emotion/level is unknown.
    """
    match = _NAME_RE.match(stem)
    if match is None:
        raise ValueError(
            f"file name {stem!r} does not follow ACTOR_SENTENCE_EMOTION_LEVEL "
            "(e.g. 1001_DFA_ANG_XX)"
        )
    actor, sentence, emotion, level = match.groups()
    emotion, level = emotion.upper(), level.upper()
    if level == "X":
        level = "XX"
    if emotion not in EMOTIONS:
        raise ValueError(
            f"unknown emotion code {emotion!r} in {stem!r}; expected one of {EMOTIONS}"
        )
    if level not in LEVELS:
        raise ValueError(f"unknown intensity level {level!r} in {stem!r}; expected one of {LEVELS}")
    return actor, sentence.upper(), emotion, level


def split_counts(n: int, sizes: Sequence[float]) -> tuple[int, int, int]:
    """Train/val/test counts for ``n`` samples: :func:`miles.data.prepare.resolve_split_counts`.

    Fractions: ``val`` and ``test`` rounded half up, ``train`` the rest (7,442 at 0.70/0.15/0.15
    gives 5,210 / 1,116 / 1,116, the paper's sizes; rounding the train share would give 5,209).
    Three ints summing to ``n`` are used as given.
    """
    return resolve_split_counts(sizes, n)


def _interleave(counts: Sequence[int]) -> list[int]:
    """Split ids 0..2 in an evenly spread order with exactly ``counts[s]`` of each."""
    keys = [((k + 0.5) / c, s) for s, c in enumerate(counts) for k in range(c)]
    return [s for _, s in sorted(keys)]


def split_indices(
    labels: Sequence[int],
    groups: Sequence[str],
    sizes: Sequence[float],
    seed: int = 0,
    *,
    speaker_disjoint: bool = False,
    stratify: bool = True,
) -> dict[str, list[int]]:
    """Seeded train/val/test indices (sorted) with the sizes of :func:`split_counts`.

    Not speaker-disjoint: samples are shuffled within each label, the labels concatenated, and an
    evenly interleaved sequence of split ids with the exact counts laid over them, so every split
    gets each emotion in proportion (+-1) and the totals are exact (``stratify=False`` shuffles
    everything instead). Speaker-disjoint: actors are shuffled and each goes whole to the split
    furthest below its target count, so sizes are close to, not exactly, the targets.
    """
    n = len(labels)
    if len(groups) != n:
        raise ValueError("labels and groups must have the same length")
    counts = split_counts(n, sizes)
    rng = np.random.default_rng(seed)
    assign = np.empty(n, dtype=np.int64)
    if speaker_disjoint:
        members: dict[str, list[int]] = {}
        for i, g in enumerate(groups):
            members.setdefault(g, []).append(i)
        names = sorted(members)
        order = rng.permutation(len(names))
        have = [0, 0, 0]
        for j in order:
            idx = members[names[j]]
            deficit = [(counts[s] - have[s]) / max(counts[s], 1) for s in range(3)]
            s = int(np.argmax(deficit))
            assign[idx] = s
            have[s] += len(idx)
    else:
        if stratify:
            lab = np.asarray(labels, dtype=np.int64)
            order = np.concatenate(
                [rng.permutation(np.flatnonzero(lab == c)) for c in np.unique(lab)]
            )
        else:
            order = rng.permutation(n)
        assign[order] = np.asarray(_interleave(counts), dtype=np.int64)
    return {name: np.flatnonzero(assign == s).tolist() for s, name in enumerate(SPLIT_NAMES)}


def _check_sizes(sizes: Any) -> list[Any]:
    """Three fractions summing to 1 or three non-negative ints (validated against n later)."""
    if not isinstance(sizes, Sequence) or isinstance(sizes, str) or len(sizes) != 3:
        raise ValueError(f"sizes must be [train, val, test], got {sizes!r}")
    if all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sizes):
        return [int(s) for s in sizes]
    resolve_split_counts([float(s) for s in sizes], 1000)  # raises for bad fractions
    return [float(s) for s in sizes]


def _size2(name: str, value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, Sequence)
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
    ):
        raise ValueError(f"{name} must be a positive int, [height, width] or null, got {value!r}")
    return int(value[0]), int(value[1])


@register_preparer(NAME)
class CremadPreparer(Preparer):
    """CREMA-D's ``AudioWAV/*.wav`` + ``VideoFlash/*.flv`` -> ``audio`` and ``video`` arrays.

    Every argument is a ``miles prepare cremad --option KEY=VALUE``; see the module docstring.
    """

    def __init__(
        self,
        frame: FrameChoice = "middle",
        sample_rate: int = 16000,
        clip_seconds: float = 3.0,
        fit: str = "repeat",
        crop: str = "start",
        n_fft: int = 512,
        hop: int = 159,
        window: str = "hann",
        center: bool = False,
        audio_norm: str = "none",
        spectrogram_size: int | Sequence[int] | None = 224,
        image_size: int | Sequence[int] = 224,
        seed: int = 0,
        sizes: Sequence[float] = (0.70, 0.15, 0.15),
        speaker_disjoint: bool = False,
        stratify: bool = True,
        min_video_coverage: float | None = 0.9,
    ) -> None:
        if frame not in ("middle", "first", "random"):
            frame_index(frame, 2)  # validates the fraction
            frame = float(frame)
        self.frame: FrameChoice = frame
        self.sample_rate = check_positive_int("sample_rate", sample_rate)
        self.clip_seconds = check_positive("clip_seconds", clip_seconds)
        self.fit: FitMode = check_choice("fit", fit, get_args(FitMode))
        self.crop: CropMode = check_choice("crop", crop, get_args(CropMode))
        self.window: WindowName = check_choice("window", window, get_args(WindowName))
        self.audio_norm = check_choice("audio_norm", audio_norm, ("none", "sample"))
        self.n_fft = check_int("n_fft", n_fft, minimum=2)
        self.hop = check_positive_int("hop", hop)
        self.center = check_bool("center", center)
        self.n_samples = round(self.clip_seconds * sample_rate)
        frames = stft_frames(self.n_samples, n_fft, hop, center=self.center)
        if frames < 1:
            raise ValueError(f"clip of {self.n_samples} samples is shorter than n_fft={n_fft}")
        self.spectrogram_shape = (n_fft // 2 + 1, frames)
        self.spectrogram_size = _size2("spectrogram_size", spectrogram_size)
        image = _size2("image_size", image_size)
        if image is None:
            raise ValueError("image_size cannot be null: frames differ in size between clips")
        self.image_size = image
        self.seed = check_non_negative_int("seed", seed)
        self.sizes = _check_sizes(sizes)
        self.speaker_disjoint = check_bool("speaker_disjoint", speaker_disjoint)
        self.stratify = check_bool("stratify", stratify)
        self.min_video_coverage = (
            None
            if min_video_coverage is None
            else check_fraction("min_video_coverage", min_video_coverage, zero=False, one=True)
        )

    def options(self) -> dict[str, Any]:
        return {
            "frame": self.frame,
            "sample_rate": self.sample_rate,
            "clip_seconds": self.clip_seconds,
            "fit": self.fit,
            "crop": self.crop,
            "n_fft": self.n_fft,
            "hop": self.hop,
            "window": self.window,
            "center": self.center,
            "log_eps": 1e-7,
            "audio_norm": self.audio_norm,
            "spectrogram_shape": list(self.spectrogram_shape),
            "spectrogram_size": None if self.spectrogram_size is None else [*self.spectrogram_size],
            "image_size": list(self.image_size),
            "labels": list(EMOTIONS),
            "seed": self.seed,
            "sizes": self.sizes,
            "speaker_disjoint": self.speaker_disjoint,
            "stratify": self.stratify,
            "min_video_coverage": self.min_video_coverage,
        }

    def specs(self) -> dict[str, ArraySpec]:
        audio_hw = self.spectrogram_size or self.spectrogram_shape
        return {
            "audio": ArraySpec((1, *audio_hw), "float32"),
            "video": ArraySpec((3, *self.image_size), "uint8"),
        }

    def label_spec(self) -> ArraySpec:
        return ArraySpec((), "int64")

    def scan(self, raw: Path) -> list[RawItem]:
        """Pair ``AudioWAV/<stem>.wav`` with ``VideoFlash/<stem>.flv`` and parse the labels.

        Items are in sorted clip-name order, whatever is wrong with some of them, so the seeded
        split of a ``--skip-bad`` cache is the full split minus the skipped clips. A clip whose
        partner file is missing or whose name does not parse is kept as an item that fails in
        :meth:`process` with the file's name (so ``--skip-bad`` can skip it); such problems are
        also logged here, before any decoding, naming the first one and the count, so that a run
        without ``--skip-bad`` (which stops at the first bad clip) is not a surprise hours later.
        """
        audio_dir, video_dir = raw / AUDIO_DIR, raw / VIDEO_DIR
        for folder in (audio_dir, video_dir):
            if not folder.is_dir():
                raise RawDataError(
                    folder,
                    f"folder missing; expected CREMA-D's official layout {AUDIO_DIR}/*.wav and "
                    f"{VIDEO_DIR}/*.flv under {raw}",
                )
        wavs = self._by_stem(audio_dir, ".wav")
        flvs = self._by_stem(video_dir, ".flv")
        items: list[RawItem] = []
        problems: list[tuple[str, str]] = []
        for stem in sorted(set(wavs) | set(flvs)):
            wav = wavs.get(stem, audio_dir / f"{stem}.wav")
            flv = flvs.get(stem, video_dir / f"{stem}.flv")
            error: tuple[str, str] | None = None
            if stem not in wavs:
                error = (str(wav), f"missing: the audio of {flv}")
            elif stem not in flvs:
                error = (str(flv), f"missing: the video of {wav}")
            named = wav if stem in wavs else flv
            label, group = -1, stem
            try:
                actor, _, emotion, _ = parse_name(named.stem)
                label, group = EMOTIONS.index(emotion), actor
            except ValueError as exc:
                error = error or (str(named), str(exc))
            meta = {"error": error} if error else {}
            items.append(RawItem(stem, label, {"audio": wav, "video": flv}, group, meta))
            if error:
                problems.append(error)
        if problems:
            _log.warning(
                "cremad: %d clip(s) cannot be prepared (first: %s: %s); without --skip-bad the "
                "run stops at the first of them",
                len(problems),
                *problems[0],
            )
        return items

    @staticmethod
    def _by_stem(folder: Path, suffix: str) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for path in folder.iterdir():
            if path.suffix.lower() != suffix or not path.is_file() or path.name.startswith("."):
                continue
            stem = path.stem
            parts = stem.split("_")
            if len(parts) == 4 and parts[3].upper() == "X":  # 1040_ITH_SAD_X.wav in old clones
                stem = "_".join([*parts[:3], "XX"])
            if stem in out:
                raise RawDataError(path, f"duplicates {out[stem]} (same clip name)")
            out[stem] = path
        return out

    def process(self, item: RawItem) -> dict[str, np.ndarray]:
        error = item.meta.get("error")
        if error:
            raise RawDataError(error[0], error[1])
        wave, sr = read_audio(item.files["audio"])
        take_seconds = len(wave) / sr  # the same take: the video should last as long
        if sr != self.sample_rate:
            wave = resample(wave, sr, self.sample_rate)
        wave = fit_length(wave, self.n_samples, self.fit, crop=self.crop)
        spec = log_spectrogram(
            wave,
            self.n_fft,
            self.hop,
            window=self.window,
            center=self.center,
            eps=1e-7,
        )
        if self.audio_norm == "sample":
            spec = (spec - spec.mean()) / (spec.std() + 1e-5)
        if self.spectrogram_size is not None:
            spec = resize_2d(spec, self.spectrogram_size)
        seed = zlib.crc32(f"{self.seed}:{item.key}".encode()) if self.frame == "random" else None
        frame = read_frame(
            item.files["video"],
            self.frame,
            seed=seed,
            expected_seconds=take_seconds,
            min_coverage=self.min_video_coverage,
        )
        image = resize_2d(frame.transpose(2, 0, 1), self.image_size)
        return {"audio": spec[None].astype(np.float32), "video": image}

    def split(self, items: Sequence[RawItem]) -> dict[str, list[int]]:
        return split_indices(
            [int(it.label) for it in items],
            [str(it.group) for it in items],
            self.sizes,
            self.seed,
            speaker_disjoint=self.speaker_disjoint,
            stratify=self.stratify,
        )


def build_encoders(
    latent_dim: int,
    pretrained_audio: str | os.PathLike[str] | None = None,
    pretrained_video: str | os.PathLike[str] | None = None,
) -> dict[str, nn.Module]:
    """The paper's CREMA-D encoders: a ResNet-18 per modality (audio 1 channel, video 3).

    Pretrained weights only from local torchvision-format files (a 3-channel ``conv1`` is summed
    to 1 channel for the audio). Video frames are scaled from uint8 and ImageNet-normalised; the
    log spectrograms are fed as stored.
    """
    from miles.models.resnet import resnet18

    return {
        "audio": ProjectedEncoder(resnet18(in_channels=1, pretrained=pretrained_audio), latent_dim),
        "video": ProjectedEncoder(
            resnet18(in_channels=3, pretrained=pretrained_video),
            latent_dim,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        ),
    }


@register_dataset(NAME)
def build_cremad(
    root: str | os.PathLike[str],
    check: bool = False,
    pretrained_audio: str | os.PathLike[str] | None = None,
    pretrained_video: str | os.PathLike[str] | None = None,
) -> DatasetSplits:
    """Train/val/test over a cache made by ``miles prepare cremad --raw RAW --out ROOT``.

    Items are ``{"inputs": {"audio": (1, 224, 224) float32, "video": (3, 224, 224) uint8},
    "target": int64}``; ``check=True`` re-hashes the cache against its manifest first.
    """
    return prepared_splits(
        os.fspath(root),
        num_classes=len(EMOTIONS),
        multilabel=False,
        metric="accuracy",
        build_encoders=functools.partial(
            build_encoders,
            pretrained_audio=pretrained_audio,
            pretrained_video=pretrained_video,
        ),
        modalities=("audio", "video"),
        check=check,
        info={"labels": list(EMOTIONS), "encoders": "ResNet-18 x2 (audio 1 channel, video 3)"},
    )
