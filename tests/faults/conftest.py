"""The fault campaign of issue 12, kept alive: kills, damaged files, two processes, full disks.

The default run holds a small seeded subset (a few kill points per command), so the suite stays
fast on 2 cores; ``MILES_FAULTS=full`` runs every seeded case (the ones marked ``faults_full``),
e.g. ``MILES_FAULTS=full python -m pytest -q tests/faults``. ``MILES_FAULTS_SEED=N`` draws other
kill points (a failure prints the seed and the point, so it can be replayed).
"""

from __future__ import annotations

import os

import pytest

from tests.faults import helpers


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "faults_full: a slower fault case, run with MILES_FAULTS=full"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("MILES_FAULTS") == "full":
        return
    skip = pytest.mark.skip(reason="a slower fault case: run with MILES_FAULTS=full")
    for item in items:
        if "faults_full" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _toy_dataset() -> None:
    """``faults-toy``: the conftest's toy task under a dataset name, so ``miles train``,
    ``compare`` and ``sweep`` run on it in-process and in forked children."""
    helpers.register_toy_dataset()
