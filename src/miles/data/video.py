"""One RGB frame from a video file (PyAV) and images (Pillow), with errors that name the file.

torchvision's video readers are unavailable here, and frame counts in container headers are not to
be trusted (CREMA-D's Flash videos carry none, so ``stream.frames`` is 0): :func:`read_frame`
therefore decodes the stream and picks a frame by its index among the frames actually decoded,
after checking that those frames cover the declared duration (a truncated file decodes without
error but with fewer frames, which would silently move the chosen frame).
Which frame is a documented choice (OGM-GE issues #8/#9/#27 are about frame sampling that was
silently different from what the paper said).
"""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path
from typing import Any, Literal

import numpy as np

from miles.data.audio import require_media_file
from miles.data.base import MissingDataPackageError
from miles.data.prepare import RawDataError

__all__ = ["FrameChoice", "frame_index", "read_frame", "read_image"]

FrameChoice = Literal["middle", "first", "random"] | float


def frame_index(which: FrameChoice, n_frames: int, seed: int | None = None) -> int:
    """Index of the chosen frame among ``n_frames`` decoded frames.

    ``"first"`` is 0; ``"middle"`` is ``n_frames // 2`` (for an even count, the later of the two
    central frames); a float ``f`` in [0, 1] is ``floor(f * (n_frames - 1) + 0.5)`` (0.0 first,
    1.0 last, 0.5 the middle as above); ``"random"`` is uniform, from ``random.Random(seed)`` so a
    seed makes it reproducible.
    """
    if n_frames <= 0:
        raise ValueError(f"no frames to choose from (n_frames={n_frames})")
    if which == "first":
        return 0
    if which == "middle":
        return n_frames // 2
    if which == "random":
        return random.Random(seed).randrange(n_frames)
    if isinstance(which, bool) or not isinstance(which, int | float):
        raise ValueError(f"frame must be 'middle', 'first', 'random' or a fraction, got {which!r}")
    frac = float(which)
    if not 0.0 <= frac <= 1.0 or math.isnan(frac):
        raise ValueError(f"frame fraction must be in [0, 1], got {which!r}")
    return min(n_frames - 1, math.floor(frac * (n_frames - 1) + 0.5))


def _import_av() -> Any:
    try:
        import av
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDataPackageError(
            "reading video needs PyAV: pip install 'miles-lr[data]'"
        ) from exc
    return av


def _seconds(value: Any, time_base: Any) -> float | None:
    """``value * time_base`` in seconds, or None when either is unknown."""
    if value is None or time_base is None:
        return None
    return float(value * time_base)


def _declared_seconds(container: Any, stream: Any) -> float | None:
    """The video stream's duration from the header, else the container's; None if unknown."""
    seconds = _seconds(stream.duration, stream.time_base)
    if seconds is None and container.duration is not None:
        seconds = float(container.duration) / 1_000_000  # AV_TIME_BASE units
    return seconds if seconds is not None and seconds > 0 else None


def read_frame(
    path: Path | str,
    which: FrameChoice = "middle",
    seed: int | None = None,
    *,
    expected_seconds: float | None = None,
    min_coverage: float | None = 0.9,
) -> np.ndarray:
    """Decode the video stream of ``path`` and return one frame as ``(H, W, 3)`` uint8 RGB.

    Two passes keep memory flat whatever the clip's length: the first decodes every frame
    without keeping or converting it, to count them exactly (headers are not trusted) and to see
    how much of the clip the frames cover; the second decodes up to the chosen index and converts
    only that frame (``"first"`` needs no second pass).

    A truncated file often decodes without any error, just with fewer frames, which would move
    the "middle" frame silently. So the decoded frames' span (last frame's end minus the stream
    start) must reach ``min_coverage`` (default 90 %) of the duration the container or stream
    declares, of the header's frame count when it has one (MP4), and of ``expected_seconds`` when
    the caller knows the take's length (CREMA-D: the paired WAV). ``min_coverage=None`` turns
    these checks off.

    Raises:
        RawDataError: the file is missing, a git-lfs pointer, not a readable container, has no
            video stream, decodes to no frame, fails mid-stream (corrupt packets) or is
            truncated.
    """
    av = _import_av()
    path = require_media_file(path, "video")
    if which not in ("middle", "first", "random"):
        frame_index(which, 1)  # validate the fraction before decoding
    if min_coverage is not None and not 0.0 < min_coverage <= 1.0:
        raise ValueError(f"min_coverage must be in (0, 1] or None, got {min_coverage!r}")
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise RawDataError(path, "has no video stream")
            stream = container.streams.video[0]
            n_frames = 0
            first_rgb: np.ndarray | None = None
            first_time: float | None = None
            last_time: float | None = None
            for frame in container.decode(stream):
                if n_frames == 0 and which == "first":
                    first_rgb = frame.to_ndarray(format="rgb24")
                if frame.time is not None:
                    first_time = frame.time if first_time is None else first_time
                    last_time = frame.time
                n_frames += 1
            if n_frames == 0:
                raise RawDataError(path, "video stream decodes to no frames")
            if min_coverage is not None:
                _check_coverage(
                    path,
                    container,
                    stream,
                    n_frames,
                    first_time,
                    last_time,
                    expected_seconds,
                    min_coverage,
                )
            index = frame_index(which, n_frames, seed)
        rgb = first_rgb if first_rgb is not None else _frame_at(av, path, index)
    except RawDataError:
        raise
    except Exception as exc:  # FFmpeg errors (InvalidDataError, EOFError, ...) and friends
        raise RawDataError(path, f"unreadable video ({type(exc).__name__}: {exc})") from exc
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise RawDataError(path, f"decoded frame has shape {rgb.shape}, expected (H, W, 3)")
    return rgb


def _check_coverage(
    path: Path,
    container: Any,
    stream: Any,
    n_frames: int,
    first_time: float | None,
    last_time: float | None,
    expected_seconds: float | None,
    min_coverage: float,
) -> None:
    """Raise "truncated video" when the decoded frames fall clearly short of what is declared."""
    declared_frames = int(stream.frames or 0)
    if declared_frames and n_frames < min_coverage * declared_frames:
        raise RawDataError(
            path,
            f"truncated video: {n_frames} frames decoded, the header declares {declared_frames}",
        )
    if last_time is None:
        return
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    frame_seconds = 1.0 / float(rate) if rate else 0.0
    declared_start = _seconds(stream.start_time, stream.time_base)
    start = first_time or 0.0
    if declared_start is not None:
        start = min(start, declared_start)
    covered = last_time + frame_seconds - start
    for what, seconds in (
        ("the container declares", _declared_seconds(container, stream)),
        ("the paired audio lasts", expected_seconds),
    ):
        if seconds is not None and seconds > 0 and covered < min_coverage * seconds:
            raise RawDataError(
                path,
                f"truncated video: {n_frames} decoded frames cover {covered:.2f} s, but "
                f"{what} {seconds:.2f} s",
            )


def _frame_at(av: Any, path: Path, index: int) -> np.ndarray:
    """Decode ``path`` again up to frame ``index`` and convert only that frame to RGB."""
    with av.open(str(path), mode="r") as container:
        # islice drops each skipped frame at once (enumerate's cached tuple would keep one more)
        frames = container.decode(container.streams.video[0])
        frame = next(itertools.islice(frames, index, None), None)
        if frame is not None:
            return frame.to_ndarray(format="rgb24")
    raise RawDataError(path, f"frame {index} decoded in the first pass but not in the second")


def read_image(path: Path | str) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8 RGB with Pillow (grey/CMYK/alpha converted).

    Raises:
        RawDataError: the file is missing, a git-lfs pointer, truncated or not an image.
    """
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDataPackageError(
            "reading images needs Pillow: pip install 'miles-lr[data]'"
        ) from exc
    path = require_media_file(path, "image")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # UnidentifiedImageError, OSError (truncated), ...
        raise RawDataError(path, f"unreadable image ({type(exc).__name__}: {exc})") from exc
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise RawDataError(path, f"decoded image has shape {rgb.shape}")
    return np.ascontiguousarray(rgb)
