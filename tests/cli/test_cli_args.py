"""The argument types every subcommand shares."""

from __future__ import annotations

import argparse

import pytest

from miles.cli import main
from miles.cli_args import key_value, positive_int


def test_key_value_reads_yaml_scalars() -> None:
    assert key_value("max_train=60") == ("max_train", 60)
    assert key_value("min-video-coverage=null") == ("min_video_coverage", None)
    assert key_value("frame=middle") == ("frame", "middle")
    for bad in ("frame", "=3"):
        with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
            key_value(bad)


def test_positive_int() -> None:
    assert positive_int("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match="positive"):
        positive_int("0")


@pytest.mark.parametrize("command", ["compare", "sweep", "ablate"])
def test_bad_dataset_option_is_a_usage_error(command: str) -> None:
    extra = {
        "compare": [],
        "sweep": ["--method", "miles"],
        "ablate": ["--param", "tau", "--values", "0.2"],
    }
    with pytest.raises(SystemExit) as exc:
        main([command, *extra[command], "--dataset-option", "max_train"])
    assert exc.value.code == 2
