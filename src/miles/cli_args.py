"""Argument types shared by every ``miles`` subcommand, so they parse and fail the same way."""

from __future__ import annotations

import argparse
from typing import Any


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as a YAML scalar: ``max_train=60`` -> ``("max_train", 60)``.

    Dashes in KEY become underscores, so ``--option min-video-coverage=null`` reaches the
    ``min_video_coverage`` parameter.
    """
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.replace("-", "_"), yaml.safe_load(value)
