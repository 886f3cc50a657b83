"""Audio reading and spectrograms with soundfile, numpy and torch alone (no torchaudio/librosa).

torchaudio has no build for the torch this project pins, and librosa would pull in scipy and numba,
so the few pieces the paper's datasets need live here: a reader that turns any unreadable or
truncated file into a :class:`~miles.data.prepare.RawDataError` naming it, a band-limited
resampler, length fitting, an STFT magnitude, a log spectrogram, a Slaney/HTK mel filterbank (the
same formulas as librosa's ``filters.mel``) and a bilinear 2-D resize.

Every function takes and returns numpy arrays (float32 unless said otherwise) so that preparers can
write the results straight into the memory-mapped cache.
"""

from __future__ import annotations

import math
import struct
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from miles.data.base import MissingDataPackageError
from miles.data.prepare import RawDataError

__all__ = [
    "fit_length",
    "hz_to_mel",
    "lfs_pointer_reason",
    "log_mel_spectrogram",
    "log_spectrogram",
    "mel_filterbank",
    "mel_to_hz",
    "read_audio",
    "resample",
    "resize_2d",
    "stft_frames",
    "stft_magnitude",
]

FitMode = Literal["pad", "repeat"]
CropMode = Literal["start", "center"]
WindowName = Literal["hann", "hamming", "rect"]


# --------------------------------------------------------------------------- reading

_LFS_MAGIC = b"version https://git-lfs"


def lfs_pointer_reason(path: Path | str) -> str | None:
    """A message if ``path`` is a git-lfs pointer (a clone without ``git lfs pull``), else None.

    CREMA-D and other repositories store their media in git-lfs; a plain clone leaves ~130-byte
    text stubs in place of the files, which every decoder rejects with an unhelpful message.
    """
    try:
        with Path(path).open("rb") as fh:
            head = fh.read(len(_LFS_MAGIC))
    except OSError:
        return None
    if head == _LFS_MAGIC:
        return "is a git-lfs pointer, not the media file: run `git lfs pull` in the raw copy"
    return None


def require_media_file(path: Path | str, what: str) -> Path:
    """``path`` as a Path, or RawDataError naming it if it is missing or only a git-lfs pointer."""
    path = Path(path)
    if not path.is_file():
        raise RawDataError(path, f"{what} file is missing")
    lfs = lfs_pointer_reason(path)
    if lfs is not None:
        raise RawDataError(path, lfs)
    return path


def _wav_truncation(path: Path) -> str | None:
    """Why a RIFF/WAVE file is cut short, or None if its data chunk is complete (or unknowable).

    libsndfile reads a truncated WAV without complaint (it just returns fewer frames), which would
    silently turn a damaged download into a shorter clip; the header's declared data size tells.
    Streaming writers put 0 or 0xFFFFFFFF there: those are taken as "unknown", not as truncation.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None  # not RIFF/WAVE: leave it to libsndfile
            pos = 12
            while pos + 8 <= size:
                fh.seek(pos)
                chunk = fh.read(8)
                if len(chunk) < 8:
                    break
                cid, csize = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if cid == b"data":
                    if csize in (0, 0xFFFFFFFF):
                        return None
                    have = size - (pos + 8)
                    if have < csize:
                        return (
                            f"truncated WAV: header declares {csize} bytes of audio, "
                            f"the file holds {have}"
                        )
                    return None
                pos += 8 + csize + (csize & 1)
            return "WAV file has no complete 'data' chunk (truncated or malformed)"
    except OSError as exc:
        return f"cannot read: {exc}"


def read_audio(path: Path | str) -> tuple[np.ndarray, int]:
    """Read an audio file as mono float32 in [-1, 1] (channels averaged) and its sample rate.

    Raises:
        RawDataError: the file is missing, unreadable, truncated (WAV), empty or not finite.
        MissingDataPackageError: ``soundfile`` is not installed.
    """
    try:
        import soundfile as sf
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDataPackageError(
            "reading audio needs soundfile: pip install 'miles-lr[data]'"
        ) from exc
    path = require_media_file(path, "audio")
    if path.suffix.lower() == ".wav":
        why = _wav_truncation(path)
        if why is not None:
            raise RawDataError(path, why)
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile raises several unrelated types
        raise RawDataError(path, f"unreadable audio ({type(exc).__name__}: {exc})") from exc
    if data.size == 0 or data.shape[0] == 0:
        raise RawDataError(path, "audio file holds no samples")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.all(np.isfinite(mono)):
        raise RawDataError(path, "audio holds NaN or infinite samples")
    return np.ascontiguousarray(np.clip(mono, -1.0, 1.0), dtype=np.float32), int(sr)


# --------------------------------------------------------------------------- resampling


def resample(
    x: np.ndarray,
    orig_sr: int,
    target_sr: int,
    *,
    lowpass_filter_width: int = 16,
    rolloff: float = 0.945,
) -> np.ndarray:
    """Band-limited polyphase resampling of a 1-D signal by the exact ratio ``target/orig``.

    A Hann-windowed sinc low-pass at ``rolloff`` x the lower Nyquist frequency, evaluated at each
    of the ``target/g`` output phases (``g = gcd``), applied as a strided convolution (the scheme
    torchaudio's ``sinc_interp_hann`` uses). ``lowpass_filter_width`` zero crossings per side trade
    sharpness for speed. Output length is ``round(len(x) * target_sr / orig_sr)``; identity (a copy)
    when the rates are equal.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"resample expects a 1-D signal, got shape {x.shape}")
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    if orig_sr == target_sr:
        return x.copy()
    # round(n * target / orig), half up, in exact integer arithmetic
    n_out = (2 * len(x) * int(target_sr) + int(orig_sr)) // (2 * int(orig_sr))
    if len(x) == 0 or n_out == 0:
        return np.zeros(n_out, dtype=np.float32)
    g = math.gcd(int(orig_sr), int(target_sr))
    orig, new = int(orig_sr) // g, int(target_sr) // g
    base = min(orig, new) * rolloff  # cutoff, in units where the input rate is `orig`
    width = math.ceil(lowpass_filter_width * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64) / orig
    t = torch.arange(0, -new, -1, dtype=torch.float64)[:, None] / new + idx[None, :]
    t = (t * base).clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, 1.0, t))
    kernels = (sinc * window * (base / orig)).to(torch.float32)[:, None, :]  # (new, 1, K)
    wave = torch.from_numpy(x)[None, None, :]
    wave = F.pad(wave, (width, width + orig))
    out = F.conv1d(wave, kernels, stride=orig)  # (1, new, frames)
    out = out[0].t().reshape(-1)
    if out.numel() < n_out:  # cannot happen for the padding above; guard anyway
        out = F.pad(out, (0, n_out - out.numel()))
    return out[:n_out].numpy().astype(np.float32, copy=False)


# --------------------------------------------------------------------------- length


def fit_length(
    x: np.ndarray, n: int, mode: FitMode = "pad", *, crop: CropMode = "start"
) -> np.ndarray:
    """Make a 1-D signal exactly ``n`` samples long.

    Longer signals are cut: ``crop="start"`` keeps the first ``n`` samples (as OGM-GE does),
    ``crop="center"`` keeps the middle ``n``. Shorter ones are filled: ``mode="pad"`` appends
    zeros (silence), ``mode="repeat"`` tiles the clip (OGM-GE's ``np.tile``) and then cuts.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"fit_length expects a 1-D signal, got shape {x.shape}")
    if n < 0:
        raise ValueError(f"length must be >= 0, got {n}")
    if mode not in ("pad", "repeat"):
        raise ValueError(f"mode must be 'pad' or 'repeat', got {mode!r}")
    if crop not in ("start", "center"):
        raise ValueError(f"crop must be 'start' or 'center', got {crop!r}")
    if len(x) >= n:
        start = (len(x) - n) // 2 if crop == "center" else 0
        return x[start : start + n].copy()
    if mode == "repeat":
        if len(x) == 0:
            raise ValueError("cannot repeat an empty signal")
        return np.tile(x, math.ceil(n / len(x)))[:n].astype(np.float32, copy=False)
    return np.concatenate([x, np.zeros(n - len(x), dtype=np.float32)])


# --------------------------------------------------------------------------- spectrograms


def _window(name: str, length: int) -> torch.Tensor:
    """Periodic (DFT-even) windows, as torch, librosa and scipy's ``get_window`` use for STFTs."""
    if name == "hann":
        return torch.hann_window(length, periodic=True, dtype=torch.float64)
    if name == "hamming":
        return torch.hamming_window(length, periodic=True, dtype=torch.float64)
    if name in ("rect", "boxcar", "ones"):
        return torch.ones(length, dtype=torch.float64)
    raise ValueError(f"unknown window {name!r}; use 'hann', 'hamming' or 'rect'")


def stft_frames(n_samples: int, n_fft: int, hop: int, *, center: bool = False) -> int:
    """Number of STFT frames for ``n_samples``: ``1 + (n - n_fft) // hop``, or ``1 + n // hop``
    with ``center=True`` (the signal padded by ``n_fft // 2`` each side)."""
    if center:
        return 1 + n_samples // hop
    if n_samples < n_fft:
        return 0
    return 1 + (n_samples - n_fft) // hop


def stft_magnitude(
    x: np.ndarray,
    n_fft: int,
    hop: int,
    win_length: int | None = None,
    window: WindowName = "hann",
    *,
    center: bool = False,
) -> np.ndarray:
    """|STFT| of a 1-D signal, shape ``(n_fft // 2 + 1, frames)`` float32, via ``torch.stft``.

    ``center=False`` (the default) frames the signal as is, like MATLAB's ``spectrogram``: a 3 s
    clip at 16 kHz with ``n_fft=512, hop=159`` (overlap 353) gives exactly 257 x 299, the shape the
    paper reports for CREMA-D. ``center=True`` pads ``n_fft // 2`` each side by reflection
    (librosa's default), giving ``1 + n // hop`` frames.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"stft expects a 1-D signal, got shape {x.shape}")
    win_length = n_fft if win_length is None else win_length
    if not 0 < win_length <= n_fft or hop <= 0:
        raise ValueError(f"need 0 < win_length <= n_fft and hop > 0 (got {win_length}, {hop})")
    if not center and len(x) < n_fft:
        raise ValueError(f"signal of {len(x)} samples is shorter than n_fft={n_fft}")
    signal = torch.from_numpy(x).to(torch.float64)
    spec = torch.stft(
        signal,
        n_fft=n_fft,
        hop_length=hop,
        win_length=win_length,
        window=_window(window, win_length),
        center=center,
        pad_mode="reflect",
        return_complex=True,
    )
    return spec.abs().to(torch.float32).numpy()


def log_spectrogram(
    x: np.ndarray,
    n_fft: int = 512,
    hop: int = 159,
    win_length: int | None = None,
    window: WindowName = "hann",
    *,
    center: bool = False,
    eps: float = 1e-7,
) -> np.ndarray:
    """``log(|STFT| + eps)``, OGM-GE's CREMA-D feature (``np.log(np.abs(stft) + 1e-7)``).

    The defaults follow the MILES paper's CREMA-D description (window 512, overlap 353, so hop 159,
    no centring) rather than OGM-GE's code, which calls ``librosa.stft(n_fft=512, hop_length=353)``
    on 3 s at 22.05 kHz (257 x 188, centred): the paper's 257 x 299 matches only the former.
    """
    mag = stft_magnitude(x, n_fft, hop, win_length, window, center=center)
    return np.log(mag + np.float32(eps)).astype(np.float32, copy=False)


def hz_to_mel(freq: np.ndarray | float, *, htk: bool = False) -> np.ndarray:
    """Hz to mel: HTK's ``2595 log10(1 + f/700)`` or Slaney's (linear below 1 kHz, log above)."""
    f = np.asarray(freq, dtype=np.float64)
    if htk:
        return np.asarray(2595.0 * np.log10(1.0 + f / 700.0))
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    safe = np.maximum(f, min_log_hz)
    return np.asarray(
        np.where(f >= min_log_hz, min_log_mel + np.log(safe / min_log_hz) / logstep, f / f_sp)
    )


def mel_to_hz(mel: np.ndarray | float, *, htk: bool = False) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    m = np.asarray(mel, dtype=np.float64)
    if htk:
        return np.asarray(700.0 * (10.0 ** (m / 2595.0) - 1.0))
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.asarray(
        np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)
    )


def mel_filterbank(
    n_mels: int,
    n_fft: int,
    sample_rate: int,
    f_min: float = 0.0,
    f_max: float | None = None,
    norm: Literal["slaney"] | None = "slaney",
    htk: bool = False,
) -> np.ndarray:
    """Triangular mel filters, shape ``(n_mels, n_fft // 2 + 1)`` float32 (librosa's formulas).

    ``n_mels + 2`` points equally spaced on the mel scale from ``f_min`` to ``f_max`` (default
    Nyquist); filter ``i`` rises from point ``i`` to a peak of 1 at point ``i + 1`` and falls to 0
    at ``i + 2``. ``norm="slaney"`` scales each by ``2 / (f_{i+2} - f_i)`` (equal area, librosa's
    default); ``None`` leaves peaks at 1. A filter too narrow to cover any FFT bin is warned about.
    """
    f_max = sample_rate / 2.0 if f_max is None else float(f_max)
    if not 0 <= f_min < f_max <= sample_rate / 2.0:
        raise ValueError(f"need 0 <= f_min < f_max <= sample_rate/2 (got {f_min}, {f_max})")
    if norm not in ("slaney", None):
        raise ValueError(f"norm must be 'slaney' or None, got {norm!r}")
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    mels = np.linspace(hz_to_mel(f_min, htk=htk), hz_to_mel(f_max, htk=htk), n_mels + 2)
    points = mel_to_hz(mels, htk=htk)
    fdiff = np.diff(points)
    ramps = points[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    if norm == "slaney":
        weights *= (2.0 / (points[2:] - points[:-2]))[:, None]
    empty = np.flatnonzero(weights.max(axis=1) == 0)
    if empty.size:
        warnings.warn(
            f"mel filters {empty.tolist()} cover no FFT bin: use fewer mels or a larger n_fft",
            stacklevel=2,
        )
    return weights.astype(np.float32)


def log_mel_spectrogram(
    x: np.ndarray,
    sample_rate: int,
    n_mels: int,
    n_fft: int,
    hop: int,
    win_length: int | None = None,
    window: WindowName = "hann",
    *,
    center: bool = True,
    power: float = 2.0,
    f_min: float = 0.0,
    f_max: float | None = None,
    norm: Literal["slaney"] | None = "slaney",
    htk: bool = False,
    eps: float = 1e-10,
) -> np.ndarray:
    """``log(mel @ |STFT| ** power + eps)``, shape ``(n_mels, frames)`` float32 (natural log).

    ``center=True`` by default here, like librosa's ``feature.melspectrogram``; multiply by
    ``10 / ln 10`` for decibels.
    """
    mag = stft_magnitude(x, n_fft, hop, win_length, window, center=center).astype(np.float64)
    fb = mel_filterbank(n_mels, n_fft, sample_rate, f_min, f_max, norm, htk).astype(np.float64)
    mel = fb @ (mag**power)
    return np.log(mel + eps).astype(np.float32)


# --------------------------------------------------------------------------- resizing


def resize_2d(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``(H, W)`` or ``(C, H, W)`` to ``size=(h, w)`` with torch.

    ``align_corners=False`` (pixel centres, as Pillow and torchvision do) and ``antialias=True``
    whenever a side shrinks, so a downsampled spectrogram or image averages instead of aliasing.
    uint8 input comes back uint8 (rounded, clipped); anything else comes back float32.
    """
    arr = np.asarray(array)
    if arr.ndim not in (2, 3):
        raise ValueError(f"resize_2d expects (H, W) or (C, H, W), got shape {arr.shape}")
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"target size must be positive, got {size}")
    src = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    src = src[None, None] if arr.ndim == 2 else src[None]
    if (h, w) == tuple(src.shape[-2:]):
        out = src
    else:
        shrink = h < src.shape[-2] or w < src.shape[-1]
        out = F.interpolate(
            src, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink
        )
    res = out[0, 0] if arr.ndim == 2 else out[0]
    if arr.dtype == np.uint8:
        return res.round().clamp(0, 255).to(torch.uint8).numpy()
    return res.numpy().astype(np.float32, copy=False)
