"""The FSDD-MNIST regime dataset: fsdd-mnist pairing, each manipulation seeded and as documented."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from miles.data import DatasetSplits, build_dataset, fsdd_mnist, regime

NAME = "fsdd-mnist-regime"


@pytest.fixture(scope="module")
def clean() -> DatasetSplits:
    return build_dataset(NAME)


@pytest.fixture(scope="module")
def raw() -> dict[str, np.ndarray]:
    return fsdd_mnist.load_raw()


def _images(ds: object) -> torch.Tensor:
    return ds._inputs["image"]  # type: ignore[attr-defined, no-any-return]


def test_clean_build_pairs_and_splits_as_fsdd_mnist(
    clean: DatasetSplits, raw: dict[str, np.ndarray]
) -> None:
    assert clean.modalities == ("audio", "image") and clean.num_classes == 10
    assert clean.info["sizes"] == {"train": 2100, "val": 450, "test": 450}
    pairing = fsdd_mnist.make_pairing(raw["audio_labels"], raw["image_labels"], 0)
    for split in ("train", "val", "test"):
        ds = getattr(clean, split)
        clips, images = pairing[split]
        assert torch.equal(ds.targets, torch.from_numpy(raw["audio_labels"][clips]))
        expected = raw["image_pixels"][images].reshape(-1, 1, 28, 28) / np.float32(255.0)
        assert np.allclose(_images(ds).numpy(), expected)
    item = clean.test[3]["inputs"]
    assert (
        item["audio"].shape == (regime.AUDIO_FRAMES * 13,) and item["audio"].dtype == torch.float32
    )
    # audio: train-frame standardisation, then resampling of the clip to 16 frames
    off, frames = raw["audio_offsets"], raw["audio_frames"].astype(np.float64)
    train = np.concatenate([frames[off[i] : off[i + 1]] for i in pairing["train"][0]])
    clip = pairing["test"][0][3]
    normed = (frames[off[clip] : off[clip + 1]] - train.mean(0)) / train.std(0)
    expected_audio = regime.resample_frames(normed).reshape(-1)
    assert np.allclose(item["audio"].numpy(), expected_audio, atol=1e-5)


def test_resample_keeps_the_ends_and_interpolates() -> None:
    frames = np.arange(10, dtype=np.float64).reshape(5, 2)
    out = regime.resample_frames(frames, 9)
    assert out.shape == (9, 2)
    assert np.allclose(out[0], frames[0]) and np.allclose(out[-1], frames[-1])
    assert np.allclose(out[1], (frames[0] + frames[1]) / 2)
    assert np.allclose(regime.resample_frames(frames[:1], 4), np.repeat(frames[:1], 4, 0))


def test_corruptions_use_independent_seeded_streams() -> None:
    blank = np.zeros((6, 28, 28), dtype=np.float32)
    noisy = regime.corrupt_images(blank, 0, noise=0.3)
    # occluding or blurring a blank image changes nothing, and must not move the noise draws
    assert np.array_equal(noisy, regime.corrupt_images(blank, 0, occlusion=0.5, noise=0.3))
    assert np.array_equal(noisy, regime.corrupt_images(blank, 0, blur=1.0, noise=0.3))
    assert not np.array_equal(noisy, regime.corrupt_images(blank, 1, noise=0.3))
    assert noisy.min() >= 0 and noisy.max() <= 1 and noisy.mean() > 0.05


def test_blur_and_occlusion() -> None:
    dot = np.zeros((1, 28, 28), dtype=np.float32)
    dot[0, 14, 14] = 1.0
    blurred = regime.corrupt_images(dot, 0, blur=1.0)
    assert blurred.max() < 0.2 and blurred.sum() == pytest.approx(1.0, abs=1e-4)
    assert blurred[0, 14, 13] == pytest.approx(blurred[0, 13, 14])  # isotropic
    ones = np.ones((20, 28, 28), dtype=np.float32)
    occluded = regime.corrupt_images(ones, 3, occlusion=0.25)
    assert all(int((img == 0).sum()) == 7 * 7 for img in occluded)
    corners = {tuple(np.argwhere(img == 0)[0]) for img in occluded}
    assert len(corners) > 10  # the square moves from image to image


def test_manipulations_reach_every_split_and_only_the_image(clean: DatasetSplits) -> None:
    noisy = build_dataset(NAME, image_noise=0.5, image_blur=0.5, image_occlusion=0.2)
    for split in ("train", "val", "test"):
        a, b = getattr(clean, split), getattr(noisy, split)
        assert torch.equal(a.targets, b.targets)
        assert torch.equal(a._inputs["audio"], b._inputs["audio"])  # type: ignore[attr-defined]
        assert (_images(a) - _images(b)).abs().mean() > 0.1
    again = build_dataset(NAME, image_noise=0.5, image_blur=0.5, image_occlusion=0.2)
    assert torch.equal(_images(noisy.test), _images(again.test))
    assert noisy.info["manipulations"]["image_noise"] == 0.5


def test_fewer_training_images_and_label_noise(clean: DatasetSplits) -> None:
    few = build_dataset(NAME, image_train_per_class=7)
    labels = few.train.targets
    for digit in range(10):
        shown = _images(few.train)[labels == digit]
        assert len(torch.unique(shown.flatten(1), dim=0)) == 7
    assert torch.equal(_images(few.val), _images(clean.val))

    noisy = build_dataset(NAME, image_label_noise=0.3)
    pool = {
        tuple(img.flatten().tolist()[::7]): int(y)
        for img, y in zip(_images(clean.train), clean.train.targets, strict=True)
    }
    digits = [pool[tuple(img.flatten().tolist()[::7])] for img in _images(noisy.train)]
    wrong = sum(d != int(y) for d, y in zip(digits, noisy.train.targets, strict=True))
    assert wrong == round(0.3 * 2100)
    assert torch.equal(_images(noisy.test), _images(clean.test))  # evaluation stays clean


def test_small_images_and_a_second_image_modality(clean: DatasetSplits) -> None:
    data = build_dataset(NAME, image_size=14, second_image_noise=0.2, max_train=40)
    assert data.modalities == ("audio", "image", "image2") and len(data.train) == 40
    image, image2 = _images(data.test), data.test._inputs["image2"]  # type: ignore[attr-defined]
    assert image.shape == image2.shape == (450, 1, 14, 14)
    expected = torch.nn.functional.avg_pool2d(_images(clean.test), 2)
    assert torch.allclose(image, expected)
    assert (image - image2).abs().mean() > 0.1  # another image of the same digit, noisier
    encoders = data.build_encoders(8)
    assert list(encoders) == ["audio", "image", "image2"]
    assert encoders["image2"](image2[:5]).shape == (5, 8)


def test_slowdown_is_a_pure_speed_knob() -> None:
    data = build_dataset(NAME, max_train=20)
    slow = build_dataset(NAME, max_train=20, image_slowdown=0.1)
    x = _images(data.test)[:8]
    torch.manual_seed(0)
    fast_enc = data.build_encoders(8)["image"]
    torch.manual_seed(0)
    slow_enc = slow.build_encoders(8)["image"]
    fast_enc.eval(), slow_enc.eval()
    assert torch.allclose(fast_enc(x), slow_enc(x), atol=1e-6)  # the same initial function
    moved = {}
    for name, enc in (("fast", fast_enc), ("slow", slow_enc)):
        before = enc.proj.weight.detach().clone()
        opt = torch.optim.Adam(enc.parameters(), lr=1e-2)
        enc(x).pow(2).sum().backward()
        opt.step()
        moved[name] = (enc.proj.weight.detach() - before).abs().max().item()
    assert moved["fast"] == pytest.approx(1e-2, rel=1e-3)  # Adam's first step: lr per weight
    assert moved["slow"] == pytest.approx(1e-3, rel=1e-3)


def test_depth_and_init_scale() -> None:
    deep = build_dataset(NAME, max_train=20, image_depth=2, init_scale=2.0)
    torch.manual_seed(0)
    encoders = deep.build_encoders(8)
    convs = [m for m in encoders["image"].modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4
    torch.manual_seed(0)
    plain = build_dataset(NAME, max_train=20).build_encoders(8)
    first = encoders["audio"].net[0]
    assert torch.allclose(first.weight, 2 * plain["audio"].net[0].weight)
    assert torch.equal(first.bias, plain["audio"].net[0].bias)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"image_noise": -0.1}, ValueError),
        ({"image_occlusion": 1.0}, ValueError),
        ({"image_train_per_class": 0}, ValueError),
        ({"image_label_noise": 1.0}, ValueError),
        ({"image_depth": 1.5}, TypeError),
        ({"image_slowdown": 0.0}, ValueError),
        ({"image_slowdown": 1.5}, ValueError),
        ({"image_size": 7}, ValueError),
        ({"second_image_noise": -1.0}, ValueError),
        ({"init_scale": 0.0}, ValueError),
        ({"data_seed": True}, TypeError),
    ],
)
def test_bad_kwargs(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error, match=next(iter(kwargs))):
        build_dataset(NAME, **kwargs)


def test_class_balance_survives_every_knob() -> None:
    data = build_dataset(NAME, image_train_per_class=5, image_label_noise=0.2)
    assert Counter(data.train.targets.tolist()) == dict.fromkeys(range(10), 210)
