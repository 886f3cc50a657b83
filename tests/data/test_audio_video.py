"""Audio, spectrogram, resize and video-frame readers on files the tests write themselves."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from miles.data.audio import (
    fit_length,
    hz_to_mel,
    log_mel_spectrogram,
    log_spectrogram,
    mel_filterbank,
    mel_to_hz,
    read_audio,
    resample,
    resize_2d,
    stft_frames,
    stft_magnitude,
)
from miles.data.prepare import RawDataError
from miles.data.video import frame_index, read_frame, read_image

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def write_flv(
    path: Path,
    colours: Sequence[tuple[int, int, int]],
    size: int = 32,
    rate: int | Fraction = 25,
) -> Path:
    """A Flash video (FLV1 codec) whose frame i is a flat image of ``colours[i]``."""
    with av.open(str(path), "w", format="flv") as container:
        stream = container.add_stream("flv", rate=rate)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for colour in colours:
            rgb = np.empty((size, size, 3), dtype=np.uint8)
            rgb[:] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def nearest_colour(rgb: np.ndarray) -> int:
    mean = rgb.reshape(-1, 3).mean(axis=0)
    return int(np.argmin([np.abs(mean - np.asarray(c)).sum() for c in COLOURS]))


def sine(freq: float, sr: int, seconds: float) -> np.ndarray:
    return np.sin(2 * np.pi * freq * np.arange(round(sr * seconds)) / sr).astype(np.float32)


# ----------------------------------------------------------------------------- audio files


def test_read_audio_mono_float_and_rate(tmp_path: Path) -> None:
    left, right = sine(440, 8000, 0.1), np.zeros(800, dtype=np.float32)
    sf.write(tmp_path / "st.wav", np.stack([left, right], axis=1), 8000, subtype="PCM_16")
    x, sr = read_audio(tmp_path / "st.wav")
    assert sr == 8000 and x.dtype == np.float32 and x.shape == (800,)
    np.testing.assert_allclose(x, left / 2, atol=1e-4)  # channels averaged, int16 scaled


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("truncate", "truncated WAV"),
        ("empty", "no samples"),
        ("garbage", "unreadable audio"),
        ("lfs", "git-lfs pointer"),
        ("missing", "missing"),
    ],
)
def test_read_audio_errors_name_the_file(tmp_path: Path, content: str, why: str) -> None:
    path = tmp_path / f"{content}.wav"
    if content == "truncate":
        sf.write(path, sine(440, 16000, 0.5), 16000, subtype="PCM_16")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif content == "empty":
        sf.write(path, np.zeros(0, dtype=np.float32), 16000, subtype="PCM_16")
    elif content == "garbage":
        path.write_bytes(b"RIFX this is not audio at all" * 10)
    elif content == "lfs":
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    with pytest.raises(RawDataError, match=why) as info:
        read_audio(path)
    assert info.value.path == str(path) and str(path) in str(info.value)


# ----------------------------------------------------------------------------- resampling


@pytest.mark.parametrize(("orig", "target"), [(44100, 16000), (22050, 16000), (8000, 16000)])
def test_resample_keeps_frequency_and_length(orig: int, target: int) -> None:
    x = sine(440, orig, 0.5)
    y = resample(x, orig, target)
    assert y.dtype == np.float32 and len(y) == round(len(x) * target / orig)
    expected = sine(440, target, len(y) / target)[: len(y)]
    edge = target // 50  # the ends see the zero padding
    assert np.abs(y[edge:-edge] - expected[edge:-edge]).max() < 2e-3
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) * target / len(y) - 440) <= target / len(y)


def test_resample_removes_tones_above_the_new_nyquist() -> None:
    y = resample(sine(7000, 22050, 0.5), 22050, 8000)  # 7 kHz > 4 kHz Nyquist: must vanish
    assert np.abs(y[200:-200]).max() < 1e-2


def test_resample_identity_and_errors() -> None:
    x = sine(100, 16000, 0.01)
    y = resample(x, 16000, 16000)
    np.testing.assert_array_equal(x, y)
    assert y is not x
    assert resample(np.zeros(0, np.float32), 8000, 16000).shape == (0,)
    with pytest.raises(ValueError, match="1-D"):
        resample(np.zeros((2, 3), np.float32), 8000, 16000)
    with pytest.raises(ValueError, match="positive"):
        resample(x, 0, 16000)


# ----------------------------------------------------------------------------- length


def test_fit_length_modes() -> None:
    x = np.arange(1, 6, dtype=np.float32)
    np.testing.assert_array_equal(fit_length(x, 3), [1, 2, 3])
    np.testing.assert_array_equal(fit_length(x, 3, crop="center"), [2, 3, 4])
    np.testing.assert_array_equal(fit_length(x, 7), [1, 2, 3, 4, 5, 0, 0])
    np.testing.assert_array_equal(fit_length(x, 12, "repeat"), [1, 2, 3, 4, 5] * 2 + [1, 2])
    assert fit_length(x, 5).dtype == np.float32
    with pytest.raises(ValueError, match="mode"):
        fit_length(x, 3, "wrap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        fit_length(np.zeros(0, np.float32), 3, "repeat")


# ----------------------------------------------------------------------------- spectrograms


def test_cremad_spectrogram_is_257_by_299() -> None:
    x = np.random.default_rng(0).standard_normal(48000).astype(np.float32) * 0.1
    spec = log_spectrogram(x)  # window 512, hop 159 (overlap 353), no centring
    assert spec.shape == (257, 299) and spec.dtype == np.float32
    assert stft_frames(48000, 512, 159) == 299
    np.testing.assert_allclose(
        spec, np.log(stft_magnitude(x, 512, 159) + np.float32(1e-7)), rtol=1e-6
    )
    assert stft_magnitude(x, 512, 159, center=True).shape == (257, 1 + 48000 // 159)


def test_stft_matches_a_hand_dft_and_finds_the_tone() -> None:
    x = sine(1000, 16000, 0.1)
    mag = stft_magnitude(x, 512, 128)
    frame = x[128 : 128 + 512].astype(np.float64)
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(512) / 512)  # periodic Hann
    np.testing.assert_allclose(mag[:, 1], np.abs(np.fft.rfft(frame * win)), rtol=1e-4, atol=1e-4)
    assert np.argmax(mag[:, 1]) == 32  # 1000 Hz / (16000 / 512) = bin 32
    with pytest.raises(ValueError, match="shorter than n_fft"):
        stft_magnitude(x[:100], 512, 128)


def test_mel_scale_reference_points() -> None:
    assert hz_to_mel(1000.0) == pytest.approx(15.0)  # Slaney: linear to 1 kHz, 200/3 Hz per mel
    assert hz_to_mel(200.0) == pytest.approx(3.0)
    assert hz_to_mel(6400.0) == pytest.approx(15.0 + 27.0)  # log step ln(6.4)/27
    assert hz_to_mel(1000.0, htk=True) == pytest.approx(2595 * np.log10(1 + 1000 / 700))
    f = np.array([0.0, 300.0, 1000.0, 4000.0, 8000.0])
    for htk in (False, True):
        np.testing.assert_allclose(mel_to_hz(hz_to_mel(f, htk=htk), htk=htk), f, atol=1e-6)


@pytest.mark.parametrize("htk", [False, True])
def test_mel_filters_are_triangles_at_mel_spaced_centres(htk: bool) -> None:
    sr, n_fft, n_mels = 16000, 1024, 40
    fb = mel_filterbank(n_mels, n_fft, sr, norm=None, htk=htk)
    assert fb.shape == (n_mels, n_fft // 2 + 1) and fb.dtype == np.float32
    assert (fb >= 0).all() and (fb <= 1 + 1e-6).all() and (fb.sum(axis=1) > 0).all()
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    centres = mel_to_hz(np.linspace(0, hz_to_mel(sr / 2, htk=htk), n_mels + 2), htk=htk)[1:-1]
    for i, row in enumerate(fb):
        nz = np.flatnonzero(row)
        assert (np.diff(nz) == 1).all()  # one contiguous support
        peak = int(np.argmax(row))
        assert (np.diff(row[nz[0] : peak + 1]) >= -1e-7).all()  # rises ...
        assert (np.diff(row[peak : nz[-1] + 1]) <= 1e-7).all()  # ... then falls
        assert abs(freqs[peak] - centres[i]) <= sr / n_fft  # peak at the nearest bin
    slaney = mel_filterbank(n_mels, n_fft, sr, htk=htk)
    points = mel_to_hz(np.linspace(0, hz_to_mel(sr / 2, htk=htk), n_mels + 2), htk=htk)
    scale = 2 / (points[2:] - points[:-2])  # Slaney: equal area, 2 / (right - left edge)
    mask = fb > 1e-3
    np.testing.assert_allclose(slaney[mask], (fb * scale[:, None])[mask], rtol=1e-4)


def test_mel_filterbank_warns_on_empty_filters_and_checks_range() -> None:
    with pytest.warns(UserWarning, match="cover no FFT bin"):
        mel_filterbank(128, 64, 16000)
    with pytest.raises(ValueError, match="f_max"):
        mel_filterbank(10, 512, 16000, f_max=9000)


def test_log_mel_spectrogram_shape_and_value() -> None:
    x = sine(1000, 16000, 0.5)
    spec = log_mel_spectrogram(x, 16000, n_mels=96, n_fft=1024, hop=160)
    assert spec.shape == (96, 1 + 8000 // 160) and spec.dtype == np.float32
    fb = mel_filterbank(96, 1024, 16000)
    mag = stft_magnitude(x, 1024, 160, center=True)
    np.testing.assert_allclose(spec, np.log(fb @ mag**2 + 1e-10), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- resize


def test_resize_2d_shapes_dtypes_and_antialiasing() -> None:
    spec = np.random.default_rng(0).standard_normal((257, 299)).astype(np.float32)
    assert resize_2d(spec, (224, 224)).shape == (224, 224)
    img = np.full((3, 360, 480), 77, dtype=np.uint8)
    out = resize_2d(img, (224, 224))
    assert out.shape == (3, 224, 224) and out.dtype == np.uint8 and (out == 77).all()
    checker = (np.indices((64, 64)).sum(axis=0) % 2).astype(np.float32)
    small = resize_2d(checker, (8, 8))  # antialiased: averages to 0.5, no aliasing to 0 or 1
    np.testing.assert_allclose(small, 0.5, atol=0.05)
    assert resize_2d(np.zeros((4, 4), np.float64), (8, 6)).dtype == np.float32
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        resize_2d(np.zeros(5), (2, 2))


# ----------------------------------------------------------------------------- video, images


def test_frame_index_choices() -> None:
    assert frame_index("first", 5) == 0 and frame_index("middle", 5) == 2
    assert frame_index("middle", 4) == 2 and frame_index(1.0, 5) == 4 and frame_index(0.25, 5) == 1
    assert frame_index("random", 100, seed=3) == frame_index("random", 100, seed=3)
    with pytest.raises(ValueError, match="fraction"):
        frame_index(1.5, 5)
    with pytest.raises(ValueError, match="no frames"):
        frame_index("middle", 0)


def test_read_frame_picks_the_frame_by_decoded_index(tmp_path: Path) -> None:
    path = write_flv(tmp_path / "clip.flv", COLOURS[:5])
    first = read_frame(path, "first")
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    assert nearest_colour(first) == 0
    assert nearest_colour(read_frame(path)) == 2  # the middle of 5 decoded frames
    assert nearest_colour(read_frame(path, 1.0)) == 4
    assert nearest_colour(read_frame(path, 0.25)) == 1
    picks = {nearest_colour(read_frame(path, "random", seed=s)) for s in range(20)}
    assert len(picks) > 1
    assert nearest_colour(read_frame(path, "random", seed=7)) == nearest_colour(
        read_frame(path, "random", seed=7)
    )


def truncate_after_packet(path: Path, keep: int) -> Path:
    """Cut a FLV right after its ``keep``-th video packet: it still decodes without error."""
    with av.open(str(path)) as container:
        packets = [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size]
    pos, size = packets[keep - 1]
    data = path.read_bytes()
    path.write_bytes(data[: pos + size + 4])  # the tag and its trailing previous-tag-size field
    return path


def test_truncated_video_is_an_error_not_another_frame(tmp_path: Path) -> None:
    path = write_flv(tmp_path / "clip.flv", (COLOURS * 4)[:20])
    assert nearest_colour(read_frame(path)) == 10 % 6  # frame 10 of 20, full file
    truncate_after_packet(path, 8)
    with av.open(str(path)) as container:  # decodes cleanly: 8 frames, the "middle" would be 4
        assert sum(1 for _ in container.decode(video=0)) == 8
    for which in ("middle", "first", 1.0):
        with pytest.raises(RawDataError, match="truncated video") as info:
            read_frame(path, which)  # type: ignore[arg-type]
        assert info.value.path == str(path)
    assert nearest_colour(read_frame(path, min_coverage=None)) == 4  # check off: as decoded
    # the take's length known from elsewhere (CREMA-D: the WAV) is checked too
    whole = write_flv(tmp_path / "whole.flv", COLOURS[:5])  # 0.2 s at 25 fps
    assert nearest_colour(read_frame(whole, expected_seconds=0.21)) == 2
    with pytest.raises(RawDataError, match=r"paired audio lasts 2\.00 s"):
        read_frame(whole, expected_seconds=2.0)


def test_read_frame_keeps_no_decoded_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory stays flat: no decoded frame is stored, and only the chosen one is converted."""
    path = write_flv(tmp_path / "clip.flv", (COLOURS * 5)[:30])
    refs: list[int] = []
    converted: list[int] = []
    real_to_ndarray = av.VideoFrame.to_ndarray
    real_open = av.open

    class Tracking:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._c = real_open(*args, **kwargs)

        def __enter__(self) -> Tracking:
            return self

        def __exit__(self, *exc: object) -> None:
            self._c.close()

        def __getattr__(self, name: str) -> Any:
            return getattr(self._c, name)

        def decode(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
            for frame in self._c.decode(*args, **kwargs):
                yield frame
                refs.append(sys.getrefcount(frame))  # one more if the caller stored it

    def to_ndarray(self: Any, *args: Any, **kwargs: Any) -> np.ndarray:
        converted.append(1)
        return real_to_ndarray(self, *args, **kwargs)

    with Tracking(str(path)) as container:  # the count for a caller that keeps nothing
        for _ in container.decode(video=0):
            pass
    baseline = max(refs)
    refs.clear()
    monkeypatch.setattr(av, "open", Tracking)
    monkeypatch.setattr(av.VideoFrame, "to_ndarray", to_ndarray)
    assert nearest_colour(read_frame(path)) == 15 % 6
    assert len(converted) == 1 and len(refs) >= 30
    assert max(refs) <= baseline, (baseline, refs)


def test_read_frame_errors_name_the_file(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.flv"
    corrupt.write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(RawDataError, match="unreadable video") as info:
        read_frame(corrupt)
    assert info.value.path == str(corrupt)
    audio_only = tmp_path / "audio.wav"
    sf.write(audio_only, sine(440, 8000, 0.1), 8000)
    with pytest.raises(RawDataError, match="no video stream"):
        read_frame(audio_only)
    with pytest.raises(RawDataError, match="missing"):
        read_frame(tmp_path / "nope.flv")


def test_read_image_and_its_errors(tmp_path: Path) -> None:
    Image.fromarray(np.full((10, 12), 200, np.uint8), mode="L").save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert img.shape == (10, 12, 3) and img.dtype == np.uint8 and (img == 200).all()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.jpeg", quality=90)
    data = (tmp_path / "a.jpeg").read_bytes()
    (tmp_path / "cut.jpeg").write_bytes(data[: len(data) // 2])
    with pytest.raises(RawDataError, match="unreadable image") as info:
        read_image(tmp_path / "cut.jpeg")
    assert info.value.path == str(tmp_path / "cut.jpeg")
    (tmp_path / "text.jpeg").write_text("not an image")
    with pytest.raises(RawDataError, match=r"text\.jpeg: unreadable image"):
        read_image(tmp_path / "text.jpeg")
