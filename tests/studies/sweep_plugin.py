"""A ``miles --plugin`` for the multi-worker sweep tests: the toy task as dataset ``sweep-toy``
(trials train in a fraction of a second), with two hooks the tests drive through environment
variables, so the workers' shared settings stay the same:

- ``MILES_TEST_HANG_MARKER=PATH``: the first trial of this process writes ``PATH`` and then
  hangs (its heartbeat keeps beating), so the test can kill the process mid-trial;
- ``MILES_TEST_START_AFTER=PATH``: the dataset is built only once ``PATH`` exists, so this worker
  starts claiming trials after the hanging one has claimed its own.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from torch import nn

from miles.data import DatasetSplits, register_dataset
from tests.conftest import make_toy_splits

HANG = "MILES_TEST_HANG_MARKER"
START_AFTER = "MILES_TEST_START_AFTER"


def _hang_in_first_trial(build: object) -> object:
    def build_then_hang(latent_dim: int) -> dict[str, nn.Module]:
        Path(os.environ[HANG]).write_text(str(os.getpid()))
        time.sleep(600)  # killed by the test long before
        return build(latent_dim)  # type: ignore[operator,no-any-return]

    return build_then_hang


@register_dataset("sweep-toy")
def sweep_toy() -> DatasetSplits:
    """48 / 16 / 16 samples of the toy task (two modalities, four classes)."""
    gate = os.environ.get(START_AFTER)
    deadline = time.monotonic() + 120
    while gate and not Path(gate).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    splits = make_toy_splits(n=(48, 16, 16))
    if os.environ.get(HANG):
        splits = dataclasses.replace(
            splits, build_encoders=_hang_in_first_trial(splits.build_encoders)
        )
    return splits
