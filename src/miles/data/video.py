"""One RGB frame from a video file (PyAV) and images (Pillow), with errors that name the file.

torchvision's video readers are unavailable here, and frame counts in container headers are not to
be trusted (CREMA-D's Flash videos carry none, so ``stream.frames`` is 0): :func:`read_frame`
therefore decodes the stream and picks a frame by its index among the frames actually decoded.
Which frame is a documented choice (OGM-GE issues #8/#9/#27 are about frame sampling that was
silently different from what the paper said).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Literal

import numpy as np

from miles.data.audio import lfs_pointer_reason
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


def read_frame(
    path: Path | str, which: FrameChoice = "middle", seed: int | None = None
) -> np.ndarray:
    """Decode the video stream of ``path`` and return one frame as ``(H, W, 3)`` uint8 RGB.

    All frames are decoded (kept as compact YUV frames; only the chosen one is converted to RGB)
    so that the index is exact whatever the header says; ``which="first"`` stops after one.

    Raises:
        RawDataError: the file is missing, a git-lfs pointer, not a readable container, has no
            video stream, decodes to no frame, or fails mid-stream (corrupt packets).
    """
    av = _import_av()
    path = Path(path)
    if not path.is_file():
        raise RawDataError(path, "video file is missing")
    lfs = lfs_pointer_reason(path)
    if lfs is not None:
        raise RawDataError(path, lfs)
    if which not in ("middle", "first", "random"):
        frame_index(which, 1)  # validate the fraction before decoding
    frames: list[Any] = []
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise RawDataError(path, "has no video stream")
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                frames.append(frame)
                if which == "first":
                    break
            if not frames:
                raise RawDataError(path, "video stream decodes to no frames")
            chosen = frames[frame_index(which, len(frames), seed)]
            rgb = chosen.to_ndarray(format="rgb24")
    except RawDataError:
        raise
    except Exception as exc:  # FFmpeg errors (InvalidDataError, EOFError, ...) and friends
        raise RawDataError(path, f"unreadable video ({type(exc).__name__}: {exc})") from exc
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise RawDataError(path, f"decoded frame has shape {rgb.shape}, expected (H, W, 3)")
    return rgb


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
    path = Path(path)
    if not path.is_file():
        raise RawDataError(path, "image file is missing")
    lfs = lfs_pointer_reason(path)
    if lfs is not None:
        raise RawDataError(path, lfs)
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # UnidentifiedImageError, OSError (truncated), ...
        raise RawDataError(path, f"unreadable image ({type(exc).__name__}: {exc})") from exc
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise RawDataError(path, f"decoded image has shape {rgb.shape}")
    return np.ascontiguousarray(rgb)
